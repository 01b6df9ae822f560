//! Routable instances per model and the admission path to them: health
//! (heartbeats, failure back-off), load-aware selection (power of two
//! choices over outstanding requests weighted by latency) and a bounded
//! per-chute wait with a deadline instead of an instant 503.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use sluice_store::now_ms;

/// One model served by one miner.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub miner_key: String,
    pub endpoint: String,
    pub model: String,
    pub capacity: u32,
    pub context_length: u32,
    outstanding: AtomicU32,
    last_heartbeat_ms: AtomicI64,
    /// Not routable before this time (failure back-off).
    down_until_ms: AtomicI64,
    consecutive_failures: AtomicU32,
    /// Peak-sensitive EWMA of time to first event, microseconds.
    latency_us: AtomicU64,
}

impl Instance {
    pub fn new(
        id: String,
        miner_key: &str,
        endpoint: &str,
        model: &str,
        capacity: u32,
        context_length: u32,
    ) -> Self {
        Instance {
            id,
            miner_key: miner_key.to_string(),
            endpoint: endpoint.to_string(),
            model: model.to_string(),
            capacity: capacity.max(1),
            context_length,
            outstanding: AtomicU32::new(0),
            last_heartbeat_ms: AtomicI64::new(now_ms()),
            down_until_ms: AtomicI64::new(0),
            consecutive_failures: AtomicU32::new(0),
            latency_us: AtomicU64::new(0),
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::SeqCst)
    }

    fn routable(&self, now: i64, heartbeat_timeout_ms: i64) -> bool {
        now - self.last_heartbeat_ms.load(Ordering::SeqCst) <= heartbeat_timeout_ms
            && self.down_until_ms.load(Ordering::SeqCst) <= now
    }

    fn try_reserve(&self) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    /// Selection cost: outstanding work scaled by observed latency.
    fn cost(&self) -> u128 {
        let lat = self.latency_us.load(Ordering::Relaxed).max(1) as u128;
        (self.outstanding() as u128 + 1) * lat
    }

    /// A failed attempt: back off exponentially (250 ms doubling to 30 s).
    pub fn record_failure(&self) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        let backoff = (250i64 << (n - 1).min(7)).min(30_000);
        self.down_until_ms
            .store(now_ms() + backoff, Ordering::SeqCst);
    }

    pub fn record_success(&self, first_event: Duration) {
        self.consecutive_failures.store(0, Ordering::SeqCst);
        let sample = first_event.as_micros().min(u64::MAX as u128) as u64;
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                // Peak EWMA: jump up at once, decay slowly.
                Some(if old == 0 || sample > old {
                    sample
                } else {
                    (old * 7 + sample) / 8
                })
            });
    }

    pub fn heartbeat(&self) {
        self.last_heartbeat_ms.store(now_ms(), Ordering::SeqCst);
    }
}

/// Per-chute waiting room.
#[derive(Debug, Default)]
pub struct ChuteGate {
    notify: Notify,
    waiting: AtomicUsize,
    /// EWMA of how long a lease is held, milliseconds.
    service_ms: AtomicU64,
}

impl ChuteGate {
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// A reserved slot on an instance; released on drop.
#[derive(Debug)]
pub struct Lease {
    pub instance: Arc<Instance>,
    gate: Arc<ChuteGate>,
    since: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.instance.outstanding.fetch_sub(1, Ordering::SeqCst);
        let held = self.since.elapsed().as_millis() as u64;
        let _ = self
            .gate
            .service_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { held } else { (old * 7 + held) / 8 })
            });
        self.gate.notify.notify_waiters();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireError {
    /// The deadline passed (or the queue is full) with no free slot.
    NoCapacity { retry_after_s: u64 },
    /// Every routable instance was already tried by this request.
    Exhausted,
}

pub struct Registry {
    instances: RwLock<HashMap<String, Vec<Arc<Instance>>>>,
    gates: RwLock<HashMap<String, Arc<ChuteGate>>>,
    heartbeat_timeout_ms: i64,
    max_queue: usize,
}

impl Registry {
    pub fn new(heartbeat_timeout: Duration, max_queue: usize) -> Self {
        Registry {
            instances: RwLock::new(HashMap::new()),
            gates: RwLock::new(HashMap::new()),
            heartbeat_timeout_ms: heartbeat_timeout.as_millis() as i64,
            max_queue,
        }
    }

    pub fn gate(&self, model: &str) -> Arc<ChuteGate> {
        if let Ok(g) = self.gates.read() {
            if let Some(gate) = g.get(model) {
                return gate.clone();
            }
        }
        let mut g = match self.gates.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.entry(model.to_string()).or_default().clone()
    }

    /// Replaces every instance of `miner_key` with `new` (a key re-registering
    /// from a new endpoint does not keep its old instances).
    pub fn replace_miner(&self, miner_key: &str, new: Vec<Arc<Instance>>) {
        let models: Vec<String> = new.iter().map(|i| i.model.clone()).collect();
        {
            let mut map = match self.instances.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            for list in map.values_mut() {
                list.retain(|i| i.miner_key != miner_key);
            }
            for inst in new {
                map.entry(inst.model.clone()).or_default().push(inst);
            }
        }
        for m in models {
            self.gate(&m).notify.notify_waiters();
        }
    }

    /// Records a heartbeat; false when the miner has no instances here.
    pub fn heartbeat(&self, miner_key: &str) -> bool {
        let map = match self.instances.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut found = false;
        for inst in map.values().flatten().filter(|i| i.miner_key == miner_key) {
            inst.heartbeat();
            found = true;
        }
        if found {
            for model in map.keys() {
                self.gate(model).notify.notify_waiters();
            }
        }
        found
    }

    /// Routable instances per model (for metrics and the status page).
    pub fn routable_counts(&self) -> Vec<(String, usize)> {
        let now = now_ms();
        let map = match self.instances.read() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.iter()
            .map(|(m, l)| {
                (
                    m.clone(),
                    l.iter()
                        .filter(|i| i.routable(now, self.heartbeat_timeout_ms))
                        .count(),
                )
            })
            .collect()
    }

    pub fn instances_of(&self, model: &str) -> Vec<Arc<Instance>> {
        match self.instances.read() {
            Ok(m) => m.get(model).cloned().unwrap_or_default(),
            Err(p) => p.into_inner().get(model).cloned().unwrap_or_default(),
        }
    }

    /// Picks and reserves an instance now, if one is free.
    /// `Err(true)` = no untried routable instance exists at all.
    fn try_pick(&self, model: &str, exclude: &[String]) -> Result<Arc<Instance>, bool> {
        let now = now_ms();
        let candidates: Vec<Arc<Instance>> = self
            .instances_of(model)
            .into_iter()
            .filter(|i| i.routable(now, self.heartbeat_timeout_ms) && !exclude.contains(&i.id))
            .collect();
        if candidates.is_empty() {
            return Err(true);
        }
        for _ in 0..4 {
            let free: Vec<&Arc<Instance>> = candidates
                .iter()
                .filter(|i| i.outstanding() < i.capacity)
                .collect();
            let pick = match free.len() {
                0 => return Err(false),
                1 => free[0],
                n => {
                    let mut rng = rand::thread_rng();
                    let a = rng.gen_range(0..n);
                    let mut b = rng.gen_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    if free[b].cost() < free[a].cost() {
                        free[b]
                    } else {
                        free[a]
                    }
                }
            };
            if pick.try_reserve() {
                return Ok(pick.clone());
            }
        }
        Err(false)
    }

    /// Waits for a slot on an instance of `model` until `deadline`.
    pub async fn acquire(
        &self,
        model: &str,
        deadline: Instant,
        exclude: &[String],
    ) -> Result<Lease, AcquireError> {
        let gate = self.gate(model);
        if gate.waiting() >= self.max_queue {
            return Err(AcquireError::NoCapacity {
                retry_after_s: self.retry_after(model, &gate),
            });
        }
        gate.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaitGuard(&gate);
        // Tried instances can't be retried; any others may come back.
        let had_tried = !exclude.is_empty();
        loop {
            let notified = gate.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_pick(model, exclude) {
                Ok(instance) => {
                    return Ok(Lease {
                        instance,
                        gate: gate.clone(),
                        since: Instant::now(),
                    })
                }
                Err(true) if had_tried => return Err(AcquireError::Exhausted),
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AcquireError::NoCapacity {
                    retry_after_s: self.retry_after(model, &gate),
                });
            }
            // Re-check at least every 250 ms: health changes don't notify.
            let wake = deadline.min(now + Duration::from_millis(250));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Seconds until a refused request is likely to find room: the queue
    /// ahead divided by how fast the routable capacity drains it.
    pub fn retry_after(&self, model: &str, gate: &ChuteGate) -> u64 {
        let now = now_ms();
        let capacity: u64 = self
            .instances_of(model)
            .iter()
            .filter(|i| i.routable(now, self.heartbeat_timeout_ms))
            .map(|i| i.capacity as u64)
            .sum();
        let service = gate.service_ms.load(Ordering::Relaxed).max(1000);
        if capacity == 0 {
            return 5;
        }
        let ahead = gate.waiting() as u64 + 1;
        (ahead * service / capacity / 1000).clamp(1, 60)
    }
}

struct WaitGuard<'a>(&'a ChuteGate);
impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, miner: &str, cap: u32) -> Arc<Instance> {
        Arc::new(Instance::new(id.into(), miner, "http://x", "m", cap, 2048))
    }

    #[tokio::test]
    async fn never_exceeds_capacity_and_spreads_load() {
        let r = Registry::new(Duration::from_secs(10), 100);
        r.replace_miner("a", vec![inst("a1", "a", 2)]);
        r.replace_miner("b", vec![inst("b1", "b", 2)]);
        let deadline = Instant::now();
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(r.acquire("m", deadline, &[]).await.unwrap());
        }
        let on_a = leases.iter().filter(|l| l.instance.id == "a1").count();
        assert_eq!(on_a, 2);
        assert!(matches!(
            r.acquire("m", deadline, &[]).await,
            Err(AcquireError::NoCapacity { .. })
        ));
        drop(leases.pop());
        assert!(r.acquire("m", deadline, &[]).await.is_ok());
    }

    #[tokio::test]
    async fn excluded_and_backed_off_instances_are_skipped() {
        let r = Registry::new(Duration::from_secs(10), 100);
        r.replace_miner("a", vec![inst("a1", "a", 4)]);
        r.replace_miner("b", vec![inst("b1", "b", 4)]);
        let now = Instant::now();
        let l = r.acquire("m", now, &["a1".into()]).await.unwrap();
        assert_eq!(l.instance.id, "b1");
        l.instance.record_failure();
        drop(l);
        for _ in 0..10 {
            let l = r.acquire("m", now, &[]).await.unwrap();
            assert_eq!(l.instance.id, "a1");
        }
        assert_eq!(
            r.acquire("m", now, &["a1".into()]).await.unwrap_err(),
            AcquireError::Exhausted
        );
    }

    #[tokio::test]
    async fn waiter_gets_slot_when_released_before_deadline() {
        let r = Arc::new(Registry::new(Duration::from_secs(10), 100));
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        let held = r.acquire("m", Instant::now(), &[]).await.unwrap();
        let r2 = r.clone();
        let waiter = tokio::spawn(async move {
            r2.acquire("m", Instant::now() + Duration::from_secs(5), &[])
                .await
                .map(|l| l.instance.id.clone())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), "a1");
    }

    #[tokio::test]
    async fn instance_appearing_later_serves_waiter() {
        let r = Arc::new(Registry::new(Duration::from_secs(10), 100));
        let r2 = r.clone();
        let waiter = tokio::spawn(async move {
            r2.acquire("m", Instant::now() + Duration::from_secs(5), &[])
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn full_queue_refuses_at_once() {
        let r = Registry::new(Duration::from_secs(10), 0);
        let err = r
            .acquire("m", Instant::now() + Duration::from_secs(30), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, AcquireError::NoCapacity { retry_after_s } if retry_after_s >= 1));
    }
}
