//! The embedded engine on the real default model: concurrent requests in
//! one batch produce exactly what each produces alone (greedy), and the
//! token accounting matches the tokenizer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures_util::StreamExt;
use sluice_engine::llama::{LlamaConfig, LlamaEngine, Tokenizer};
use sluice_engine::model_fetch::user_cache_dir;
use sluice_engine::Engine;
use sluice_proto::miner::{
    FinishReason, GenerationParams, InvokeEvent, InvokeRequest, PromptInput,
};

fn model() -> Option<std::path::PathBuf> {
    let p = user_cache_dir().join(sluice_proto::DEFAULT_MODEL_FILE);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipped: the default model is not in {} (run `sluice models pull`)",
            p.display()
        );
        None
    }
}

fn request(prompt: &str, max: u32, continuation: &str) -> InvokeRequest {
    InvokeRequest {
        request_id: "t".into(),
        model: "m".into(),
        input: PromptInput::Text {
            prompt: prompt.into(),
        },
        params: GenerationParams {
            max_tokens: Some(max),
            temperature: 0.0,
            ..Default::default()
        },
        continuation: continuation.into(),
        stream: true,
    }
}

async fn run(engine: &LlamaEngine, req: InvokeRequest) -> (String, u32, u32, u32, FinishReason) {
    let events: Vec<InvokeEvent> = engine.generate(req).unwrap().collect().await;
    let mut text = String::new();
    let mut counted = 0;
    let mut started = 0;
    for e in events {
        match e {
            InvokeEvent::Started { prompt_tokens } => started = prompt_tokens,
            InvokeEvent::Text { text: t, tokens } => {
                text.push_str(&t);
                counted += tokens;
            }
            InvokeEvent::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                assert_eq!(prompt_tokens, started);
                assert_eq!(
                    counted, completion_tokens,
                    "text events must account for every token"
                );
                return (text, started, completion_tokens, counted, finish_reason);
            }
            InvokeEvent::Error { message, .. } => panic!("engine error: {message}"),
        }
    }
    panic!("no Done event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_generation_matches_single_and_counts_tokens() {
    let Some(path) = model() else { return };
    let mut cfg = LlamaConfig::new(&path, "m");
    cfg.slots = 4;
    let engine = LlamaEngine::start(cfg).unwrap();
    let prompts = [
        "The sky is",
        "Once upon a time",
        "def fibonacci(n):",
        "Paris is the capital of",
    ];
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(run(&engine, request(p, 16, "")).await);
    }
    let together =
        futures_util::future::join_all(prompts.iter().map(|p| run(&engine, request(p, 16, ""))))
            .await;
    for (a, t) in alone.iter().zip(&together) {
        assert_eq!(a.0, t.0);
        assert_eq!(a.2, 16);
        assert_eq!(a.4, FinishReason::Length);
    }
    let tok = Tokenizer::load(&path, true).unwrap();
    assert_eq!(alone[0].1 as usize, tok.tokenize("The sky is").len());

    // Continuing from produced text (failover) carries on the same answer.
    let (first, _, _, _, _) = &alone[0];
    let words: Vec<&str> = first.split_inclusive(' ').collect();
    let head: String = words[..3].concat();
    let (rest, prompt_tokens, _, _, _) = run(&engine, request("The sky is", 8, &head)).await;
    assert!(first.starts_with(&head));
    assert!(prompt_tokens as usize > tok.tokenize("The sky is").len());
    assert!(!rest.is_empty());

    // Prompts longer than the context are refused, not truncated.
    let long = "word ".repeat(5000);
    let events: Vec<InvokeEvent> = engine
        .generate(request(&long, 4, ""))
        .unwrap()
        .collect()
        .await;
    assert!(
        matches!(
            &events[..],
            [InvokeEvent::Error {
                retryable: false,
                ..
            }]
        ),
        "{events:?}"
    );
}
