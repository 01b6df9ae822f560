//! Commands of the `sluice` binary. Each one builds typed configuration
//! (TOML file, then `SLUICE_*` environment, then flags) and calls into the
//! library crates.

mod bench;
mod drill;
mod up;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sluice_engine::model_fetch;
use sluice_miner::{EngineConfig, MinerConfig};
use sluice_store::Store;
use sluice_validator::ValidatorConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Sluice: a decentralized, serverless AI inference network"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a complete local network: one validator and N miners serving the default model.
    Up(up::UpArgs),
    /// Run a validator (public OpenAI-compatible API, routing, keys).
    Validator(ValidatorArgs),
    /// Run a miner that serves a model and registers with a validator.
    Miner(MinerArgs),
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Fetch and inspect models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Balances (admin): add funds, show a user's balance.
    Balance {
        #[command(subcommand)]
        command: BalanceCommand,
    },
    /// Usage per UTC day and model for a user.
    Usage(UsageArgs),
    /// Check that the ledger balances.
    Ledger(StoreArgs),
    /// Resilience drills against a fresh local network.
    Drill {
        #[command(subcommand)]
        command: drill::DrillCommand,
    },
    /// Benchmarks against peers: `bench gateway` (vs LiteLLM), `bench engine` (vs llama-server).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

/// Where state lives by default: `$XDG_DATA_HOME/sluice` or `~/.local/share/sluice`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("sluice")
}

#[derive(Args, Debug)]
pub struct ValidatorArgs {
    /// TOML config file (flags and SLUICE_* variables override it).
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the public API.
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// postgres://... to share state with other replicas (default: SQLite in the data dir).
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// redis://... to share rate-limit windows with other replicas.
    #[arg(long, env = "SLUICE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Enables the admin API (`/admin/v1/*`) with this bearer key.
    #[arg(long, env = "SLUICE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Args, Debug)]
pub struct MinerArgs {
    #[arg(long, env = "SLUICE_MINER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Base URL of the validator.
    #[arg(long, env = "SLUICE_VALIDATOR")]
    pub validator: Option<String>,
    /// Address this miner serves invocations on.
    #[arg(long, env = "SLUICE_MINER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL the validator should use to reach this miner.
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    #[arg(long, env = "SLUICE_MINER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve this local GGUF instead of the default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Public model id for --model (default: the file name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Concurrent sequences (continuous batching slots).
    #[arg(long)]
    pub slots: Option<u32>,
    /// CPU threads for decoding.
    #[arg(long)]
    pub threads: Option<u32>,
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a user and an API key; the key is printed once.
    Create {
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "SLUICE_DATABASE_URL")]
        database_url: Option<String>,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, default_value = "free", value_parser = ["free", "paid"])]
        tier: String,
    },
    /// List keys (ids and owners, never secrets).
    List {
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "SLUICE_DATABASE_URL")]
        database_url: Option<String>,
    },
    /// Revoke a key by id.
    Revoke {
        key_id: String,
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        #[arg(long, env = "SLUICE_DATABASE_URL")]
        database_url: Option<String>,
    },
}

/// Where the store is: a data dir's SQLite file or a PostgreSQL URL.
#[derive(Args, Debug)]
pub struct StoreArgs {
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// Identifies a user directly or through one of their keys.
#[derive(Args, Debug)]
pub struct UserArgs {
    #[arg(long, conflicts_with = "key_id", required_unless_present = "key_id")]
    pub user: Option<String>,
    #[arg(long)]
    pub key_id: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BalanceCommand {
    /// Add funds to a user's balance.
    Add {
        #[command(flatten)]
        who: UserArgs,
        /// Dollars, e.g. 10 or 2.50.
        #[arg(long)]
        usd: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Show a user's balance.
    Show {
        #[command(flatten)]
        who: UserArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    pub who: UserArgs,
    #[arg(long, default_value_t = 30)]
    pub days: u32,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Fetch the default model into the data dir (and the per-user cache).
    Pull {
        #[arg(long, env = "SLUICE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Count the tokens the engine would feed the model for a text.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        /// Treat the text as one user message and apply the chat template.
        #[arg(long)]
        chat: bool,
        text: String,
    },
}

impl Cli {
    /// Servers log at info; one-shot tools (drills, benchmarks) only warn.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Drill { .. } | Command::Bench { .. } => "warn",
            _ => "info",
        }
    }

    /// Whether the command runs on a one-thread runtime: the gateway
    /// benchmark's load generator and mock upstream share two cores with
    /// what they measure, and a second worker thread in each cost more in
    /// wake-ups between the workers than it added (see the README's
    /// Benchmarks section). `bench sluice-gateway` gives the validator and
    /// the miner runtimes of their own.
    pub fn single_threaded(&self) -> bool {
        use bench::BenchCommand as B;
        matches!(
            &self.command,
            Command::Bench {
                command: B::Gateway(_) | B::MockUpstream(_) | B::SluiceGateway(_)
            }
        )
    }
}

pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Validator(args) => run_validator(args).await,
        Command::Miner(args) => run_miner(args).await,
        Command::Keys { command } => keys(command).await,
        Command::Models { command } => models(command).await,
        Command::Balance { command } => balance(command).await,
        Command::Usage(args) => usage(args).await,
        Command::Ledger(args) => ledger(args).await,
        Command::Drill { command } => drill::run(command).await,
        Command::Bench { command } => bench::run(command).await,
    }
}

/// Resolves when Ctrl-C or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))
}

pub fn validator_config(args: &ValidatorArgs) -> Result<ValidatorConfig> {
    let mut cfg = match &args.config {
        Some(p) => ValidatorConfig::from_toml(&read_config(p)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => ValidatorConfig {
            data_dir: default_data_dir(),
            ..Default::default()
        },
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(u) = &args.database_url {
        cfg.database_url = Some(u.clone());
    }
    if let Some(u) = &args.redis_url {
        cfg.redis_url = Some(u.clone());
    }
    if let Some(k) = &args.admin_key {
        cfg.admin_key = Some(k.clone());
    }
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(cfg)
}

async fn run_validator(args: ValidatorArgs) -> Result<()> {
    let cfg = validator_config(&args)?;
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let running = sluice_validator::start(cfg, shutdown.clone()).await?;
    println!("ready: http://{}/v1", running.addr);
    shutdown_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    running.finish().await?;
    Ok(())
}

pub fn miner_config(args: &MinerArgs) -> Result<MinerConfig> {
    let mut cfg = match &args.config {
        Some(p) => MinerConfig::from_toml(&read_config(p)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => MinerConfig {
            data_dir: default_data_dir().join("miner"),
            ..Default::default()
        },
    };
    if let Some(v) = &args.validator {
        cfg.validator = v.clone();
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(a) = &args.advertise {
        cfg.advertise = Some(a.clone());
    }
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let EngineConfig::Llama {
        model,
        model_id,
        slots,
        threads,
        ..
    } = &mut cfg.engine
    {
        if let Some(m) = &args.model {
            *model = Some(m.clone());
        }
        if let Some(id) = &args.model_id {
            *model_id = Some(id.clone());
        }
        if let Some(s) = args.slots {
            *slots = s;
        }
        if let Some(t) = args.threads {
            *threads = Some(t);
        }
    } else if args.model.is_some() || args.slots.is_some() {
        bail!("--model and --slots apply to the llama engine only");
    }
    cfg.validate()
        .and_then(|()| cfg.check_reachable())
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(cfg)
}

/// Builds a miner's engine, fetching the default model when none is given.
pub async fn engine_for(
    cfg: &MinerConfig,
    model_dir: &Path,
) -> Result<Arc<dyn sluice_engine::Engine>> {
    let needs_default = matches!(&cfg.engine, EngineConfig::Llama { model: None, .. });
    let model_path = if needs_default {
        let dir = model_dir.to_path_buf();
        Some(
            tokio::task::spawn_blocking(move || {
                model_fetch::ensure_default_model(&dir, &mut |line| eprintln!("{line}"))
            })
            .await??,
        )
    } else {
        None
    };
    let engine_cfg = cfg.engine.clone();
    let engine = tokio::task::spawn_blocking(move || {
        sluice_miner::config::build_engine(&engine_cfg, model_path)
    })
    .await??;
    Ok(engine)
}

async fn run_miner(args: MinerArgs) -> Result<()> {
    let cfg = miner_config(&args)?;
    if args.check_config {
        println!("configuration ok");
        return Ok(());
    }
    let engine = engine_for(&cfg, &cfg.data_dir).await?;
    let shutdown = CancellationToken::new();
    let running = sluice_miner::start(cfg, engine, shutdown.clone()).await?;
    println!("miner serving on {}", running.endpoint);
    shutdown_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    running.handle.await.context("miner task")??;
    Ok(())
}

async fn open_store(data_dir: Option<PathBuf>, database_url: Option<String>) -> Result<Store> {
    Ok(match database_url {
        Some(url) => Store::open(&url).await?,
        None => Store::open_data_dir(&data_dir.unwrap_or_else(default_data_dir)).await?,
    })
}

async fn keys(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create {
            data_dir,
            database_url,
            name,
            tier,
        } => {
            let store = open_store(data_dir, database_url).await?;
            let user = store.create_user(&name, &tier).await?;
            let (_, key) = store.create_key(&user, &name).await?;
            println!("{key}");
            eprintln!("created a {tier}-tier key for user {user}; it is shown only once");
        }
        KeysCommand::List {
            data_dir,
            database_url,
        } => {
            let store = open_store(data_dir, database_url).await?;
            println!(
                "{:<18} {:<20} {:<6} {:<8} name",
                "key id", "user", "tier", "state"
            );
            for k in store.list_keys().await? {
                let state = if k.revoked { "revoked" } else { "active" };
                println!(
                    "{:<18} {:<20} {:<6} {:<8} {}",
                    k.key_id, k.user_id, k.tier, state, k.name
                );
            }
        }
        KeysCommand::Revoke {
            key_id,
            data_dir,
            database_url,
        } => {
            let store = open_store(data_dir, database_url).await?;
            store.revoke_key(&key_id).await?;
            println!("revoked {key_id}");
        }
    }
    Ok(())
}

async fn resolve_user(store: &Store, who: &UserArgs) -> Result<String> {
    match (&who.user, &who.key_id) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(k)) => Ok(store
            .find_key(k)
            .await?
            .with_context(|| format!("no key {k}"))?
            .user_id),
        (None, None) => bail!("name a user with --user or --key-id"),
    }
}

async fn balance(command: BalanceCommand) -> Result<()> {
    use sluice_store::ledger::{format_usd, parse_usd};
    match command {
        BalanceCommand::Add { who, usd, store } => {
            let store = open_store(store.data_dir, store.database_url).await?;
            let user = resolve_user(&store, &who).await?;
            let amount = parse_usd(&usd).map_err(anyhow::Error::msg)?;
            store.add_funds(&user, amount).await?;
            let b = store.balance(&user).await?;
            println!(
                "{user}: balance {} (available {})",
                format_usd(b.ledger),
                format_usd(b.available())
            );
        }
        BalanceCommand::Show { who, store } => {
            let store = open_store(store.data_dir, store.database_url).await?;
            let user = resolve_user(&store, &who).await?;
            let b = store.balance(&user).await?;
            println!(
                "{user}: balance {} (reserved {}, available {})",
                format_usd(b.ledger),
                format_usd(b.reserved),
                format_usd(b.available())
            );
        }
    }
    Ok(())
}

async fn usage(args: UsageArgs) -> Result<()> {
    use sluice_store::ledger::format_usd;
    let store = open_store(args.store.data_dir, args.store.database_url).await?;
    let user = resolve_user(&store, &args.who).await?;
    let since = sluice_store::now_ms() - args.days as i64 * 86_400_000;
    println!(
        "{:<10} {:<40} {:>8} {:>12} {:>12} {:>14}",
        "day", "model", "requests", "prompt tok", "output tok", "cost"
    );
    for r in store.usage(&user, since).await? {
        println!(
            "{:<10} {:<40} {:>8} {:>12} {:>12} {:>14}",
            r.day,
            r.model,
            r.requests,
            r.prompt_tokens,
            r.completion_tokens,
            format_usd(r.cost)
        );
    }
    Ok(())
}

async fn ledger(args: StoreArgs) -> Result<()> {
    use sluice_store::ledger::format_usd;
    let store = open_store(args.data_dir, args.database_url).await?;
    let c = store.ledger_check().await?;
    let balanced = c.is_balanced();
    println!("entries:           {}", c.entries);
    println!("settled requests:  {}", c.settlements);
    println!("open reservations: {}", c.open_reservations);
    println!("usage debits:      {}", format_usd(c.user_debits));
    println!("miner credits:     {}", format_usd(c.miner_credits));
    println!("fees:              {}", format_usd(c.fees));
    println!(
        "ledger: {}",
        if balanced { "balanced" } else { "UNBALANCED" }
    );
    if !balanced {
        bail!("the ledger does not balance");
    }
    Ok(())
}

async fn models(command: ModelsCommand) -> Result<()> {
    match command {
        ModelsCommand::Pull { data_dir } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let path = tokio::task::spawn_blocking(move || {
                model_fetch::ensure_default_model(&dir, &mut |line| eprintln!("{line}"))
            })
            .await??;
            println!("{}", path.display());
        }
        ModelsCommand::Tokenize { model, chat, text } => {
            let count = tokio::task::spawn_blocking(move || -> Result<usize> {
                let tok = sluice_engine::llama::Tokenizer::load(&model, true)?;
                let input = if chat {
                    sluice_proto::miner::PromptInput::Chat {
                        messages: vec![sluice_proto::miner::PromptMessage {
                            role: "user".into(),
                            content: text,
                        }],
                    }
                } else {
                    sluice_proto::miner::PromptInput::Text { prompt: text }
                };
                let rendered = tok.render(&input, "").map_err(anyhow::Error::msg)?;
                Ok(tok.tokenize(&rendered).len())
            })
            .await??;
            println!("{count}");
        }
    }
    Ok(())
}
