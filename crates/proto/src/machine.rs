//! The machine's CPU time counters from `/proc/stat`: how much of the
//! cores' time went idle or was stolen by the hypervisor over a window;
//! and one thread's, from `/proc/thread-self/schedstat`: how long it ran
//! and how long it waited for a CPU. The benchmarks report the first; the
//! SQLite ledger writer asks both whether there was CPU time to spare.

/// The machine's CPU time counters (all CPUs together, clock ticks) from
/// the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// Idle and waiting for I/O.
    pub idle: u64,
    /// Stolen: the vCPUs were ready to run and the hypervisor ran
    /// something else (0 where the kernel does not report it).
    pub steal: u64,
    /// Every state, idle and steal included (guest time is already inside
    /// user).
    pub total: u64,
}

impl MachineTicks {
    /// Reads `/proc/stat`; `None` where there is none (not Linux).
    pub fn now() -> Option<MachineTicks> {
        parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The share of the cores' time spent idle between `self` and `later`,
    /// in percent; `None` when no tick passed.
    pub fn idle_pct_until(&self, later: &MachineTicks) -> Option<f64> {
        share(self.idle, later.idle, self.total, later.total)
    }

    /// The share of the cores' time the hypervisor took for others between
    /// `self` and `later`, in percent; `None` when no tick passed.
    pub fn steal_pct_until(&self, later: &MachineTicks) -> Option<f64> {
        share(self.steal, later.steal, self.total, later.total)
    }

    /// Adds the ticks that passed from `earlier` to `later`, to sum
    /// several windows (a window whose counters went back adds nothing).
    /// The shares of the sum are read from `MachineTicks::default()`.
    pub fn add_window(&mut self, earlier: &MachineTicks, later: &MachineTicks) {
        if let (Some(idle), Some(steal), Some(total)) = (
            later.idle.checked_sub(earlier.idle),
            later.steal.checked_sub(earlier.steal),
            later.total.checked_sub(earlier.total),
        ) {
            self.idle += idle;
            self.steal += steal;
            self.total += total;
        }
    }
}

/// The calling thread's time on a CPU and time runnable but waiting for
/// one (nanoseconds since it started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTicks {
    pub run_ns: u64,
    pub wait_ns: u64,
}

impl ThreadTicks {
    /// Reads the calling thread's `/proc/thread-self/schedstat`; `None`
    /// where there is none (not Linux, or a kernel without scheduler
    /// statistics).
    pub fn now() -> Option<ThreadTicks> {
        parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
    }

    /// The same for thread `tid` of this process.
    pub fn of(tid: i32) -> Option<ThreadTicks> {
        parse_schedstat(&std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?)
    }

    /// Time the thread waited for a CPU per time it ran, between `self`
    /// and `later`: about the number of other runnable threads it shared
    /// its CPU with (1 beside one busy thread of the same priority);
    /// `None` when it did not run or a counter went back.
    pub fn wait_per_run_until(&self, later: &ThreadTicks) -> Option<f64> {
        let run = later.run_ns.checked_sub(self.run_ns)?;
        let wait = later.wait_ns.checked_sub(self.wait_ns)?;
        (run > 0).then(|| wait as f64 / run as f64)
    }
}

/// `run_ns wait_ns timeslices`.
fn parse_schedstat(text: &str) -> Option<ThreadTicks> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(ThreadTicks {
        run_ns: fields.next()??,
        wait_ns: fields.next()??,
    })
}

/// `part`'s growth as a percentage of `total`'s; `None` when no tick
/// passed or a counter went back.
fn share(part0: u64, part1: u64, total0: u64, total1: u64) -> Option<f64> {
    let total = total1.checked_sub(total0)?;
    let part = part1.checked_sub(part0)?;
    (total > 0).then(|| 100.0 * part.min(total) as f64 / total as f64)
}

/// Parses the aggregate `cpu` line: user nice system idle iowait irq
/// softirq steal [guest guest_nice] (guest time is counted in user too).
fn parse_machine(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 5 {
        return None;
    }
    Some(MachineTicks {
        idle: fields[3] + fields[4],
        steal: fields.get(7).copied().unwrap_or(0),
        total: fields.iter().sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_line_counts_idle_iowait_and_steal() {
        let stat = "cpu  100 5 20 300 10 0 15 2 7 0\ncpu0 50 2 10 150 5 0 7 1 3 0\nintr 1 2 3\n";
        let t = parse_machine(stat).unwrap();
        assert_eq!(t.idle, 310);
        assert_eq!(t.steal, 2);
        assert_eq!(t.total, 100 + 5 + 20 + 300 + 10 + 15 + 2);
        let later = MachineTicks {
            idle: t.idle + 25,
            steal: t.steal + 10,
            total: t.total + 100,
        };
        assert_eq!(t.idle_pct_until(&later), Some(25.0));
        assert_eq!(t.steal_pct_until(&later), Some(10.0));
        assert_eq!(t.idle_pct_until(&t), None, "no tick passed");
        assert_eq!(t.steal_pct_until(&t), None, "no tick passed");
        assert_eq!(later.idle_pct_until(&t), None, "counters never go back");
        assert_eq!(later.steal_pct_until(&t), None, "counters never go back");
        // Two windows summed: 10 of 100 ticks, then 30 of 100.
        let mut sum = MachineTicks::default();
        sum.add_window(&t, &later);
        let third = MachineTicks {
            idle: later.idle,
            steal: later.steal + 30,
            total: later.total + 100,
        };
        sum.add_window(&later, &third);
        sum.add_window(&third, &t);
        assert_eq!(MachineTicks::default().steal_pct_until(&sum), Some(20.0));
        assert_eq!(MachineTicks::default().idle_pct_until(&sum), Some(12.5));
        // Kernels before steal accounting print five to seven fields.
        let old = parse_machine("cpu  1 2 3 4 5\n").unwrap();
        assert_eq!((old.idle, old.steal, old.total), (9, 0, 15));
        assert!(parse_machine("cpu  1 2 x 4 5\n").is_none());
        assert!(parse_machine("intr 1\n").is_none());
    }

    #[test]
    fn schedstat_gives_run_and_wait_time() {
        let t = parse_schedstat("2000 500 7\n").unwrap();
        assert_eq!(
            t,
            ThreadTicks {
                run_ns: 2000,
                wait_ns: 500
            }
        );
        let later = ThreadTicks {
            run_ns: 3000,
            wait_ns: 1250,
        };
        assert_eq!(t.wait_per_run_until(&later), Some(0.75));
        assert_eq!(t.wait_per_run_until(&t), None, "it did not run");
        assert_eq!(later.wait_per_run_until(&t), None, "counters never go back");
        assert!(parse_schedstat("2000\n").is_none());
        assert!(parse_schedstat("x 1 2\n").is_none());
    }

    #[test]
    fn this_machine_has_idle_counters() {
        let a = MachineTicks::now().expect("/proc/stat");
        assert!(a.total >= a.idle);
    }

    #[test]
    fn this_thread_run_time_grows_while_it_works() {
        let Some(a) = ThreadTicks::now() else {
            eprintln!("skipped: this kernel keeps no per-thread scheduler statistics");
            return;
        };
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let b = ThreadTicks::now().expect("schedstat was readable a moment ago");
        assert!(
            b.run_ns > a.run_ns && b.wait_ns >= a.wait_ns,
            "{a:?} then {b:?}"
        );
        assert!(a.wait_per_run_until(&b).is_some());
    }
}
