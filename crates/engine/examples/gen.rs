use futures_util::StreamExt;
use sluice_engine::llama::{LlamaConfig, LlamaEngine};
use sluice_engine::Engine;
use sluice_proto::miner::*;

#[tokio::main]
async fn main() {
    let path = std::env::args().nth(1).unwrap();
    let slots: u32 = std::env::args().nth(2).unwrap().parse().unwrap();
    let prompt = std::env::args().nth(3).unwrap();
    let mut cfg = LlamaConfig::new(path, "m");
    cfg.slots = slots;
    let e = LlamaEngine::start(cfg).unwrap();
    let req = InvokeRequest {
        request_id: "x".into(),
        model: "m".into(),
        input: if std::env::var("CHAT").is_ok() { PromptInput::Chat { messages: vec![PromptMessage { role: "user".into(), content: prompt }] } } else { PromptInput::Text { prompt } },
        params: GenerationParams { max_tokens: Some(30), temperature: 0.0, ..Default::default() },
        continuation: String::new(),
    };
    let ev: Vec<_> = e.generate(req).unwrap().collect().await;
    println!("{ev:?}");
}
