//! What the benchmarks ran on, printed above their tables: the CPU, how
//! many logical CPUs, whether a hypervisor is underneath, how idle CPUs
//! wait, and what one wake-up round trip between two threads costs.
//!
//! Latency at concurrency 1 is mostly threads waking one another: the load
//! generator wakes the validator, which wakes the miner, which wakes the
//! upstream, and back. On a VM whose idle vCPUs halt at once (the kernel's
//! guest halt polling at 0 ns), every wake-up of a sleeping vCPU goes
//! through the hypervisor, and the same build's p50 at concurrency 1 moved
//! by 3x between machines. The figures below make tables from different
//! machines comparable.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Facts about this machine, each `None` where it could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    /// `model name` of the first CPU in `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// `cpu family` and `model` of the first CPU.
    pub family_model: Option<(u32, u32)>,
    pub logical_cpus: usize,
    /// The `hypervisor` CPU flag: the kernel runs as a guest.
    pub hypervisor: bool,
    /// `/sys/devices/system/cpu/cpuidle/current_driver`.
    pub cpuidle_driver: Option<String>,
    /// The haltpoll driver's `guest_halt_poll_ns`: how long an idle vCPU
    /// polls for work before it halts (0: it halts at once).
    pub guest_halt_poll_ns: Option<u64>,
}

impl Machine {
    pub fn read() -> Machine {
        let mut m = std::fs::read_to_string("/proc/cpuinfo")
            .map(|text| Machine::from_cpuinfo(&text))
            .unwrap_or_default();
        m.logical_cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        m.cpuidle_driver = read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver");
        m.guest_halt_poll_ns = read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|s| s.parse().ok());
        m
    }

    /// The first processor's block of `/proc/cpuinfo` (x86 layout; other
    /// architectures leave the fields `None`).
    pub fn from_cpuinfo(text: &str) -> Machine {
        let mut m = Machine::default();
        let mut family = None;
        let mut model = None;
        for line in text.lines() {
            if line.trim().is_empty() {
                break; // the end of the first processor's block
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "model name" => m.cpu_model = Some(value.to_string()),
                "cpu family" => family = value.parse().ok(),
                "model" => model = value.parse().ok(),
                "flags" => m.hypervisor = value.split_whitespace().any(|f| f == "hypervisor"),
                _ => {}
            }
        }
        m.family_model = family.zip(model);
        m
    }

    /// One line for a benchmark's header.
    pub fn describe(&self) -> String {
        let mut s = self
            .cpu_model
            .clone()
            .unwrap_or_else(|| "unknown CPU".to_string());
        if let Some((family, model)) = self.family_model {
            s.push_str(&format!(" (family {family} model {model})"));
        }
        s.push_str(&format!(", {} logical CPUs", self.logical_cpus));
        if self.hypervisor {
            s.push_str(", under a hypervisor");
        }
        if let Some(driver) = &self.cpuidle_driver {
            s.push_str(&format!(", cpuidle {driver}"));
        }
        match self.guest_halt_poll_ns {
            Some(0) => s.push_str(", guest halt polling off (idle vCPUs halt at once)"),
            Some(ns) => s.push_str(&format!(", guest halt polling {} µs", ns / 1000)),
            None => {}
        }
        s
    }
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Median time of one wake-up round trip between two threads (a byte
/// each way through a pair of pipes, as `perf bench sched pipe` does),
/// over `rounds` trips in batches, stopping early after `budget`. The
/// threads go wherever the scheduler puts them, as the gateway's do.
pub fn wake_round_trip(rounds: usize, budget: Duration) -> std::io::Result<Duration> {
    let (mut ping_rx, mut ping_tx) = std::io::pipe()?;
    let (mut pong_rx, mut pong_tx) = std::io::pipe()?;
    let echo = std::thread::Builder::new().name("wake-echo".into()).spawn(
        move || -> std::io::Result<()> {
            let mut b = [0u8; 1];
            loop {
                if ping_rx.read(&mut b)? == 0 {
                    return Ok(()); // the writer closed: done
                }
                pong_tx.write_all(&b)?;
            }
        },
    )?;
    const BATCH: usize = 200;
    let mut per_batch = Vec::new();
    let started = Instant::now();
    let mut b = [0u8; 1];
    let mut done = 0;
    while done < rounds.max(1) && (per_batch.is_empty() || started.elapsed() < budget) {
        let t = Instant::now();
        for _ in 0..BATCH {
            ping_tx.write_all(&[1])?;
            pong_rx.read_exact(&mut b)?;
        }
        per_batch.push(t.elapsed() / BATCH as u32);
        done += BATCH;
    }
    drop(ping_tx);
    echo.join()
        .map_err(|_| std::io::Error::other("the echo thread panicked"))??;
    per_batch.sort();
    Ok(per_batch[per_batch.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme de pse hypervisor avx2

processor\t: 1
model name\t: Some Other CPU
";

    #[test]
    fn reads_the_first_processor_of_cpuinfo() {
        let m = Machine::from_cpuinfo(CPUINFO);
        assert_eq!(m.cpu_model.as_deref(), Some("Intel(R) Xeon(R) Processor"));
        assert_eq!(m.family_model, Some((6, 207)));
        assert!(m.hypervisor);
        let bare = Machine::from_cpuinfo("processor : 0\nflags : fpu avx2\n");
        assert!(!bare.hypervisor);
        assert_eq!(bare.cpu_model, None);
        assert_eq!(bare.family_model, None);
    }

    #[test]
    fn describes_idle_polling() {
        let mut m = Machine::from_cpuinfo(CPUINFO);
        m.logical_cpus = 2;
        m.cpuidle_driver = Some("haltpoll".into());
        m.guest_halt_poll_ns = Some(0);
        assert_eq!(
            m.describe(),
            "Intel(R) Xeon(R) Processor (family 6 model 207), 2 logical CPUs, under a hypervisor, \
             cpuidle haltpoll, guest halt polling off (idle vCPUs halt at once)"
        );
        m.guest_halt_poll_ns = Some(200_000);
        assert!(m.describe().ends_with("guest halt polling 200 µs"));
        assert_eq!(Machine::default().describe(), "unknown CPU, 0 logical CPUs");
    }

    #[test]
    fn measures_a_wake_up_round_trip() {
        let rt = wake_round_trip(400, Duration::from_secs(2)).unwrap();
        assert!(rt > Duration::ZERO);
        // Reading this machine must not fail either.
        assert!(Machine::read().logical_cpus >= 1);
    }
}
