//! `sluice up`: a whole local network in one process — a validator and N
//! miners, each miner with its own engine and its own HTTP port, talking
//! over real loopback HTTP exactly as separate machines would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sluice_miner::{EngineConfig, MinerConfig};
use sluice_store::Store;
use sluice_validator::ValidatorConfig;
use tokio_util::sync::CancellationToken;

use crate::{default_data_dir, engine_for, shutdown_signal};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the database, keys and model live.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the validator's API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Number of miners.
    #[arg(long, default_value_t = 2)]
    pub miners: u32,
    /// Serve this local GGUF instead of the default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent sequences per miner.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// CPU threads per miner (default: cores / miners).
    #[arg(long)]
    pub threads: Option<u32>,
}

/// Returns the bootstrap key, reusing the one in `DIR/api-key` while it
/// is still valid.
async fn bootstrap_key(store: &Store, data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("api-key");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if store.verify_key(existing.trim()).await?.is_some() {
            return Ok(existing.trim().to_string());
        }
    }
    let user = store.create_user("local", "paid").await?;
    // A starting balance so the local network is usable at once.
    store
        .add_funds(&user, 5 * sluice_store::ledger::PICO_PER_USD)
        .await?;
    let (_, key) = store.create_key(&user, "bootstrap").await?;
    sluice_validator::write_private(&path, &format!("{key}\n"))?;
    Ok(key)
}

/// The local network's admin key, kept in `DIR/admin-key` (mode 0600).
fn admin_key(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("admin-key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        if k.trim().len() >= 16 {
            return Ok(k.trim().to_string());
        }
    }
    let key = format!("adm_{}", sluice_validator::api::new_request_id());
    sluice_validator::write_private(&path, &format!("{key}\n"))?;
    Ok(key)
}

pub async fn run(args: UpArgs) -> Result<()> {
    if args.miners == 0 {
        anyhow::bail!("--miners must be at least 1");
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let shutdown = CancellationToken::new();

    let admin_key = admin_key(&data_dir)?;
    let vcfg = ValidatorConfig {
        listen: args.listen,
        data_dir: data_dir.clone(),
        admin_key: Some(admin_key),
        ..Default::default()
    };
    let validator = sluice_validator::start(vcfg, shutdown.clone()).await?;
    let base = format!("http://{}", validator.addr);
    let key = bootstrap_key(&validator.state.store, &data_dir).await?;

    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2);
    let threads = args.threads.unwrap_or((cores / args.miners).max(1));
    let mut miners = Vec::new();
    for i in 0..args.miners {
        let cfg = MinerConfig {
            validator: base.clone(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            data_dir: data_dir.join("miners").join(format!("miner-{i}")),
            engine: EngineConfig::Llama {
                model: args.model.clone(),
                model_id: None,
                slots: args.slots,
                threads: Some(threads),
                context_per_slot: 2048,
            },
        };
        let engine = engine_for(&cfg, &data_dir).await?;
        eprintln!("miner {i}: model loaded ({})", engine.info().description);
        miners.push(sluice_miner::start(cfg, engine, shutdown.clone()).await?);
    }

    // Ready once every miner is routable.
    if !validator
        .state
        .registry
        .wait_routable(args.miners as usize, Duration::from_secs(60))
        .await
    {
        anyhow::bail!("not all {} miners registered within 60 s", args.miners);
    }
    println!("ready: {base}/v1");
    println!(
        "api key: {key} (saved in {})",
        data_dir.join("api-key").display()
    );
    println!(
        "try: curl {base}/v1/chat/completions -H \"Authorization: Bearer $(cat {})\" -H 'content-type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'",
        data_dir.join("api-key").display(),
        validator.state.chute_ids().first().cloned().unwrap_or_default()
    );

    tokio::select! {
        _ = shutdown_signal() => {}
        _ = shutdown.cancelled() => {}
    }
    eprintln!("shutting down");
    shutdown.cancel();
    for m in miners {
        let _ = m.handle.await;
    }
    validator.finish().await?;
    Ok(())
}
