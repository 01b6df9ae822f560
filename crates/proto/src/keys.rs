//! API keys: `cpk_<key id>.<secret>`. Only a SHA-256 of the secret is ever
//! stored; the key id locates the row. Secrets are 256 random bits, so a
//! fast hash is enough (there is nothing to brute-force).

use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "cpk_";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("API keys start with `cpk_`")]
    Prefix,
    #[error("API keys look like `cpk_<id>.<secret>`")]
    Shape,
}

/// Splits a presented key into id and secret, checking its shape only.
pub fn parse_key(key: &str) -> Result<ParsedKey<'_>, KeyParseError> {
    let rest = key.strip_prefix(KEY_PREFIX).ok_or(KeyParseError::Prefix)?;
    let (id, secret) = rest.split_once('.').ok_or(KeyParseError::Shape)?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex_ok(id, ID_LEN) || !hex_ok(secret, SECRET_LEN) {
        return Err(KeyParseError::Shape);
    }
    Ok(ParsedKey { id, secret })
}

/// Hex SHA-256 of a key secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    crate::hex_lower(&Sha256::digest(secret.as_bytes()))
}

/// Builds a full key from an id and a secret (both lowercase hex).
pub fn format_key(id: &str, secret: &str) -> String {
    format!("{KEY_PREFIX}{id}.{secret}")
}

/// Generates a new (id, secret) pair from the given random bytes:
/// 8 bytes of id and 32 bytes of secret.
pub fn key_from_bytes(id: [u8; 8], secret: [u8; 32]) -> (String, String) {
    (hex::encode(id), hex::encode(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (id, secret) = key_from_bytes([1; 8], [2; 32]);
        let key = format_key(&id, &secret);
        assert!(key.starts_with("cpk_0101"));
        let p = parse_key(&key).unwrap();
        assert_eq!(p.id, id);
        assert_eq!(p.secret, secret);
        assert_eq!(hash_secret(&secret).len(), 64);
        assert_ne!(hash_secret(&secret), secret);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_key("sk-123"), Err(KeyParseError::Prefix));
        assert_eq!(parse_key("cpk_abc"), Err(KeyParseError::Shape));
        assert_eq!(parse_key("cpk_abc.def"), Err(KeyParseError::Shape));
        let (id, secret) = key_from_bytes([1; 8], [2; 32]);
        assert!(parse_key(&format!("cpk_{id}.{secret}x")).is_err());
        assert!(parse_key(&format!("cpk_{id}.{}", &secret[..63])).is_err());
        assert!(parse_key(&format!("cpk_{}.{secret}", "z".repeat(16))).is_err());
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
