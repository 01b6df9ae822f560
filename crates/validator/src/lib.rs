//! The validator: OpenAI-compatible API, keys, admission and routing to
//! miners, request metadata, metrics. `start` runs the same code the
//! binary runs, so tests drive it directly.

pub mod admin;
pub mod api;
pub mod auth;
pub mod billing;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod forward;
pub mod invoke;
pub mod limits;
pub mod metrics;
pub mod miners_api;
pub mod registry;
pub mod retry;
pub mod status;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use ed25519_dalek::SigningKey;
use sluice_proto::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_ID};
use sluice_store::{now_ms, Chute, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ValidatorConfig;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::miners_api::Nonces;
use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] sluice_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(String),
}

/// Shared state behind one `Arc`: a request clones it several times (the
/// handler, its driver task, the settlement), and one reference count is
/// cheaper to move than fifteen.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub struct Shared {
    pub config: Arc<ValidatorConfig>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    /// Probes and other occasional calls.
    pub http: reqwest::Client,
    /// Invocations: one HTTP/2 connection per miner (or hyper's HTTP/1.1
    /// pool), without reqwest's per-request layers (redirect policy, URL
    /// re-parsing); see [`invoke`].
    pub invoker: Arc<invoke::Invoker>,
    pub signing_key: Arc<SigningKey>,
    /// Invocation keys shared with miners, by miner key (see
    /// [`sluice_proto::miner::pair_key`]).
    pub invoke_keys:
        Arc<std::sync::RwLock<std::collections::HashMap<String, sluice_proto::miner::InvokeKey>>>,
    /// This validator's public key, hex, as the header that names it to
    /// miners.
    pub public_key: http::HeaderValue,
    pub nonces: Arc<Nonces>,
    pub retry_budget: Arc<retry::RetryBudget>,
    pub limiter: Arc<limits::Limiter>,
    /// Identifies this process's reservations for crash recovery.
    pub replica_id: String,
    pub tasks: TaskTracker,
    chutes: Arc<RwLock<Arc<Vec<Chute>>>>,
}

impl Shared {
    pub fn chutes(&self) -> Arc<Vec<Chute>> {
        sluice_proto::sync::read(&self.chutes).clone()
    }

    pub fn chute_ids(&self) -> Vec<String> {
        self.chutes().iter().map(|c| c.model_id.clone()).collect()
    }

    /// Reloads the chute table (other replicas may have added chutes).
    pub async fn refresh_chutes(&self) {
        match self.store.list_chutes().await {
            Ok(list) => {
                if let Ok(mut c) = self.chutes.write() {
                    *c = Arc::new(list);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not reload chutes"),
        }
    }
}

/// Open reservations older than this belong to a dead replica.
const STALE_RESERVATION_MS: i64 = 3_600_000;

fn load_or_create_replica_id(path: &Path) -> Result<String, ValidatorError> {
    if let Ok(id) = std::fs::read_to_string(path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    let id = format!("replica-{}", hex::encode(b));
    std::fs::write(path, &id)
        .map_err(|e| ValidatorError::Io(format!("writing {}: {e}", path.display())))?;
    Ok(id)
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), ValidatorError> {
    sluice_proto::keyfile::write_private(path, contents).map_err(ValidatorError::Io)
}

/// Opens the configured store: PostgreSQL when a URL is set, else the
/// SQLite file in the data dir.
pub async fn open_store(config: &ValidatorConfig) -> Result<Store, ValidatorError> {
    Ok(match &config.database_url {
        Some(url) => Store::open(url).await?,
        None => Store::open_data_dir(&config.data_dir).await?,
    })
}

/// The default chute every network serves.
pub fn default_chute() -> Chute {
    Chute {
        model_id: DEFAULT_MODEL_ID.to_string(),
        engine: "gguf".into(),
        source: DEFAULT_MODEL_FILE.to_string(),
        concurrency: 4,
        price_in_micros: miners_api::DEFAULT_PRICE_IN_MICROS,
        price_out_micros: miners_api::DEFAULT_PRICE_OUT_MICROS,
        created_ms: now_ms(),
    }
}

/// A started validator.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub handle: tokio::task::JoinHandle<Result<(), ValidatorError>>,
}

/// How long [`Running::finish`] waits for the ledger's connection to close
/// once the server has ended.
const LEDGER_CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Running {
    /// Waits for the server to end (after its shutdown token is cancelled:
    /// requests in flight finish, the store closes), then, with this state
    /// dropped, for the ledger writer to close its connection (at most
    /// [`LEDGER_CLOSE_WAIT`]), so that a process exiting next leaves no
    /// `-wal` file beside an SQLite database.
    pub async fn finish(self) -> Result<(), ValidatorError> {
        let Running { state, handle, .. } = self;
        let ledger = state.store.ledger_closed();
        let result = handle
            .await
            .map_err(|e| ValidatorError::Io(format!("validator task: {e}")));
        drop(state);
        if tokio::time::timeout(LEDGER_CLOSE_WAIT, ledger)
            .await
            .is_err()
        {
            tracing::warn!(
                "the ledger's connection was still open {} s after the shutdown",
                LEDGER_CLOSE_WAIT.as_secs()
            );
        }
        result?
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/models", get(api::list_models))
        .route("/v1/usage", get(admin::usage))
        .route(
            "/admin/v1/keys",
            post(admin::create_key).get(admin::list_keys),
        )
        .route(
            "/admin/v1/keys/{key_id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route("/admin/v1/balance", post(admin::add_balance))
        .route("/admin/v1/ledger", get(admin::ledger_check))
        .route("/miner/v1/nonce", get(miners_api::nonce))
        .route("/miner/v1/register", post(miners_api::register))
        .route("/miner/v1/heartbeat", post(miners_api::heartbeat))
        .route("/health", get(health))
        .route("/status", get(status::page))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::RouteNotFound.into_response() })
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Response {
    let instances: usize = state
        .registry
        .routable_counts()
        .iter()
        .map(|(_, n)| n)
        .sum();
    axum::Json(serde_json::json!({"status": "ok", "routable_instances": instances})).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    for (model, n) in state.registry.routable_counts() {
        state
            .metrics
            .set("sluice_instances", &[("model", &model)], n as f64);
        let gate = state.registry.gate(&model);
        state.metrics.set(
            "sluice_queue_depth",
            &[("model", &model)],
            gate.waiting() as f64,
        );
    }
    state.metrics.set(
        "sluice_ledger_handovers_total",
        &[],
        state.store.ledger_handovers() as f64,
    );
    // Shown from the start (at 0), so that a rate over it is defined.
    state.metrics.inc("sluice_ledger_refusals_total", &[], 0);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Actively probes every instance's `/health`; failures take an instance
/// out of routing at once, recoveries bring it back (after its flap
/// back-off), whatever the miner's heartbeats say.
async fn probe_loop(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retry::PROBE_INTERVAL) => {}
        }
        let instances = state.registry.all();
        let probes = instances.iter().map(|inst| {
            let http = state.http.clone();
            let url = format!("{}/health", inst.endpoint.trim_end_matches('/'));
            async move {
                let ok = matches!(
                    tokio::time::timeout(retry::PROBE_TIMEOUT, http.get(&url).send()).await,
                    Ok(Ok(r)) if r.status().is_success()
                );
                (inst, ok)
            }
        });
        let results = futures_util::future::join_all(probes).await;
        let now = now_ms();
        for (inst, ok) in results {
            if ok {
                if inst.probe_ok(now) {
                    tracing::info!(instance = %inst.id, "instance back in routing");
                    state.registry.dispatch(&inst.model);
                }
            } else if !inst.is_probe_down() {
                tracing::warn!(instance = %inst.id, "health probe failed; instance out of routing");
                inst.probe_failed(now);
            } else {
                inst.probe_failed(now);
            }
        }
    }
}

/// Binds, migrates, seeds the default chute and serves until `shutdown`.
pub async fn start(
    config: ValidatorConfig,
    shutdown: CancellationToken,
) -> Result<Running, ValidatorError> {
    config.validate().map_err(ValidatorError::Config)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ValidatorError::Io(format!("creating {}: {e}", config.data_dir.display())))?;
    let store = open_store(&config).await?;
    store.ensure_chute(&default_chute()).await?;
    let signing_key =
        sluice_proto::keyfile::load_or_create_key(&config.data_dir.join("validator.key"))
            .map_err(ValidatorError::Io)?;
    let replica_id = load_or_create_replica_id(&config.data_dir.join("replica-id"))?;
    // Reservations this replica held when it last stopped belong to
    // requests that never finished: release them (nothing was charged).
    let released = store.recover(&replica_id).await?;
    if released > 0 {
        tracing::warn!(
            released,
            "released reservations left by an unclean shutdown"
        );
    }
    let limiter = match &config.redis_url {
        Some(url) => limits::Limiter::redis(url)
            .await
            .map_err(|e| ValidatorError::Config(format!("redis_url: {e}")))?,
        None => {
            if config.database_url.is_some() {
                tracing::warn!("PostgreSQL without redis_url: per-minute rate limits are per replica (daily quotas stay exact)");
            }
            limits::Limiter::local()
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ValidatorError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ValidatorError::Io(e.to_string()))?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ValidatorError::Io(format!("http client: {e}")))?;
    let invoker = Arc::new(invoke::Invoker::new(config.miner_http2));
    let state = AppState(Arc::new(Shared {
        registry: Arc::new(Registry::new(
            Duration::from_secs_f64(config.heartbeat_timeout_s),
            config.max_queue_per_chute,
        )),
        config: Arc::new(config),
        auth: Arc::new(Auth::new(store.clone())),
        store,
        metrics: Arc::new(Metrics::default()),
        http,
        invoker,
        // Hex is always a valid header value.
        public_key: http::HeaderValue::try_from(sluice_proto::miner::public_hex(&signing_key))
            .unwrap_or_else(|_| http::HeaderValue::from_static("")),
        signing_key: Arc::new(signing_key),
        invoke_keys: Arc::default(),
        nonces: Arc::new(Nonces::default()),
        retry_budget: Arc::new(retry::RetryBudget::default()),
        limiter: Arc::new(limiter),
        replica_id,
        tasks: TaskTracker::new(),
        chutes: Arc::new(RwLock::new(Arc::new(Vec::new()))),
    }));
    state.refresh_chutes().await;
    // Other replicas may add chutes: reload them periodically.
    let refresher = state.clone();
    let stop = shutdown.clone();
    state.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {
                    refresher.refresh_chutes().await;
                    // Reservations of replicas that died and never came back.
                    if let Err(e) = refresher.store.release_stale(STALE_RESERVATION_MS).await {
                        tracing::warn!(error = %e, "could not release stale reservations");
                    }
                }
            }
        }
    });
    let prober = state.clone();
    let stop = shutdown.clone();
    state
        .tasks
        .spawn(async move { probe_loop(prober, stop).await });
    let app = router(state.clone());
    let serve_state = state.clone();
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener.tap_io(set_nodelay), app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|e| ValidatorError::Io(format!("server: {e}")));
        // Let in-flight drivers write their records before closing the store.
        serve_state.tasks.close();
        serve_state.tasks.wait().await;
        serve_state.store.close().await;
        result
    });
    tracing::info!(%addr, "validator listening");
    Ok(Running {
        addr,
        state,
        handle,
    })
}

/// Token-sized writes must not wait for Nagle's algorithm.
fn set_nodelay(stream: &mut tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::trace!(error = %e, "could not set TCP_NODELAY");
    }
}
