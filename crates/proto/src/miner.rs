//! The validator <-> miner protocol: registration (a miner proves it owns
//! its ed25519 key by signing a validator nonce), heartbeats, and the
//! authenticated invocation the validator forwards to a miner, whose
//! answer is an SSE stream of [`InvokeEvent`]s.
//!
//! Invocations carry an HMAC-SHA256 under a key the two sides share
//! without ever sending it: an X25519 exchange between their ed25519
//! identities ([`pair_key`], computed once per pair). A MAC costs about a
//! microsecond where an ed25519 signature check costs about fifty, on
//! every request. Only the validator and that miner can compute the key,
//! so a valid MAC still proves the invocation came from the validator.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::Mac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Header carrying the request id from client to validator to miner.
pub const HDR_REQUEST_ID: &str = "x-request-id";
/// Header carrying the MAC of an invocation (hex HMAC-SHA256).
pub const HDR_MAC: &str = "x-sluice-mac";
/// Header naming the validator (public key, hex) that sent an invocation.
pub const HDR_VALIDATOR: &str = "x-sluice-validator";
/// Header carrying the signing time (unix ms) of an invocation.
pub const HDR_TIMESTAMP: &str = "x-sluice-timestamp";

/// One message of a chat prompt, text only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptMessage {
    pub role: String,
    pub content: String,
}

/// What the engine is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptInput {
    /// Rendered through the model's own chat template.
    Chat { messages: Vec<PromptMessage> },
    /// Used verbatim.
    Text { prompt: String },
}

/// Normalised sampling parameters (validated by the validator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Upper bound on generated tokens; `None` = until the context ends.
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

/// The body the validator POSTs to a miner's `/v1/invoke`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvokeRequest {
    pub request_id: String,
    pub model: String,
    pub input: PromptInput,
    pub params: GenerationParams,
    /// Text already produced by another instance (mid-stream failover):
    /// the engine appends it to the rendered prompt and continues from there.
    #[serde(default)]
    pub continuation: String,
    /// Whether the client reads the answer as it is produced. When false an
    /// engine may produce it in one piece: the upstream engine then asks its
    /// server for one JSON answer instead of a stream of chunks.
    #[serde(default = "streamed")]
    pub stream: bool,
}

fn streamed() -> bool {
    true
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One event of a miner's answer stream.
///
/// Read through [`RawEvent`]: serde's internally tagged enums buffer every
/// field of an event before choosing its variant, which cost a dozen
/// allocations per event on the validator's hot path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", try_from = "RawEvent")]
pub enum InvokeEvent {
    /// The prompt was admitted: its length in tokens (including any
    /// continuation), from the engine's tokenizer.
    Started { prompt_tokens: u32 },
    /// Newly generated text and how many generated tokens it completes
    /// (text held back by UTF-8 or stop matching is counted when released).
    Text { text: String, tokens: u32 },
    /// The generation finished; token counts come from the engine's own
    /// tokenizer. `prompt_tokens` counts the rendered prompt (including any
    /// continuation), `completion_tokens` the tokens generated here.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    /// The generation failed; `retryable` says whether another instance
    /// could succeed with the same input.
    Error { message: String, retryable: bool },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventKind {
    Started,
    Text,
    Done,
    Error,
}

/// Every field any [`InvokeEvent`] has, read in one pass.
#[derive(Deserialize)]
struct RawEvent {
    event: EventKind,
    prompt_tokens: Option<u32>,
    text: Option<String>,
    tokens: Option<u32>,
    finish_reason: Option<FinishReason>,
    completion_tokens: Option<u32>,
    message: Option<String>,
    retryable: Option<bool>,
}

impl TryFrom<RawEvent> for InvokeEvent {
    type Error = String;

    fn try_from(r: RawEvent) -> Result<Self, String> {
        fn need<T>(v: Option<T>, field: &str) -> Result<T, String> {
            v.ok_or_else(|| format!("missing field `{field}`"))
        }
        Ok(match r.event {
            EventKind::Started => InvokeEvent::Started {
                prompt_tokens: need(r.prompt_tokens, "prompt_tokens")?,
            },
            EventKind::Text => InvokeEvent::Text {
                text: need(r.text, "text")?,
                tokens: need(r.tokens, "tokens")?,
            },
            EventKind::Done => InvokeEvent::Done {
                finish_reason: need(r.finish_reason, "finish_reason")?,
                prompt_tokens: need(r.prompt_tokens, "prompt_tokens")?,
                completion_tokens: need(r.completion_tokens, "completion_tokens")?,
            },
            EventKind::Error => InvokeEvent::Error {
                message: need(r.message, "message")?,
                retryable: need(r.retryable, "retryable")?,
            },
        })
    }
}

/// A chute a miner offers, with its per-instance concurrency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedChute {
    pub model: String,
    pub capacity: u32,
    pub context_length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceResponse {
    pub nonce: String,
    pub validator_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Hex ed25519 public key: the miner's identity.
    pub miner_key: String,
    /// Base URL the validator reaches the miner at.
    pub endpoint: String,
    pub nonce: String,
    pub chutes: Vec<OfferedChute>,
    pub hardware: String,
    /// Hex signature over [`register_message`].
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub instance_ids: Vec<String>,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub miner_key: String,
    pub endpoint: String,
    pub timestamp_ms: u64,
    /// Requests in flight per model.
    pub load: Vec<(String, u32)>,
    pub signature: String,
}

/// The bytes a miner signs to register.
pub fn register_message(nonce: &str, endpoint: &str, chutes: &[OfferedChute]) -> Vec<u8> {
    let models: Vec<String> = chutes
        .iter()
        .map(|c| format!("{}:{}:{}", c.model, c.capacity, c.context_length))
        .collect();
    format!("sluice-register\n{nonce}\n{endpoint}\n{}", models.join(",")).into_bytes()
}

/// The bytes a miner signs for a heartbeat.
pub fn heartbeat_message(endpoint: &str, timestamp_ms: u64) -> Vec<u8> {
    format!("sluice-heartbeat\n{endpoint}\n{timestamp_ms}").into_bytes()
}

/// The invocation key of a validator and a miner: X25519 between `own`
/// and `peer` (their ed25519 keys on the Montgomery curve), hashed with
/// both public keys. Both sides get the same key. `None` for a peer key
/// whose exchange gives no secret (a low-order point).
pub fn pair_key(own: &SigningKey, peer: &VerifyingKey) -> Option<[u8; 32]> {
    let shared = peer.to_montgomery().mul_clamped(own.to_scalar_bytes());
    if shared.as_bytes().iter().all(|b| *b == 0) {
        return None;
    }
    let (a, b) = (own.verifying_key().to_bytes(), peer.to_bytes());
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    h.update(b"sluice-invoke-key-v1");
    h.update(shared.as_bytes());
    h.update(lo);
    h.update(hi);
    Some(h.finalize().into())
}

/// A pair key ready to MAC invocations: the HMAC state after the key, so
/// that each invocation hashes only its own bytes (the key's two blocks
/// are hashed once, when the key is made). Cache it per peer.
#[derive(Clone)]
pub struct InvokeKey {
    keyed: HmacSha256,
}

impl InvokeKey {
    pub fn new(key: &[u8; 32]) -> InvokeKey {
        let keyed = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| {
            // HMAC takes keys of any length; this branch cannot run.
            <HmacSha256 as Mac>::new(&Default::default())
        });
        InvokeKey { keyed }
    }

    fn hmac(&self, request_id: &str, timestamp_ms: u64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        // The bytes of "sluice-invoke\n{request_id}\n{timestamp_ms}\n".
        mac.update(b"sluice-invoke\n");
        mac.update(request_id.as_bytes());
        mac.update(b"\n");
        mac.update(itoa::Buffer::new().format(timestamp_ms).as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The MAC of an invocation: request id, time and the exact body.
    pub fn mac_hex(&self, request_id: &str, timestamp_ms: u64, body: &[u8]) -> String {
        crate::hex_lower(
            &self
                .hmac(request_id, timestamp_ms, body)
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks an invocation's MAC in constant time.
    pub fn verify(
        &self,
        request_id: &str,
        timestamp_ms: u64,
        body: &[u8],
        mac_hex: &str,
    ) -> Result<(), SignatureError> {
        let presented = hex::decode(mac_hex).map_err(|_| SignatureError::BadSignature)?;
        self.hmac(request_id, timestamp_ms, body)
            .verify_slice(&presented)
            .map_err(|_| SignatureError::Mismatch)
    }
}

impl std::fmt::Debug for InvokeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InvokeKey(..)")
    }
}

/// The MAC of an invocation: request id, time and the exact body.
pub fn invoke_mac_hex(key: &[u8; 32], request_id: &str, timestamp_ms: u64, body: &[u8]) -> String {
    InvokeKey::new(key).mac_hex(request_id, timestamp_ms, body)
}

type HmacSha256 = hmac::Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed public key")]
    BadKey,
    #[error("malformed signature")]
    BadSignature,
    #[error("signature does not verify")]
    Mismatch,
}

pub fn sign_hex(key: &SigningKey, msg: &[u8]) -> String {
    hex::encode(key.sign(msg).to_bytes())
}

pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

pub fn parse_public(public_hex: &str) -> Result<VerifyingKey, SignatureError> {
    let bytes: [u8; 32] = hex::decode(public_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::BadKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| SignatureError::BadKey)
}

pub fn verify_hex(key: &VerifyingKey, msg: &[u8], sig_hex: &str) -> Result<(), SignatureError> {
    let bytes: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::BadSignature)?;
    key.verify(msg, &Signature::from_bytes(&bytes))
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_registration() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let chutes = vec![OfferedChute {
            model: "m".into(),
            capacity: 4,
            context_length: 2048,
        }];
        let msg = register_message("n1", "http://127.0.0.1:1", &chutes);
        let sig = sign_hex(&key, &msg);
        let public = parse_public(&public_hex(&key)).unwrap();
        assert_eq!(verify_hex(&public, &msg, &sig), Ok(()));
        let other = register_message("n2", "http://127.0.0.1:1", &chutes);
        assert_eq!(
            verify_hex(&public, &other, &sig),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_hex(&public, &msg, "zz"),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(parse_public("00").err(), Some(SignatureError::BadKey));
    }

    #[test]
    fn pair_keys_agree_and_macs_bind_everything() {
        let v = SigningKey::generate(&mut rand::rngs::OsRng);
        let m = SigningKey::generate(&mut rand::rngs::OsRng);
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        let kv = pair_key(&v, &m.verifying_key()).unwrap();
        let km = pair_key(&m, &v.verifying_key()).unwrap();
        assert_eq!(kv, km);
        // A third party's key with either side gives another key.
        assert_ne!(pair_key(&other, &m.verifying_key()).unwrap(), kv);
        let mac = invoke_mac_hex(&kv, "r1", 5, b"{}");
        let prepared = InvokeKey::new(&km);
        assert_eq!(prepared.verify("r1", 5, b"{}", &mac), Ok(()));
        for (id, ts, body) in [("r2", 5, &b"{}"[..]), ("r1", 6, b"{}"), ("r1", 5, b"{ }")] {
            assert_eq!(
                prepared.verify(id, ts, body, &mac),
                Err(SignatureError::Mismatch)
            );
        }
        assert_eq!(
            prepared.verify("r1", 5, b"{}", "zz"),
            Err(SignatureError::BadSignature)
        );
        // The prepared key MACs exactly "sluice-invoke\n{id}\n{ts}\n{body}".
        let mut plain = <HmacSha256 as Mac>::new_from_slice(&kv).unwrap();
        plain.update(b"sluice-invoke\nr1\n5\n{}");
        assert_eq!(mac, hex::encode(plain.finalize().into_bytes()));
        assert_eq!(prepared.mac_hex("r1", 5, b"{}"), mac);
        assert_eq!(
            prepared.verify("r1", 1_700_000_000_000, b"{}", &mac),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn every_invoke_event_round_trips_and_missing_fields_are_named() {
        for e in [
            InvokeEvent::Started { prompt_tokens: 7 },
            InvokeEvent::Text {
                text: "h\u{e9}\"llo\n".into(),
                tokens: 2,
            },
            InvokeEvent::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: 7,
                completion_tokens: 9,
            },
            InvokeEvent::Error {
                message: "boom".into(),
                retryable: true,
            },
        ] {
            let s = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<InvokeEvent>(&s).unwrap(), e, "{s}");
        }
        let err = serde_json::from_str::<InvokeEvent>(r#"{"event":"text","text":"a"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `tokens`"), "{err}");
        assert!(serde_json::from_str::<InvokeEvent>(r#"{"event":"nope"}"#).is_err());
        // Fields of other events are ignored, as they were.
        assert_eq!(
            serde_json::from_str::<InvokeEvent>(r#"{"event":"started","prompt_tokens":1,"x":2}"#)
                .unwrap(),
            InvokeEvent::Started { prompt_tokens: 1 }
        );
    }

    #[test]
    fn invoke_events_are_tagged() {
        let e = InvokeEvent::Done {
            finish_reason: FinishReason::Length,
            prompt_tokens: 3,
            completion_tokens: 2,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains(r#""event":"done""#) && s.contains(r#""finish_reason":"length""#));
        assert_eq!(serde_json::from_str::<InvokeEvent>(&s).unwrap(), e);
        let req = InvokeRequest {
            request_id: "r".into(),
            model: "m".into(),
            input: PromptInput::Chat {
                messages: vec![PromptMessage {
                    role: "user".into(),
                    content: "hi".into(),
                }],
            },
            params: GenerationParams::default(),
            continuation: String::new(),
            stream: false,
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["input"]["kind"], "chat");
        assert_eq!(serde_json::from_value::<InvokeRequest>(v).unwrap(), req);
    }
}
