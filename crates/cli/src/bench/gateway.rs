//! `sluice bench gateway`: three ways to reach the same zero-delay mock
//! upstream — directly, through Sluice (validator + one miner running the
//! upstream engine) and through LiteLLM's proxy — measured in the same
//! window, each in its own process so `/proc` charges every gateway exactly
//! its own CPU (the load generator runs in this process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use sluice_bench::load::{self, LoadResult, LoadSpec, Target};
use sluice_bench::procstat;
use sluice_bench::stats::{median, ms, Summary};
use sluice_miner::{EngineConfig, MinerConfig};
use sluice_validator::ValidatorConfig;
use tokio_util::sync::CancellationToken;

use super::peers::{LiteLlm, LITELLM_VERSION};
use super::{
    free_port, machine_line, num, per_run, progress, ratio, targets_line, wait_http_ok, ChildProc,
    Goal,
};

/// The model name every target serves.
const MODEL: &str = "mock-model";
/// Latency bound for the "max requests/s" figure.
const SLO_P99_US: u64 = 10_000;
/// Median steal above this (percent) in a window makes the report say the
/// host was busy.
const STEAL_WARN_PCT: f64 = 5.0;
/// The project's targets for the final line's Sluice figures, and the
/// decimals the final line prints them with (they are judged as printed).
const GOALS: [Goal; 3] = [
    Goal {
        key: "sluice_p99_added_ms",
        bound: 0.3,
        at_most: true,
        decimals: 3,
    },
    Goal {
        key: "sluice_cpu_us_per_req",
        bound: 100.0,
        at_most: true,
        decimals: 0,
    },
    Goal {
        key: "rps_ratio",
        bound: 100.0,
        at_most: false,
        decimals: 2,
    },
];

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// A few requests per step, LiteLLM only if already installed: checks the harness, not the numbers.
    #[arg(long)]
    pub smoke: bool,
    /// Repetitions; every figure is the median over them.
    #[arg(long)]
    pub runs: Option<usize>,
    /// Leave LiteLLM out.
    #[arg(long)]
    pub no_litellm: bool,
    /// Concurrent upstream requests the Sluice miner may hold.
    #[arg(long, default_value_t = 256)]
    pub capacity: u32,
}

#[derive(Args, Debug)]
pub struct SluiceGatewayArgs {
    /// Base URL of the OpenAI-compatible upstream.
    #[arg(long)]
    pub upstream: String,
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub capacity: u32,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    #[arg(long, default_value = MODEL)]
    pub model_id: String,
}

/// The hidden `bench sluice-gateway`: a validator and one miner whose
/// engine forwards to `--upstream`, a fresh key, then `ready:` on stdout.
///
/// The validator and the miner each run on a runtime of their own with one
/// thread, as two processes given a core each would. On one shared
/// two-worker runtime, tokio's workers woke each other several times per
/// request (about a fifth more CPU per request at concurrency 32; see
/// docs/benchmarks-history.md).
pub async fn serve_sluice(args: SluiceGatewayArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let shutdown = CancellationToken::new();
    // Rate limits would cap the measured throughput: lift them for the
    // benchmark key (the limiter still runs on every request).
    let vcfg = ValidatorConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        paid_rpm: 1_000_000_000,
        paid_tpm: 1_000_000_000_000,
        ..Default::default()
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let validator = own_runtime("validator", async move {
        let validator = sluice_validator::start(vcfg, stop).await?;
        let store = &validator.state.store;
        let user = store.create_user("bench", "paid").await?;
        let (_, key) = store.create_key(&user, "bench").await?;
        // $1,000 in pico-dollars: far more than any run spends.
        store.add_funds(&user, 1_000_000_000_000_000).await?;
        let registry = validator.state.registry.clone();
        let _ = ready_tx.send((validator.addr, key, registry));
        validator.handle.await.context("validator task")??;
        Ok(())
    })?;
    let Ok((addr, key, registry)) = ready_rx.await else {
        return Err(join(validator)
            .await
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the validator stopped before it was ready")));
    };
    let base = format!("http://{addr}");
    let mcfg = MinerConfig {
        validator: base.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: None,
        data_dir: args.data_dir.join("miner"),
        engine: EngineConfig::Upstream {
            url: args.upstream.clone(),
            model_id: args.model_id.clone(),
            capacity: args.capacity,
            api_key: None,
        },
    };
    let stop = shutdown.clone();
    let miner = own_runtime("miner", async move {
        let engine = sluice_miner::config::build_engine(&mcfg.engine, None)?;
        let miner = sluice_miner::start(mcfg, engine, stop).await?;
        miner.handle.await.context("miner task")??;
        Ok(())
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while registry
        .routable_counts()
        .iter()
        .map(|(_, n)| n)
        .sum::<usize>()
        == 0
    {
        if miner.is_finished() || validator.is_finished() {
            shutdown.cancel();
            join(miner).await?;
            join(validator).await?;
            bail!("the gateway stopped while the miner registered");
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            let _ = join(miner).await;
            let _ = join(validator).await;
            bail!("the miner did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("api key: {key}");
    println!("ready: {base}");
    tokio::select! {
        _ = crate::shutdown_signal() => {}
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    let miner = join(miner).await;
    join(validator).await?;
    miner
}

/// Runs `fut` to completion on a single-threaded runtime on a thread of
/// its own.
fn own_runtime<F>(name: &str, fut: F) -> Result<std::thread::JoinHandle<Result<()>>>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || rt.block_on(fut))?)
}

/// Waits for a thread from [`own_runtime`] without blocking this runtime.
async fn join(thread: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a gateway thread panicked"))?
    })
    .await?
}

/// How much load each step applies.
struct Plan {
    runs: usize,
    warmup: usize,
    c1: LoadSpec,
    /// The c=1 step is split into this many slices, which direct and
    /// Sluice take in turn (see [`measure_c1`]).
    c1_slices: usize,
    c32: LoadSpec,
    stream: LoadSpec,
    /// Extra concurrency levels for the latency-bounded throughput sweep
    /// (c=1 and c=32 come from the steps above).
    sweep: Vec<LoadSpec>,
}

impl Plan {
    fn new(smoke: bool, runs: Option<usize>) -> Plan {
        let spec = |concurrency, requests, secs| LoadSpec {
            concurrency,
            requests,
            max_duration: Duration::from_secs_f64(secs),
        };
        if smoke {
            return Plan {
                runs: runs.unwrap_or(1),
                warmup: 8,
                c1: spec(1, 20, 5.0),
                c1_slices: 2,
                c32: spec(32, 64, 5.0),
                stream: spec(1, 10, 5.0),
                sweep: vec![spec(4, 16, 2.0)],
            };
        }
        Plan {
            runs: runs.unwrap_or(3),
            warmup: 200,
            // The p99 of 500 requests rested on its five slowest; 3,000
            // give it thirty (a slow gateway stops at the time cap).
            c1: spec(1, 3_000, 6.0),
            c1_slices: 6,
            c32: spec(32, 30_000, 12.0),
            stream: spec(1, 1_000, 6.0),
            sweep: [2, 4, 8, 16]
                .into_iter()
                .map(|c| spec(c, usize::MAX, 1.5))
                .collect(),
        }
    }
}

/// One way to reach the mock, and the process to charge CPU to.
struct Gateway {
    name: &'static str,
    plain: Target,
    stream: Target,
    pid: u32,
}

impl Gateway {
    fn new(name: &'static str, base: &str, bearer: Option<String>, pid: u32) -> Gateway {
        let url = format!("{base}/v1/chat/completions");
        let messages = serde_json::json!([{"role": "user", "content": "Say hello."}]);
        let plain = serde_json::json!({"model": MODEL, "messages": messages, "max_tokens": 16});
        let stream = serde_json::json!({
            "model": MODEL, "messages": messages, "max_tokens": 16,
            "stream": true, "stream_options": {"include_usage": true},
        });
        Gateway {
            name,
            plain: Target {
                url: url.clone(),
                bearer: bearer.clone(),
                body: Bytes::from(plain.to_string()),
                stream: false,
            },
            stream: Target {
                url,
                bearer,
                body: Bytes::from(stream.to_string()),
                stream: true,
            },
            pid,
        }
    }
}

/// What one run measured for one gateway.
#[derive(Debug, Clone, Default)]
struct Measured {
    c1: Summary,
    c32: Summary,
    rps32: f64,
    cpu_us_per_req: Option<f64>,
    /// The load generator's own CPU per request (this process).
    loadgen_cpu_us_per_req: Option<f64>,
    /// The share of the machine's cores left idle during the c=32 window
    /// (percent): above a few, throughput was bound by something other
    /// than the cores (a thread they waited on, where the scheduler put it).
    idle_pct32: Option<f64>,
    /// The share of the cores' time the hypervisor gave to others during
    /// the c=1 and the c=32 windows (percent): the host's share of a slow
    /// window, which the gateway's figures cannot show.
    steal_pct1: Option<f64>,
    steal_pct32: Option<f64>,
    /// The gateway's own threads at c=32: CPU per request by thread name.
    threads32: Vec<(String, f64)>,
    ttft: Summary,
    /// (concurrency, requests/s, p99 µs) for every level tried.
    sweep: Vec<(usize, f64, u64)>,
    errors: u64,
    first_error: Option<String>,
}

impl Measured {
    fn slo_rps(&self) -> Option<f64> {
        self.sweep
            .iter()
            .filter(|(_, _, p99)| *p99 <= SLO_P99_US)
            .map(|(_, rps, _)| *rps)
            .reduce(f64::max)
    }

    fn absorb(&mut self, r: &LoadResult) {
        self.errors += r.errors;
        if self.first_error.is_none() {
            self.first_error = r.first_error.clone();
        }
    }
}

/// One gateway's c=1 step, gathered from its slices.
#[derive(Debug, Default)]
struct C1 {
    load: LoadResult,
    /// The machine's ticks during this gateway's slices only.
    ticks: procstat::MachineTicks,
}

impl C1 {
    /// Runs `spec` against `target` and adds the run and the machine's
    /// ticks during it to what this gateway's step has gathered.
    async fn take(&mut self, target: &Target, spec: LoadSpec) {
        let before = procstat::MachineTicks::now();
        let r = load::run(target, spec).await;
        if let Some((a, b)) = before.zip(procstat::MachineTicks::now()) {
            self.ticks.add_window(&a, &b);
        }
        self.load.merge(r);
    }
}

/// The c=1 step of the gateways named in `turns`, in slices taken in
/// turn: their c=1 figures then come from the same stretch of time, so a
/// while of hypervisor steal or a noisy neighbour lands on each of them
/// instead of on whichever ran then. The added latency is a difference of
/// two p99s: on one machine, steal of 19% in the direct window (3% in
/// Sluice's) made direct's p99 0.91 ms instead of about 0.4, and Sluice's
/// added p99 0.86 against 1.1-1.7 in the invocations around it. Each
/// round starts one gateway later. LiteLLM is not among them: its added
/// latency is tens of milliseconds, which a stretch of steal barely
/// moves, and in the one invocation that had it take turns too, Sluice's
/// c=1 p50 doubled (with 25% steal in Sluice's slices, so the cause is
/// not certain).
async fn measure_c1(gateways: &[Gateway], turns: &[&str], plan: &Plan) -> Vec<Option<C1>> {
    let slices = plan.c1_slices.max(1);
    let slice = LoadSpec {
        concurrency: plan.c1.concurrency,
        requests: plan.c1.requests.div_ceil(slices),
        max_duration: plan.c1.max_duration / slices as u32,
    };
    let taking: Vec<usize> = (0..gateways.len())
        .filter(|&g| turns.contains(&gateways[g].name))
        .collect();
    let mut out: Vec<Option<C1>> = gateways.iter().map(|_| None).collect();
    for round in 0..slices {
        for k in 0..taking.len() {
            let g = taking[(round + k) % taking.len()];
            out[g]
                .get_or_insert_with(C1::default)
                .take(&gateways[g].plain, slice)
                .await;
        }
    }
    out
}

/// One gateway's figures in one run; its c=1 step from `c1` when it took
/// its turns in [`measure_c1`], else measured here in one window.
async fn measure(gw: &Gateway, plan: &Plan, c1: Option<C1>) -> Measured {
    let mut m = Measured::default();
    let c1 = match c1 {
        Some(c1) => c1,
        None => {
            let mut c1 = C1::default();
            c1.take(&gw.plain, plan.c1).await;
            c1
        }
    };
    m.steal_pct1 = procstat::MachineTicks::default().steal_pct_until(&c1.ticks);
    let r = c1.load;
    m.absorb(&r);
    m.c1 = Summary::of(&r.latencies_us);
    m.sweep.push((1, r.rps(), m.c1.p99_us));
    for spec in &plan.sweep {
        let r = load::run(&gw.plain, *spec).await;
        m.absorb(&r);
        let s = Summary::of(&r.latencies_us);
        m.sweep.push((spec.concurrency, r.rps(), s.p99_us));
    }
    let me = std::process::id();
    let cpu_before = procstat::tree_cpu_time_us(gw.pid);
    let own_before = procstat::cpu_time_us(me);
    let threads_before = procstat::threads_cpu_time_us(gw.pid);
    let machine_before = procstat::MachineTicks::now();
    let r = load::run(&gw.plain, plan.c32).await;
    let machine_after = procstat::MachineTicks::now();
    let threads_after = procstat::threads_cpu_time_us(gw.pid);
    let cpu_after = procstat::tree_cpu_time_us(gw.pid);
    let own_after = procstat::cpu_time_us(me);
    if let Some((a, b)) = machine_before.zip(machine_after) {
        m.idle_pct32 = a.idle_pct_until(&b);
        m.steal_pct32 = a.steal_pct_until(&b);
    }
    m.absorb(&r);
    m.c32 = Summary::of(&r.latencies_us);
    m.rps32 = r.rps();
    m.sweep.push((plan.c32.concurrency, m.rps32, m.c32.p99_us));
    if r.ok() > 0 {
        let per_req =
            |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / r.ok() as f64);
        m.cpu_us_per_req = per_req(cpu_before, cpu_after);
        m.loadgen_cpu_us_per_req = per_req(own_before, own_after);
        m.threads32 = procstat::threads_per_request(&threads_before, &threads_after, r.ok());
    }
    let r = load::run(&gw.stream, plan.stream).await;
    m.absorb(&r);
    m.ttft = Summary::of(&r.ttft_us);
    m
}

/// The windows (gateway, step, median steal %) whose steal was above
/// [`STEAL_WARN_PCT`], as "sluice c=1 (18%)", in the order given.
fn busy_windows(windows: &[(&str, String, Option<f64>)]) -> Vec<String> {
    windows
        .iter()
        .filter_map(|(name, step, steal)| {
            let steal = (*steal)?;
            (steal > STEAL_WARN_PCT).then(|| format!("{name} {step} ({steal:.0}%)"))
        })
        .collect()
}

/// Each thread name's median CPU per request at c=32 over the runs that
/// saw it, costliest first.
fn thread_medians(runs: &[Measured]) -> Vec<(String, f64)> {
    let mut names: Vec<&str> = Vec::new();
    for m in runs {
        for (name, _) in &m.threads32 {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let mut out: Vec<(String, f64)> = names
        .into_iter()
        .filter_map(|name| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.threads32.iter().find(|(n, _)| n == name).map(|t| t.1))
                .collect();
            Some((name.to_string(), median(&v)?))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// Starts a hidden `sluice bench ...` subcommand of this very binary.
fn spawn_self(args: &[String], log: PathBuf) -> Result<ChildProc> {
    let exe = std::env::current_exe().context("locating the sluice binary")?;
    let log_level = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".into());
    ChildProc::spawn(&exe, args, &[("SLUICE_LOG", log_level)], log, true)
}

async fn start_litellm(
    work: &std::path::Path,
    mock_base: &str,
    smoke: bool,
) -> Result<(ChildProc, String, String)> {
    let lite = LiteLlm::location();
    if smoke && !lite.installed() {
        bail!("not installed and --smoke does not install it");
    }
    lite.ensure().await?;
    let master = "sk-sluice-bench-master";
    let config = work.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n      api_base: {mock_base}/v1\n      api_key: sk-mock\ngeneral_settings:\n  master_key: {master}\nlitellm_settings:\n  telemetry: false\n"
        ),
    )?;
    let port = free_port()?;
    progress(&format!(
        "starting LiteLLM {LITELLM_VERSION} proxy on 127.0.0.1:{port}"
    ));
    let mut child = ChildProc::spawn(
        &lite.bin(),
        &[
            "--config".into(),
            config.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ],
        &[
            ("LITELLM_LOCAL_MODEL_COST_MAP", "True".into()),
            ("NO_COLOR", "1".into()),
        ],
        work.join("litellm.log"),
        false,
    )?;
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(
        &format!("{base}/health/liveliness"),
        Duration::from_secs(180),
        &mut child,
    )
    .await?;
    Ok((child, base, master.to_string()))
}

fn row(label: &str, cells: &[String]) {
    let mut line = format!("{label:<38}");
    for c in cells {
        line.push_str(&format!("{c:>12}"));
    }
    println!("{}", line.trim_end());
}

pub async fn run(args: GatewayArgs) -> Result<()> {
    let plan = Plan::new(args.smoke, args.runs);
    let work = tempfile::Builder::new()
        .prefix("sluice-bench-gateway-")
        .tempdir()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    progress(&format!(
        "{} run(s) on {cores} cores; logs in {}",
        plan.runs,
        work.path().display()
    ));
    let machine = machine_line(args.smoke).await;
    progress(&machine);

    let mut mock = spawn_self(
        &[
            "bench".into(),
            "mock-upstream".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        work.path().join("mock.log"),
    )?;
    let mock_base = mock
        .wait_line("listening:", Duration::from_secs(30))
        .await?;
    let mut sluice = spawn_self(
        &[
            "bench".into(),
            "sluice-gateway".into(),
            "--upstream".into(),
            mock_base.clone(),
            "--data-dir".into(),
            work.path().join("sluice").display().to_string(),
            "--capacity".into(),
            args.capacity.to_string(),
        ],
        work.path().join("sluice.log"),
    )?;
    let key = sluice
        .wait_line("api key:", Duration::from_secs(60))
        .await?;
    let sluice_base = sluice.wait_line("ready:", Duration::from_secs(60)).await?;
    progress(&format!(
        "mock upstream at {mock_base}, Sluice at {sluice_base}"
    ));

    let mut litellm_reason: Option<String> = None;
    let mut litellm: Option<(ChildProc, String, String)> = None;
    if args.no_litellm {
        litellm_reason = Some("--no-litellm".into());
    } else {
        match start_litellm(work.path(), &mock_base, args.smoke).await {
            Ok(l) => litellm = Some(l),
            Err(e) => {
                let reason = format!("{e:#}");
                progress(&format!("LiteLLM left out: {reason}"));
                litellm_reason = Some(reason.lines().next().unwrap_or("").to_string());
            }
        }
    }

    let pid = |c: &ChildProc| c.pid().unwrap_or(0);
    let mut gateways = vec![
        Gateway::new("direct", &mock_base, None, pid(&mock)),
        Gateway::new("sluice", &sluice_base, Some(key), pid(&sluice)),
    ];
    if let Some((child, base, master)) = &litellm {
        gateways.push(Gateway::new(
            "litellm",
            base,
            Some(master.clone()),
            pid(child),
        ));
    }

    // Warm every path (the gateways' connection pools, LiteLLM's
    // first-request work);
    // a gateway that fails its warm-up is left out (Sluice must work).
    let mut kept = Vec::new();
    for gw in gateways {
        let warm = LoadSpec {
            concurrency: 8,
            requests: plan.warmup,
            max_duration: Duration::from_secs(60),
        };
        let r = load::run(&gw.plain, warm).await;
        let rs = load::run(
            &gw.stream,
            LoadSpec {
                concurrency: 2,
                requests: plan.warmup / 4 + 2,
                max_duration: Duration::from_secs(30),
            },
        )
        .await;
        if r.ok() == 0 || rs.ok() == 0 {
            let why = r
                .first_error
                .or(rs.first_error)
                .unwrap_or_else(|| "no answer".into());
            if gw.name == "litellm" {
                progress(&format!("LiteLLM left out: warm-up failed: {why}"));
                litellm_reason = Some(format!("warm-up failed: {why}"));
                continue;
            }
            bail!("{} failed its warm-up: {why}", gw.name);
        }
        kept.push(gw);
    }
    let gateways = kept;

    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); gateways.len()];
    for run in 0..plan.runs {
        progress(&format!(
            "run {}/{}: c=1, direct and sluice in turn ({} slices each)",
            run + 1,
            plan.runs,
            plan.c1_slices
        ));
        let c1 = measure_c1(&gateways, &["direct", "sluice"], &plan).await;
        for ((i, gw), c1) in gateways.iter().enumerate().zip(c1) {
            progress(&format!("run {}/{}: {}", run + 1, plan.runs, gw.name));
            results[i].push(measure(gw, &plan, c1).await);
        }
    }

    let idx = |name: &str| gateways.iter().position(|g| g.name == name);
    let direct = idx("direct").context("direct target missing")?;
    // Median over runs of one figure of one gateway.
    let med = |g: usize, f: &dyn Fn(&Measured) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = results[g].iter().filter_map(f).collect();
        median(&v)
    };
    // Per run, gateway - direct, paired within the run.
    let added_each = |g: usize, f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
        results[g]
            .iter()
            .zip(&results[direct])
            .map(|(a, d)| f(a) - f(d))
            .collect()
    };
    // Median over runs of those.
    let added = |g: usize, f: &dyn Fn(&Measured) -> f64| median(&added_each(g, f));

    println!();
    println!(
        "bench gateway: {} run(s), medians; {cores} cores, loopback; upstream = zero-delay mock (own process); load generator = this process",
        plan.runs
    );
    println!("machine: {machine}");
    let names: Vec<String> = gateways.iter().map(|g| g.name.to_string()).collect();
    row("", &names);
    let per = |label: &str, f: &dyn Fn(usize) -> Option<f64>, decimals: usize| {
        let cells: Vec<String> = (0..gateways.len()).map(|g| num(f(g), decimals)).collect();
        row(label, &cells);
    };
    let c32 = plan.c32.concurrency;
    per(
        "latency c=1 p50 (ms)",
        &|g| med(g, &|m| Some(ms(m.c1.p50_us as f64))),
        3,
    );
    per(
        "latency c=1 p99 (ms)",
        &|g| med(g, &|m| Some(ms(m.c1.p99_us as f64))),
        3,
    );
    per(
        &format!("latency c={c32} p50 (ms)"),
        &|g| med(g, &|m| Some(ms(m.c32.p50_us as f64))),
        3,
    );
    per(
        &format!("latency c={c32} p99 (ms)"),
        &|g| med(g, &|m| Some(ms(m.c32.p99_us as f64))),
        3,
    );
    per(
        "added c=1 p50 (ms)",
        &|g| added(g, &|m| ms(m.c1.p50_us as f64)),
        3,
    );
    per(
        "added c=1 p99 (ms)",
        &|g| added(g, &|m| ms(m.c1.p99_us as f64)),
        3,
    );
    per(
        &format!("added c={c32} p50 (ms)"),
        &|g| added(g, &|m| ms(m.c32.p50_us as f64)),
        3,
    );
    per(
        &format!("added c={c32} p99 (ms)"),
        &|g| added(g, &|m| ms(m.c32.p99_us as f64)),
        3,
    );
    per(
        &format!("throughput c={c32} (req/s)"),
        &|g| med(g, &|m| Some(m.rps32)),
        0,
    );
    per(
        "max req/s with p99 <= 10 ms",
        &|g| med(g, &|m| m.slo_rps()),
        0,
    );
    per(
        &format!("CPU per request, c={c32} (us)"),
        &|g| med(g, &|m| m.cpu_us_per_req),
        0,
    );
    per(
        &format!("load generator CPU per request, c={c32} (us)"),
        &|g| med(g, &|m| m.loadgen_cpu_us_per_req),
        0,
    );
    per(
        &format!("cores idle, c={c32} (%)"),
        &|g| med(g, &|m| m.idle_pct32),
        0,
    );
    per("host steal, c=1 (%)", &|g| med(g, &|m| m.steal_pct1), 0);
    per(
        &format!("host steal, c={c32} (%)"),
        &|g| med(g, &|m| m.steal_pct32),
        0,
    );
    per(
        "stream TTFT p50 (ms)",
        &|g| med(g, &|m| Some(ms(m.ttft.p50_us as f64))),
        3,
    );
    per(
        "stream TTFT p99 (ms)",
        &|g| med(g, &|m| Some(ms(m.ttft.p99_us as f64))),
        3,
    );
    per(
        "added TTFT p50 (ms)",
        &|g| added(g, &|m| ms(m.ttft.p50_us as f64)),
        3,
    );
    per(
        "errors (all runs)",
        &|g| Some(results[g].iter().map(|m| m.errors as f64).sum()),
        0,
    );
    println!(
        "(\"direct\" is the mock itself; its CPU row is the mock's own cost. Sluice = validator + miner in one process, each on a one-thread runtime of its own, two HTTP hops. Throughput and CPU share {cores} cores with the load generator; \"cores idle\" is the share of all cores' time idle during the c={c32} window: well above zero, something other than the cores bound the throughput: a thread the others waited on, or threads the scheduler kept on one core. \"host steal\" is the share the hypervisor gave to other guests while the vCPUs had work: above a few percent, that window ran on a busy host, and its latency and throughput say as much about the host as about the gateway.)"
    );
    let mut windows = Vec::new();
    for (g, gw) in gateways.iter().enumerate() {
        windows.push((gw.name, "c=1".to_string(), med(g, &|m| m.steal_pct1)));
        windows.push((gw.name, format!("c={c32}"), med(g, &|m| m.steal_pct32)));
    }
    let busy = busy_windows(&windows);
    if !busy.is_empty() {
        println!(
            "note: a busy host: the hypervisor ran other guests in {} (median steal above {STEAL_WARN_PCT}%): those figures are slower than the gateways themselves; to compare invocations, run again when the host is quieter",
            busy.join(", ")
        );
    }
    for (g, gw) in gateways.iter().enumerate() {
        if let Some(e) = results[g].iter().find_map(|m| m.first_error.clone()) {
            println!("{}: first error: {e}", gw.name);
        }
        let sweep: Vec<String> = results[g]
            .last()
            .map(|m| {
                m.sweep
                    .iter()
                    .map(|(c, rps, p99)| {
                        format!("c={c}: {rps:.0} req/s p99 {:.2} ms", ms(*p99 as f64))
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("{} sweep (last run): {}", gw.name, sweep.join("; "));
        println!(
            "{} throughput c={c32} per run (req/s): {}",
            gw.name,
            per_run(results[g].iter().map(|m| m.rps32), 0)
        );
        if g != direct {
            // The median hides how far apart the runs were.
            println!(
                "{} added c=1 p99 per run (ms): {}",
                gw.name,
                per_run(added_each(g, &|m| ms(m.c1.p99_us as f64)), 3)
            );
        }
        let threads = thread_medians(&results[g]);
        if !threads.is_empty() {
            // /proc counts in clock ticks (10 ms): a short window may show
            // none for a thread.
            let listed: Vec<String> = threads
                .iter()
                .filter(|(_, us)| *us >= 0.5)
                .take(6)
                .map(|(name, us)| format!("{name} {us:.1}"))
                .collect();
            println!(
                "{} threads, c={c32} (us of CPU per request, medians; main process): {}",
                gw.name,
                if listed.is_empty() {
                    "each under 0.5 (too short a window to count)".to_string()
                } else {
                    listed.join(", ")
                }
            );
        }
    }
    if let Some(reason) = &litellm_reason {
        println!("litellm: na ({reason})");
    }

    let s = idx("sluice");
    let l = idx("litellm");
    let p99_added = |g: Option<usize>| g.and_then(|g| added(g, &|m| ms(m.c1.p99_us as f64)));
    let cpu = |g: Option<usize>| g.and_then(|g| med(g, &|m| m.cpu_us_per_req));
    let rps = |g: Option<usize>| g.and_then(|g| med(g, &|m| Some(m.rps32)));
    if let (Some(s), Some(l)) = (s, l) {
        // The runs took their c=32 steps in turn: a ratio per run shows
        // how much of the median's ratio is the host drifting.
        let each: Vec<String> = results[s]
            .iter()
            .zip(&results[l])
            .map(|(a, b)| num(ratio(Some(a.rps32), Some(b.rps32)), GOALS[2].decimals))
            .collect();
        println!("rps_ratio per run: {}", each.join(", "));
    }
    println!(
        "(final line: p99 added at c=1; CPU at c={c32}; rps_ratio = Sluice / LiteLLM throughput at c={c32}, not latency-bounded)"
    );
    let rps_ratio = ratio(rps(s), rps(l));
    println!(
        "{}",
        targets_line(&[
            (GOALS[0], p99_added(s)),
            (GOALS[1], cpu(s)),
            (GOALS[2], rps_ratio),
        ])
    );
    println!(
        "bench gateway: sluice_p99_added_ms={} litellm_p99_added_ms={} sluice_cpu_us_per_req={} litellm_cpu_us_per_req={} rps_ratio={}",
        num(p99_added(s), GOALS[0].decimals),
        num(p99_added(l), GOALS[0].decimals),
        num(cpu(s), GOALS[1].decimals),
        num(cpu(l), GOALS[1].decimals),
        num(rps_ratio, GOALS[2].decimals),
    );

    if let Some((child, _, _)) = litellm {
        child.stop().await;
    }
    sluice.stop().await;
    mock.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_windows_are_the_ones_above_the_steal_bound() {
        let windows = [
            ("direct", "c=1".to_string(), Some(19.4)),
            ("sluice", "c=1".to_string(), Some(3.0)),
            ("sluice", "c=32".to_string(), Some(5.0)),
            ("litellm", "c=1".to_string(), None),
            ("litellm", "c=32".to_string(), Some(5.6)),
        ];
        assert_eq!(
            busy_windows(&windows),
            ["direct c=1 (19%)", "litellm c=32 (6%)"]
        );
        assert!(busy_windows(&windows[1..4]).is_empty(), "a quiet host");
    }

    fn run_with(threads: &[(&str, f64)]) -> Measured {
        Measured {
            threads32: threads.iter().map(|(n, us)| (n.to_string(), *us)).collect(),
            ..Measured::default()
        }
    }

    #[test]
    fn thread_medians_are_per_name_and_costliest_first() {
        let runs = [
            run_with(&[("validator", 20.0), ("miner", 30.0), ("idle", 0.1)]),
            run_with(&[("validator", 24.0), ("miner", 26.0)]),
            run_with(&[("validator", 22.0), ("ledger", 9.0)]),
        ];
        let got = thread_medians(&runs);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["miner", "validator", "ledger", "idle"]);
        assert_eq!(got[1].1, 22.0, "median of three");
        assert_eq!(got[2].1, 9.0, "a name seen in one run only");
        assert!(thread_medians(&[]).is_empty());
    }
}
