//! The engine seam: everything that turns an [`InvokeRequest`] into a
//! stream of [`InvokeEvent`]s. The miner only sees [`Engine`]; the embedded
//! llama.cpp engine serves real models, the scripted fake engine serves
//! routing and chaos tests.

pub mod fake;
mod h1pool;
pub mod llama;
pub mod model_fetch;
pub mod stop;
pub mod template;
pub mod upstream;

use std::pin::Pin;

use futures_util::Stream;
use sluice_proto::miner::{InvokeEvent, InvokeRequest};

/// The events of one generation, ending with `Done` or `Error`.
pub type EventStream = Pin<Box<dyn Stream<Item = InvokeEvent> + Send>>;

/// What an engine serves and how much of it at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub model_id: String,
    /// Sequences decoded concurrently (continuous batching slots).
    pub capacity: u32,
    /// Context window per sequence, in tokens.
    pub context_length: u32,
    /// Short description for registration (engine kind, threads).
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("engine is at capacity")]
    Busy,
    #[error("engine stopped")]
    Stopped,
    #[error("{0}")]
    Invalid(String),
    #[error("engine failed to load: {0}")]
    Load(String),
}

/// A model server. `generate` must not block: it queues the work and
/// returns a stream that the caller polls; dropping the stream cancels.
pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> EngineInfo;
    fn generate(&self, request: InvokeRequest) -> Result<EventStream, EngineError>;
    /// True while the engine can accept work.
    fn healthy(&self) -> bool;
    /// Requests currently generating or queued.
    fn in_flight(&self) -> u32;
}
