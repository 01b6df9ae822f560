//! A scripted engine for routing, chaos and overhead tests: it produces
//! deterministic text with configurable delays and failures, no model.
//! Never used where a test claims to exercise real inference.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sluice_proto::miner::{FinishReason, InvokeEvent, InvokeRequest, PromptInput};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Engine, EngineError, EngineInfo, EventStream};

/// How the fake engine behaves; chosen per miner in its config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FakeScript {
    pub model_id: String,
    pub capacity: u32,
    /// Tokens produced when the request sets no `max_tokens`.
    pub default_tokens: u32,
    pub first_token_delay_ms: u64,
    pub token_delay_ms: u64,
    /// Fail every request before its first token.
    pub fail_before_first: bool,
    /// End the stream abruptly (no `Done`) after this many tokens.
    pub die_after: Option<u32>,
    /// Stop sending (but keep the stream open) after this many tokens.
    pub stall_after: Option<u32>,
}

impl Default for FakeScript {
    fn default() -> Self {
        FakeScript {
            model_id: sluice_proto::DEFAULT_MODEL_ID.to_string(),
            capacity: 8,
            default_tokens: 16,
            first_token_delay_ms: 0,
            token_delay_ms: 0,
            fail_before_first: false,
            die_after: None,
            stall_after: None,
        }
    }
}

/// The text the fake engine produces for token `i`.
pub fn fake_token(i: u32) -> String {
    format!(" t{i}")
}

pub struct FakeEngine {
    script: FakeScript,
    in_flight: Arc<AtomicU32>,
}

impl FakeEngine {
    pub fn new(script: FakeScript) -> Self {
        FakeEngine {
            script,
            in_flight: Arc::new(AtomicU32::new(0)),
        }
    }
}

struct InFlight(Arc<AtomicU32>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine for FakeEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_id: self.script.model_id.clone(),
            capacity: self.script.capacity,
            context_length: 4096,
            description: "scripted fake engine (tests only)".into(),
        }
    }

    fn generate(&self, request: InvokeRequest) -> Result<EventStream, EngineError> {
        if self.in_flight.load(Ordering::SeqCst) >= self.script.capacity {
            return Err(EngineError::Busy);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        let script = self.script.clone();
        let (tx, rx) = mpsc::channel(64);
        // Words already produced by a previous instance continue the count.
        let start = request.continuation.split_whitespace().count() as u32;
        let prompt_words = match &request.input {
            PromptInput::Chat { messages } => messages
                .iter()
                .map(|m| m.content.split_whitespace().count() as u32 + 1)
                .sum::<u32>(),
            PromptInput::Text { prompt } => prompt.split_whitespace().count() as u32,
        } + start;
        let total = request.params.max_tokens.unwrap_or(script.default_tokens);
        tokio::spawn(async move {
            let _guard = guard;
            if tx
                .send(InvokeEvent::Started {
                    prompt_tokens: prompt_words,
                })
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(script.first_token_delay_ms)).await;
            if script.fail_before_first {
                let _ = tx
                    .send(InvokeEvent::Error {
                        message: "scripted failure".into(),
                        retryable: true,
                    })
                    .await;
                return;
            }
            for i in 0..total {
                if script.die_after == Some(i) {
                    return;
                }
                if script.stall_after == Some(i) {
                    tx.closed().await;
                    return;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(script.token_delay_ms)).await;
                }
                if tx
                    .send(InvokeEvent::Text {
                        text: fake_token(start + i),
                        tokens: 1,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = tx
                .send(InvokeEvent::Done {
                    finish_reason: FinishReason::Length,
                    prompt_tokens: prompt_words,
                    completion_tokens: total,
                })
                .await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    fn healthy(&self) -> bool {
        true
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use sluice_proto::miner::GenerationParams;

    fn req(max: u32) -> InvokeRequest {
        InvokeRequest {
            request_id: "r".into(),
            model: "m".into(),
            input: PromptInput::Text {
                prompt: "a b".into(),
            },
            params: GenerationParams {
                max_tokens: Some(max),
                ..Default::default()
            },
            continuation: String::new(),
            stream: true,
        }
    }

    #[tokio::test]
    async fn produces_tokens_then_done() {
        let e = FakeEngine::new(FakeScript::default());
        let events: Vec<_> = e.generate(req(3)).unwrap().collect().await;
        assert_eq!(events.len(), 5);
        assert_eq!(
            events[4],
            InvokeEvent::Done {
                finish_reason: FinishReason::Length,
                prompt_tokens: 2,
                completion_tokens: 3
            }
        );
    }

    #[tokio::test]
    async fn dies_after_n_tokens() {
        let e = FakeEngine::new(FakeScript {
            die_after: Some(2),
            ..Default::default()
        });
        let events: Vec<_> = e.generate(req(5)).unwrap().collect().await;
        assert_eq!(events.len(), 3);
        assert!(events[1..]
            .iter()
            .all(|e| matches!(e, InvokeEvent::Text { .. })));
    }
}
