//! Benchmark building blocks shared by `sluice bench` and the engine tests:
//! a zero-delay OpenAI-compatible mock upstream, a closed-loop load
//! generator, latency statistics, per-process CPU accounting from
//! `/proc` and a description of the machine. Orchestration (which
//! gateways run, how they are installed) lives in the CLI.

pub mod load;
pub mod machine;
pub mod mock;
pub mod procstat;
pub mod stats;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(String),
}
