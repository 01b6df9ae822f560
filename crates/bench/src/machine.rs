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
//! machines comparable. The wake-up round trip is measured twice, with
//! the two threads pinned to one CPU and to two: left to the scheduler the
//! same machine gave 3.8 µs in one invocation and 73 µs in the next.

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
        // The haltpoll module's parameter is there whether or not its
        // driver is the one in use; it says how idle vCPUs wait only when
        // it is. With no driver at all, an idle CPU halts at once.
        match (self.cpuidle_driver.as_deref(), self.guest_halt_poll_ns) {
            (Some("haltpoll") | None, Some(0)) => {
                s.push_str(", guest halt polling off (idle vCPUs halt at once)")
            }
            (Some("haltpoll") | None, Some(ns)) => {
                s.push_str(&format!(", guest halt polling {} µs", ns / 1000))
            }
            (Some("none"), _) => s.push_str(" (no guest halt polling: idle CPUs halt at once)"),
            _ => {}
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

/// Where the two threads of a wake-up round trip run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Wherever the scheduler puts them (it may keep them on one CPU or
    /// spread them, and the figure moves by 20x with its choice).
    Anywhere,
    /// Both pinned to this CPU: a wake-up never leaves the CPU.
    SameCpu(usize),
    /// One pinned to each: every wake-up reaches the other CPU, which may
    /// be idle (halted) when it arrives.
    TwoCpus(usize, usize),
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn pin(cpu: Option<usize>) -> std::io::Result<()> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(std::io::Error::from)
}

/// Median time of one wake-up round trip between two new threads placed
/// as `placement` says (a byte each way through a pair of pipes, as `perf
/// bench sched pipe` does), over `rounds` trips in batches, stopping
/// early after `budget`.
pub fn wake_round_trip(
    placement: Placement,
    rounds: usize,
    budget: Duration,
) -> std::io::Result<Duration> {
    let (pinger_cpu, echo_cpu) = match placement {
        Placement::Anywhere => (None, None),
        Placement::SameCpu(c) => (Some(c), Some(c)),
        Placement::TwoCpus(a, b) => (Some(a), Some(b)),
    };
    let (mut ping_rx, mut ping_tx) = std::io::pipe()?;
    let (mut pong_rx, mut pong_tx) = std::io::pipe()?;
    let echo = std::thread::Builder::new().name("wake-echo".into()).spawn(
        move || -> std::io::Result<()> {
            pin(echo_cpu)?;
            let mut b = [0u8; 1];
            loop {
                if ping_rx.read(&mut b)? == 0 {
                    return Ok(()); // the pinger closed its end: done
                }
                pong_tx.write_all(&b)?;
            }
        },
    )?;
    let pinger = std::thread::Builder::new().name("wake-ping".into()).spawn(
        move || -> std::io::Result<Duration> {
            // On failure the pipe closes and the echo thread ends.
            pin(pinger_cpu)?;
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
            per_batch.sort();
            Ok(per_batch[per_batch.len() / 2])
        },
    )?;
    let trip = pinger
        .join()
        .map_err(|_| std::io::Error::other("the wake-up pinger panicked"))?;
    echo.join()
        .map_err(|_| std::io::Error::other("the wake-up echo panicked"))??;
    trip
}

/// The wake-up round trip on one CPU and across two (or where the
/// scheduler puts the threads, if they cannot be pinned), for a header.
pub fn describe_wake_ups(rounds: usize, budget: Duration) -> String {
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    let cpus = allowed_cpus();
    let pinned = match cpus.as_slice() {
        [] => None,
        [one] => wake_round_trip(Placement::SameCpu(*one), rounds, budget)
            .ok()
            .map(|same| format!("{} on one CPU", us(same))),
        [a, b, ..] => wake_round_trip(Placement::SameCpu(*a), rounds, budget)
            .and_then(|same| {
                let across = wake_round_trip(Placement::TwoCpus(*a, *b), rounds, budget)?;
                Ok(format!(
                    "{} on one CPU, {} across two",
                    us(same),
                    us(across)
                ))
            })
            .ok(),
    };
    let figure = match pinned {
        Some(f) => f,
        None => match wake_round_trip(Placement::Anywhere, rounds, budget) {
            Ok(d) => format!("{} (threads not pinned)", us(d)),
            Err(e) => format!("na ({e})"),
        },
    };
    format!("wake-up round trip between two threads {figure}")
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
        // The module's parameter, read with no cpuidle driver in use
        // (the twenty-first machine), says nothing of how idle CPUs wait.
        m.cpuidle_driver = Some("none".into());
        assert!(
            m.describe()
                .ends_with("cpuidle none (no guest halt polling: idle CPUs halt at once)"),
            "{}",
            m.describe()
        );
        assert_eq!(Machine::default().describe(), "unknown CPU, 0 logical CPUs");
    }

    #[test]
    fn measures_wake_up_round_trips_where_asked() {
        let budget = Duration::from_millis(300);
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "this process may run on no CPU?");
        assert!(wake_round_trip(Placement::Anywhere, 400, budget).unwrap() > Duration::ZERO);
        assert!(
            wake_round_trip(Placement::SameCpu(cpus[0]), 400, budget).unwrap() > Duration::ZERO
        );
        if let [a, b, ..] = cpus[..] {
            assert!(
                wake_round_trip(Placement::TwoCpus(a, b), 400, budget).unwrap() > Duration::ZERO
            );
            assert!(describe_wake_ups(400, budget).ends_with("across two"));
        }
        // A CPU this process may not use: an error, not a hang.
        let missing = (0..rustix::thread::CpuSet::MAX_CPU).find(|c| !cpus.contains(c));
        if let Some(c) = missing {
            assert!(wake_round_trip(Placement::SameCpu(c), 400, budget).is_err());
        }
        // Reading this machine must not fail either.
        assert!(Machine::read().logical_cpus >= 1);
    }
}
