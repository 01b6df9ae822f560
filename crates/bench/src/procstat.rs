//! CPU time of processes from `/proc/<pid>/stat` (user + system, every
//! thread), so a benchmark can charge each gateway exactly the CPU its own
//! process tree burned, apart from the load generator's; and the whole
//! machine's idle share from `/proc/stat`, which tells whether a
//! throughput figure was bound by the cores or by something that left
//! them waiting.

use std::path::Path;
use std::sync::OnceLock;

/// Clock ticks per second of the `/proc` counters (`getconf CLK_TCK`,
/// 100 on every common Linux).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// (parent pid, user + system ticks) from one `stat` line.
fn parse_stat(line: &str) -> Option<(u32, u64)> {
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

fn read_stat(dir: &Path) -> Option<(u32, u64)> {
    parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)
}

fn ticks_to_us(ticks: u64) -> u64 {
    ticks * 1_000_000 / clock_ticks()
}

/// CPU time of one process (all its threads), microseconds.
pub fn cpu_time_us(pid: u32) -> Option<u64> {
    read_stat(&Path::new("/proc").join(pid.to_string())).map(|(_, t)| ticks_to_us(t))
}

/// CPU time of `root` and every live descendant, microseconds (worker
/// processes of a multi-process server are included).
pub fn tree_cpu_time_us(root: u32) -> Option<u64> {
    let mut parents: Vec<(u32, u32, u64)> = Vec::new();
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, ticks)) = read_stat(&entry.path()) {
            parents.push((pid, ppid, ticks));
        }
    }
    let mut total = None;
    let mut frontier = vec![root];
    let mut seen = 0usize;
    while let Some(p) = frontier.pop() {
        seen += 1;
        if seen > parents.len() + 1 {
            break;
        }
        for (pid, ppid, ticks) in &parents {
            if *pid == p {
                total = Some(total.unwrap_or(0) + ticks);
            }
            if *ppid == p {
                frontier.push(*pid);
            }
        }
    }
    total.map(ticks_to_us)
}

/// CPU time of every thread of one process, microseconds, summed by
/// thread name (`/proc/<pid>/task/*/comm`, at most 15 bytes; a pool of
/// like-named workers is one entry). Threads that ended are missing.
pub fn threads_cpu_time_us(pid: u32) -> Vec<(String, u64)> {
    let mut by_name: Vec<(String, u64)> = Vec::new();
    let Ok(tasks) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(name), Some((_, ticks))) =
            (std::fs::read_to_string(dir.join("comm")), read_stat(&dir))
        else {
            continue;
        };
        let name = name.trim_end().to_string();
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += ticks,
            None => by_name.push((name, ticks)),
        }
    }
    by_name
        .into_iter()
        .map(|(n, t)| (n, ticks_to_us(t)))
        .collect()
}

/// Each thread name's CPU time between two [`threads_cpu_time_us`]
/// readings, per request, costliest first (names absent from either
/// reading are left out).
pub fn threads_per_request(
    before: &[(String, u64)],
    after: &[(String, u64)],
    requests: usize,
) -> Vec<(String, f64)> {
    if requests == 0 {
        return Vec::new();
    }
    let mut per: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(name, t1)| {
            let (_, t0) = before.iter().find(|(n, _)| n == name)?;
            Some((
                name.clone(),
                t1.saturating_sub(*t0) as f64 / requests as f64,
            ))
        })
        .collect();
    per.sort_by(|a, b| b.1.total_cmp(&a.1));
    per
}

pub use sluice_proto::machine::MachineTicks;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line = "123 (a (b) c) S 7 1 1 0 -1 4194560 10 0 0 0 250 50 0 0 20 0 4 0 1 1 1";
        assert_eq!(parse_stat(line), Some((7, 300)));
    }

    #[test]
    fn own_process_has_cpu_time() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_time_us(me).is_some());
        assert!(tree_cpu_time_us(me).is_some());
    }

    #[test]
    fn per_thread_figures_are_per_request_and_costliest_first() {
        let before = vec![("a".to_string(), 1_000), ("b".to_string(), 0)];
        let after = vec![
            ("a".to_string(), 3_000),
            ("b".to_string(), 5_000),
            ("new".to_string(), 9_000),
        ];
        assert_eq!(
            threads_per_request(&before, &after, 100),
            vec![("b".to_string(), 50.0), ("a".to_string(), 20.0)]
        );
        assert!(threads_per_request(&before, &after, 0).is_empty());
    }

    #[test]
    fn this_process_threads_are_named() {
        let me = std::process::id();
        let (started, wait) = std::sync::mpsc::channel();
        let (done, finish) = std::sync::mpsc::channel::<()>();
        // A thread's name is set from inside it, once it runs.
        let worker = std::thread::Builder::new()
            .name("procstat-probe".into())
            .spawn(move || {
                started.send(()).unwrap();
                let _ = finish.recv();
            })
            .unwrap();
        wait.recv().unwrap();
        let threads = threads_cpu_time_us(me);
        done.send(()).unwrap();
        worker.join().unwrap();
        assert!(
            threads.iter().any(|(n, _)| n == "procstat-probe"),
            "{threads:?}"
        );
    }
}
