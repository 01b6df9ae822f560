//! The embedded engine: llama.cpp (through `llama-cpp-2`) serving one GGUF
//! with continuous batching. One OS thread owns the llama context and runs
//! the decode loop; every active sequence advances one token per
//! `llama_decode`, and new requests join the running batch between steps
//! (prompt prefill is chunked under the batch budget), so concurrent
//! requests share each forward pass instead of queueing behind each other.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use sluice_proto::miner::{FinishReason, InvokeEvent, InvokeRequest, PromptInput};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::stop::{StopMatcher, Utf8Assembler};
use crate::template::{ChatTemplate, CHATML};
use crate::{Engine, EngineError, EngineInfo, EventStream};

/// Events buffered per request before a slow reader is cut off.
const EVENT_BUFFER: usize = 4096;

/// Settings of the embedded engine.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub model_path: PathBuf,
    pub model_id: String,
    /// Concurrent sequences (continuous batching slots).
    pub slots: u32,
    /// Context window per sequence.
    pub context_per_slot: u32,
    /// CPU threads for decoding.
    pub threads: u32,
    /// Requests allowed to wait for a free slot inside the engine.
    pub queue: usize,
}

impl LlamaConfig {
    pub fn new(model_path: impl Into<PathBuf>, model_id: impl Into<String>) -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        LlamaConfig {
            model_path: model_path.into(),
            model_id: model_id.into(),
            slots: 4,
            context_per_slot: 2048,
            threads,
            queue: 64,
        }
    }
}

fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let mut b = LlamaBackend::init().map_err(|e| e.to_string())?;
            b.void_logs();
            Ok(b)
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

/// Loads a GGUF's vocabulary and template only: tokenising and counting
/// without an inference context.
pub struct Tokenizer {
    model: Arc<LlamaModel>,
    template: ChatTemplate,
}

impl Tokenizer {
    pub fn load(path: &Path, vocab_only: bool) -> Result<Self, EngineError> {
        let backend = backend()?;
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "model file {} does not exist",
                path.display()
            )));
        }
        let params = LlamaModelParams::default().with_vocab_only(vocab_only);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let template = template_of(&model);
        Ok(Tokenizer {
            model: Arc::new(model),
            template,
        })
    }

    /// Tokenises text as the engine does for prompts.
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), true, true)
    }

    /// The exact text the engine feeds the model for this input.
    pub fn render(&self, input: &PromptInput, continuation: &str) -> Result<String, String> {
        let mut text = match input {
            PromptInput::Chat { messages } => self.template.render(messages)?,
            PromptInput::Text { prompt } => prompt.clone(),
        };
        text.push_str(continuation);
        Ok(text)
    }

    pub fn context_train(&self) -> u32 {
        self.model.n_ctx_train()
    }
}

fn template_of(model: &LlamaModel) -> ChatTemplate {
    let vocab = model.vocab();
    let piece =
        |t: LlamaToken| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
    let bos = piece(vocab.bos());
    let eos = piece(vocab.eos());
    let source = model
        .meta_val_str("tokenizer.chat_template")
        .unwrap_or_else(|_| CHATML.to_string());
    ChatTemplate::new(source, &bos, &eos)
}

struct Job {
    request: InvokeRequest,
    tx: mpsc::Sender<InvokeEvent>,
}

/// The embedded llama.cpp engine.
pub struct LlamaEngine {
    info: EngineInfo,
    jobs: mpsc::Sender<Job>,
    in_flight: Arc<AtomicU32>,
    alive: Arc<AtomicBool>,
}

impl LlamaEngine {
    /// Loads the model and starts the decode thread. Blocking (model load):
    /// call from `spawn_blocking` in async code.
    pub fn start(config: LlamaConfig) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::load(&config.model_path, false)?;
        let slots = config.slots.clamp(1, 64);
        let per_slot = config
            .context_per_slot
            .clamp(64, tokenizer.context_train().max(64));
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(config.queue.max(1));
        let in_flight = Arc::new(AtomicU32::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), EngineError>>(1);
        let threads = config.threads.max(1) as i32;
        let worker = Worker {
            tokenizer,
            slots,
            per_slot,
            threads,
            in_flight: in_flight.clone(),
        };
        let alive_thread = alive.clone();
        std::thread::Builder::new()
            .name("sluice-llama".into())
            .spawn(move || {
                worker.run(jobs_rx, ready_tx);
                alive_thread.store(false, Ordering::SeqCst);
            })
            .map_err(|e| EngineError::Load(format!("cannot start engine thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| EngineError::Load("engine thread died while starting".into()))??;
        Ok(LlamaEngine {
            info: EngineInfo {
                model_id: config.model_id,
                capacity: slots,
                context_length: per_slot,
                description: format!("llama.cpp (embedded), {threads} threads, {slots} slots"),
            },
            jobs: jobs_tx,
            in_flight,
            alive,
        })
    }
}

impl Engine for LlamaEngine {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    fn generate(&self, request: InvokeRequest) -> Result<EventStream, EngineError> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        match self.jobs.try_send(Job { request, tx }) {
            Ok(()) => {
                self.in_flight.fetch_add(1, Ordering::SeqCst);
                Ok(Box::pin(ReceiverStream::new(rx)))
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(EngineError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EngineError::Stopped),
        }
    }

    fn healthy(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.jobs.is_closed()
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }
}

struct Worker {
    tokenizer: Tokenizer,
    slots: u32,
    per_slot: u32,
    threads: i32,
    in_flight: Arc<AtomicU32>,
}

/// One sequence in the running batch.
struct Seq {
    seq_id: i32,
    tx: mpsc::Sender<InvokeEvent>,
    sampler: LlamaSampler,
    /// Prompt tokens not yet fed to the model.
    pending: Vec<LlamaToken>,
    /// Next position in this sequence's KV cache.
    n_past: i32,
    prompt_tokens: u32,
    generated: u32,
    max_new: u32,
    /// Token sampled last, to be fed next step.
    last: Option<LlamaToken>,
    /// Index of this sequence's logits in the current batch.
    logits_at: Option<i32>,
    /// Generated tokens not yet reported in a `Text` event.
    unreported: u32,
    utf8: Utf8Assembler,
    stop: StopMatcher,
}

enum Step {
    Continue,
    /// Ended by end-of-generation or length: held-back text is flushed.
    Finished(FinishReason),
    /// Ended by a stop sequence: nothing after it is emitted.
    StopMatched,
    Dropped,
}

impl Worker {
    fn run(
        self,
        mut jobs: mpsc::Receiver<Job>,
        ready: std::sync::mpsc::SyncSender<Result<(), EngineError>>,
    ) {
        let backend = match backend() {
            Ok(b) => b,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let n_ctx = self.per_slot * self.slots;
        let n_batch = n_ctx.min(2048);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch.min(512))
            .with_n_seq_max(self.slots)
            // One KV buffer shared by the slots: measurably faster at 8
            // streams than one per sequence (README, Benchmarks).
            .with_kv_unified(true)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let model = self.tokenizer.model.clone();
        let mut ctx = match model.new_context(backend, params) {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(EngineError::Load(format!("llama context: {e}"))));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut batch = LlamaBatch::new(n_batch as usize, self.slots as i32);
        let mut active: Vec<Seq> = Vec::new();
        let mut free: Vec<i32> = (0..self.slots as i32).rev().collect();

        loop {
            // Admit new work while slots are free; block only when idle.
            while let Some(&seq_id) = free.last() {
                let job = if active.is_empty() {
                    match jobs.blocking_recv() {
                        Some(j) => j,
                        None => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                match self.admit(job, seq_id) {
                    Some(seq) => {
                        free.pop();
                        active.push(seq);
                    }
                    None => {
                        self.in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            if active.is_empty() {
                continue;
            }

            // Build one batch: a decode token for every generating sequence,
            // then prompt chunks under the remaining budget.
            batch.clear();
            let mut budget = n_batch as usize;
            let mut add_failed = false;
            for seq in active.iter_mut() {
                seq.logits_at = None;
                if let Some(tok) = seq.last {
                    if budget == 0 {
                        continue;
                    }
                    let idx = batch.n_tokens();
                    add_failed |= batch.add(tok, seq.n_past, &[seq.seq_id], true).is_err();
                    seq.logits_at = Some(idx);
                    seq.n_past += 1;
                    budget -= 1;
                }
            }
            for seq in active.iter_mut() {
                if seq.pending.is_empty() || budget == 0 {
                    continue;
                }
                let take = seq.pending.len().min(budget);
                let last_chunk = take == seq.pending.len();
                for (i, tok) in seq.pending.drain(..take).enumerate() {
                    let want_logits = last_chunk && i + 1 == take;
                    if want_logits {
                        seq.logits_at = Some(batch.n_tokens());
                    }
                    add_failed |= batch
                        .add(tok, seq.n_past, &[seq.seq_id], want_logits)
                        .is_err();
                    seq.n_past += 1;
                }
                budget -= take;
            }
            let decoded = !add_failed && batch.n_tokens() > 0 && ctx.decode(&mut batch).is_ok();
            if !decoded {
                tracing::error!("llama decode failed; failing the running batch");
                for seq in active.drain(..) {
                    let _ = seq.tx.try_send(InvokeEvent::Error {
                        message: "engine decode failed".into(),
                        retryable: true,
                    });
                    clear_seq(&mut ctx, seq.seq_id);
                    free.push(seq.seq_id);
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                continue;
            }

            let mut i = 0;
            while i < active.len() {
                let outcome = self.step(&ctx, &mut active[i]);
                let done = match outcome {
                    Step::Continue => false,
                    Step::Finished(reason) => {
                        let seq = &mut active[i];
                        let tail = seq.utf8.finish();
                        let mut step = seq.stop.push(&tail);
                        let reason = if step.stopped {
                            FinishReason::Stop
                        } else {
                            step.emit.push_str(&seq.stop.finish());
                            reason
                        };
                        finish(seq, step.emit, reason);
                        true
                    }
                    Step::StopMatched => {
                        // Tokens swallowed by the stop sequence were still generated.
                        finish(&active[i], String::new(), FinishReason::Stop);
                        true
                    }
                    Step::Dropped => true,
                };
                if done {
                    let seq = active.swap_remove(i);
                    clear_seq(&mut ctx, seq.seq_id);
                    free.push(seq.seq_id);
                    self.in_flight.fetch_sub(1, Ordering::SeqCst);
                } else {
                    i += 1;
                }
            }
        }
    }

    /// Prepares a request for the batch, or answers it with an error.
    fn admit(&self, job: Job, seq_id: i32) -> Option<Seq> {
        let Job { request, tx } = job;
        if tx.is_closed() {
            return None;
        }
        let fail = |message: String| {
            let _ = tx.try_send(InvokeEvent::Error {
                message,
                retryable: false,
            });
        };
        let text = match self.tokenizer.render(&request.input, &request.continuation) {
            Ok(t) => t,
            Err(e) => {
                fail(e);
                return None;
            }
        };
        let tokens = self.tokenizer.tokenize(&text);
        let n = tokens.len() as u32;
        if n == 0 {
            fail("the prompt is empty".into());
            return None;
        }
        if n >= self.per_slot {
            fail(format!(
                "this model's context is {} tokens per request, the prompt has {n}",
                self.per_slot
            ));
            return None;
        }
        let room = self.per_slot - n;
        let max_new = request.params.max_tokens.map_or(room, |m| m.min(room));
        let p = &request.params;
        let sampler = if p.temperature <= 0.0 {
            LlamaSampler::greedy()
        } else {
            let seed = p.seed.map_or_else(rand_seed, |s| s as u32);
            LlamaSampler::chain_simple([
                LlamaSampler::top_p(p.top_p.clamp(0.0, 1.0), 1),
                LlamaSampler::temp(p.temperature),
                LlamaSampler::dist(seed),
            ])
        };
        tracing::debug!(request_id = %request.request_id, prompt_tokens = n, "admitted");
        if tx
            .try_send(InvokeEvent::Started { prompt_tokens: n })
            .is_err()
        {
            return None;
        }
        Some(Seq {
            seq_id,
            tx,
            sampler,
            pending: tokens,
            n_past: 0,
            prompt_tokens: n,
            generated: 0,
            max_new,
            last: None,
            logits_at: None,
            unreported: 0,
            utf8: Utf8Assembler::default(),
            stop: StopMatcher::new(request.params.stop.clone()),
        })
    }

    /// Samples the next token of a sequence whose logits are ready.
    fn step(&self, ctx: &LlamaContext<'_>, seq: &mut Seq) -> Step {
        if seq.tx.is_closed() {
            return Step::Dropped;
        }
        let Some(idx) = seq.logits_at else {
            return Step::Continue;
        };
        if seq.max_new == 0 {
            return Step::Finished(FinishReason::Length);
        }
        let token = seq.sampler.sample(ctx, idx);
        let vocab = self.tokenizer.model.vocab();
        if vocab.is_eog(token) {
            return Step::Finished(FinishReason::Stop);
        }
        seq.generated += 1;
        seq.unreported += 1;
        seq.last = Some(token);
        let text = seq.utf8.push(&vocab.token_to_piece(token, false, None));
        let step = seq.stop.push(&text);
        if !step.emit.is_empty() {
            let tokens = std::mem::take(&mut seq.unreported);
            if seq
                .tx
                .try_send(InvokeEvent::Text {
                    text: step.emit,
                    tokens,
                })
                .is_err()
            {
                return Step::Dropped;
            }
        }
        if step.stopped {
            return Step::StopMatched;
        }
        if seq.generated >= seq.max_new || seq.n_past as u32 + 1 >= self.per_slot {
            return Step::Finished(FinishReason::Length);
        }
        Step::Continue
    }
}

fn finish(seq: &Seq, text: String, reason: FinishReason) {
    if !text.is_empty() || seq.unreported > 0 {
        let _ = seq.tx.try_send(InvokeEvent::Text {
            text,
            tokens: seq.unreported,
        });
    }
    let _ = seq.tx.try_send(InvokeEvent::Done {
        finish_reason: reason,
        prompt_tokens: seq.prompt_tokens,
        completion_tokens: seq.generated,
    });
}

fn clear_seq(ctx: &mut LlamaContext<'_>, seq_id: i32) {
    let _ = ctx.clear_kv_cache_seq(Some(seq_id as u32), None, None);
}

fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() as u32
}
