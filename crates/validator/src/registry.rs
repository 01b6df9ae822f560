//! Routable instances per model and the admission path to them.
//!
//! - Health: an instance is routable while its miner's heartbeats are
//!   fresh, its last active probe succeeded, and its circuit breaker
//!   admits traffic. A probe failure takes it out at once; it comes back
//!   after a successful probe once its flap back-off (1 s doubling to
//!   30 s for instances that keep going down) has passed.
//! - Selection: power of two choices over free instances, cost =
//!   (outstanding + 1) x peak-EWMA latency; never a full instance, never
//!   one whose breaker refuses.
//! - Admission: a bounded per-model queue, ordered by priority then
//!   arrival. Freed or new capacity is handed to waiters in that order;
//!   a waiter whose deadline passes leaves with `NoCapacity`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::retry::Breaker;
use sluice_proto::sync::{lock, read, write};
use sluice_store::now_ms;

const FLAP_BASE_MS: i64 = 1_000;
const FLAP_MAX_MS: i64 = 30_000;
/// A probe failure this long after the previous one starts a new count.
const FLAP_MEMORY_MS: i64 = 60_000;

/// One model served by one miner.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub miner_key: String,
    pub endpoint: String,
    /// `<endpoint>/v1/invoke`, parsed once (`None`: not a URL).
    pub invoke_url: Option<http::Uri>,
    pub model: String,
    pub capacity: u32,
    pub context_length: u32,
    outstanding: AtomicU32,
    last_heartbeat_ms: AtomicI64,
    /// Not routable before this time (failed probe, flap back-off).
    probe_down_until_ms: AtomicI64,
    probe_down: std::sync::atomic::AtomicBool,
    probe_failures: AtomicU32,
    last_probe_failure_ms: AtomicI64,
    /// Peak-sensitive EWMA of time to first event, microseconds.
    latency_us: AtomicU64,
    pub breaker: Breaker,
}

/// Where a miner at `endpoint` takes invocations.
/// `None` unless the endpoint is a plain `http://` URL with a host and
/// nothing after its path: invocations are plain HTTP.
pub fn invoke_url(endpoint: &str) -> Option<http::Uri> {
    let base = reqwest::Url::parse(endpoint).ok()?;
    if base.scheme() != "http"
        || base.host_str().is_none_or(str::is_empty)
        || base.query().is_some()
        || base.fragment().is_some()
    {
        return None;
    }
    format!("{}/v1/invoke", base.as_str().trim_end_matches('/'))
        .parse()
        .ok()
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
            invoke_url: invoke_url(endpoint),
            model: model.to_string(),
            capacity: capacity.max(1),
            context_length,
            outstanding: AtomicU32::new(0),
            last_heartbeat_ms: AtomicI64::new(now_ms()),
            probe_down_until_ms: AtomicI64::new(0),
            probe_down: std::sync::atomic::AtomicBool::new(false),
            probe_failures: AtomicU32::new(0),
            last_probe_failure_ms: AtomicI64::new(0),
            latency_us: AtomicU64::new(0),
            breaker: Breaker::default(),
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Healthy by heartbeat and probe (the breaker is checked separately).
    pub fn healthy(&self, now: i64, heartbeat_timeout_ms: i64) -> bool {
        now - self.last_heartbeat_ms.load(Ordering::SeqCst) <= heartbeat_timeout_ms
            && !self.probe_down.load(Ordering::SeqCst)
    }

    fn routable(&self, now: i64, heartbeat_timeout_ms: i64) -> bool {
        self.healthy(now, heartbeat_timeout_ms) && self.breaker.admits(now)
    }

    fn try_reserve(&self) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok()
    }

    fn unreserve(&self) {
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
    }

    /// Selection cost: outstanding work scaled by observed latency.
    fn cost(&self) -> u128 {
        let lat = self.latency_us.load(Ordering::Relaxed).max(1) as u128;
        (self.outstanding() as u128 + 1) * lat
    }

    pub fn heartbeat(&self) {
        self.last_heartbeat_ms.store(now_ms(), Ordering::SeqCst);
    }

    /// An active probe failed: out of routing now; the next readmission
    /// waits longer the more often this instance has gone down recently.
    pub fn probe_failed(&self, now: i64) {
        let last = self.last_probe_failure_ms.swap(now, Ordering::SeqCst);
        let was_down = self.probe_down.swap(true, Ordering::SeqCst);
        if was_down {
            return;
        }
        let n = if now - last > FLAP_MEMORY_MS {
            self.probe_failures.store(1, Ordering::SeqCst);
            1
        } else {
            self.probe_failures.fetch_add(1, Ordering::SeqCst) + 1
        };
        let backoff = (FLAP_BASE_MS << (n - 1).min(10)).min(FLAP_MAX_MS);
        self.probe_down_until_ms
            .store(now + backoff, Ordering::SeqCst);
    }

    /// An active probe succeeded; true if this readmitted the instance.
    pub fn probe_ok(&self, now: i64) -> bool {
        if self.probe_down.load(Ordering::SeqCst)
            && now >= self.probe_down_until_ms.load(Ordering::SeqCst)
        {
            self.probe_down.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    pub fn is_probe_down(&self) -> bool {
        self.probe_down.load(Ordering::SeqCst)
    }
}

/// A waiting request.
#[derive(Debug)]
struct Waiter {
    exclude: Vec<String>,
    assigned: Mutex<Option<Arc<Instance>>>,
    notify: Notify,
}

type QueueKey = (Reverse<u8>, u64);

/// Per-model waiting room.
#[derive(Debug, Default)]
pub struct ChuteGate {
    queue: Mutex<BTreeMap<QueueKey, Arc<Waiter>>>,
    seq: AtomicU64,
    /// EWMA of how long a lease is held, milliseconds.
    service_ms: AtomicU64,
}

impl ChuteGate {
    pub fn waiting(&self) -> usize {
        lock(&self.queue).len()
    }
}

/// A reserved slot on an instance; released on drop. The outcome of the
/// attempt is reported through [`Lease::succeeded`] / [`Lease::failed`].
#[derive(Debug)]
pub struct Lease {
    pub instance: Arc<Instance>,
    registry: Arc<Registry>,
    since: Instant,
    reported: bool,
}

impl Lease {
    /// The instance answered; `first_event` feeds the latency EWMA.
    pub fn succeeded(&mut self, first_event: Duration) {
        self.reported = true;
        self.instance.breaker.on_success();
        let sample = first_event.as_micros().min(u64::MAX as u128) as u64;
        let _ =
            self.instance
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

    pub fn failed(&mut self) {
        self.reported = true;
        self.instance.breaker.on_failure(now_ms());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.reported {
            self.instance.breaker.release();
        }
        self.instance.unreserve();
        let gate = self.registry.gate(&self.instance.model);
        let held = self.since.elapsed().as_millis() as u64;
        let _ = gate
            .service_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { held } else { (old * 7 + held) / 8 })
            });
        self.registry.dispatch(&self.instance.model);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireError {
    /// The deadline passed (or the queue is full) with no free slot.
    NoCapacity { retry_after_s: u64 },
    /// Every routable instance was already tried by this request.
    Exhausted,
}

/// The routing table: instances per model (copy-on-write, so readers
/// take an `Arc` and never hold the lock while selecting) and per miner.
#[derive(Debug, Default)]
struct Table {
    models: HashMap<String, Arc<Vec<Arc<Instance>>>>,
    by_miner: HashMap<String, Vec<Arc<Instance>>>,
    /// Largest context window among a model's instances.
    max_context: HashMap<String, u32>,
}

#[derive(Debug)]
pub struct Registry {
    table: RwLock<Table>,
    gates: RwLock<HashMap<String, Arc<ChuteGate>>>,
    heartbeat_timeout_ms: i64,
    max_queue: usize,
}

/// Why no instance could be picked right now.
#[derive(Debug, PartialEq, Eq)]
enum PickMiss {
    /// No untried healthy instance exists.
    NoneEligible,
    /// Eligible instances exist but all are full or refusing.
    Busy,
}

/// Random pairs sampled before falling back to a full scan.
const SAMPLED_PAIRS: usize = 32;

impl Registry {
    pub fn new(heartbeat_timeout: Duration, max_queue: usize) -> Self {
        Registry {
            table: RwLock::new(Table::default()),
            gates: RwLock::new(HashMap::new()),
            heartbeat_timeout_ms: heartbeat_timeout.as_millis() as i64,
            max_queue,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        read(&self.table)
    }

    pub fn gate(&self, model: &str) -> Arc<ChuteGate> {
        if let Ok(g) = self.gates.read() {
            if let Some(gate) = g.get(model) {
                return gate.clone();
            }
        }
        let mut g = write(&self.gates);
        g.entry(model.to_string()).or_default().clone()
    }

    /// Replaces every instance of `miner_key` with `new` (a key
    /// re-registering from a new endpoint keeps no old instances).
    pub fn replace_miner(&self, miner_key: &str, new: Vec<Arc<Instance>>) {
        let mut models: Vec<String> = new.iter().map(|i| i.model.clone()).collect();
        {
            let mut table = write(&self.table);
            let old = table.by_miner.remove(miner_key).unwrap_or_default();
            models.extend(old.iter().map(|i| i.model.clone()));
            models.sort();
            models.dedup();
            for model in &models {
                let mut list: Vec<Arc<Instance>> = table
                    .models
                    .get(model)
                    .map(|l| {
                        l.iter()
                            .filter(|i| i.miner_key != miner_key)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                list.extend(new.iter().filter(|i| &i.model == model).cloned());
                let ctx = list.iter().map(|i| i.context_length).max().unwrap_or(0);
                table.max_context.insert(model.clone(), ctx);
                table.models.insert(model.clone(), Arc::new(list));
            }
            if !new.is_empty() {
                table.by_miner.insert(miner_key.to_string(), new);
            }
        }
        for m in models {
            self.dispatch(&m);
        }
    }

    /// Records a heartbeat; false when the miner has no instances here.
    pub fn heartbeat(&self, miner_key: &str) -> bool {
        let mine = self
            .read()
            .by_miner
            .get(miner_key)
            .cloned()
            .unwrap_or_default();
        let mut models: Vec<String> = Vec::new();
        for inst in &mine {
            inst.heartbeat();
            models.push(inst.model.clone());
        }
        models.dedup();
        for m in &models {
            self.dispatch(m);
        }
        !mine.is_empty()
    }

    /// Every instance of every model.
    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.read()
            .models
            .values()
            .flat_map(|l| l.iter().cloned())
            .collect()
    }

    /// Routable instances per model (for metrics and the status page).
    pub fn routable_counts(&self) -> Vec<(String, usize)> {
        let now = now_ms();
        let models: Vec<(String, Arc<Vec<Arc<Instance>>>)> = self
            .read()
            .models
            .iter()
            .map(|(m, l)| (m.clone(), l.clone()))
            .collect();
        models
            .into_iter()
            .map(|(m, l)| {
                let n = l
                    .iter()
                    .filter(|i| i.routable(now, self.heartbeat_timeout_ms))
                    .count();
                (m, n)
            })
            .collect()
    }

    /// Waits until at least `n` instances are routable; false on timeout.
    pub async fn wait_routable(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let routable: usize = self.routable_counts().iter().map(|(_, c)| c).sum();
            if routable >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The largest context window any instance of `model` offers.
    pub fn max_context(&self, model: &str) -> Option<u32> {
        self.read()
            .max_context
            .get(model)
            .copied()
            .filter(|c| *c > 0)
    }

    /// The instances of a model (a shared snapshot: O(1)).
    pub fn instances_of(&self, model: &str) -> Arc<Vec<Arc<Instance>>> {
        self.read().models.get(model).cloned().unwrap_or_default()
    }

    /// Whether `i` could take a request now (before reserving).
    fn free_for(&self, i: &Instance, now: i64, exclude: &[String]) -> bool {
        i.healthy(now, self.heartbeat_timeout_ms)
            && i.outstanding() < i.capacity
            && i.breaker.admits(now)
            && !exclude.contains(&i.id)
    }

    fn reserve(i: &Arc<Instance>, now: i64) -> bool {
        if i.try_reserve() {
            if i.breaker.claim(now) {
                return true;
            }
            i.unreserve();
        }
        false
    }

    /// Picks and reserves an instance now, if one is free. Power of two
    /// choices by sampling random pairs (constant time however many
    /// instances there are); a full scan only when sampling keeps missing.
    fn try_pick(&self, model: &str, exclude: &[String]) -> Result<Arc<Instance>, PickMiss> {
        let now = now_ms();
        let instances = self.instances_of(model);
        let n = instances.len();
        let mut rng = rand::thread_rng();
        if n > 2 * SAMPLED_PAIRS {
            for _ in 0..SAMPLED_PAIRS {
                let a = &instances[rng.gen_range(0..n)];
                let b = &instances[rng.gen_range(0..n)];
                let (fa, fb) = (
                    self.free_for(a, now, exclude),
                    self.free_for(b, now, exclude),
                );
                let pick = match (fa, fb) {
                    (true, true) if b.cost() < a.cost() => b,
                    (true, _) => a,
                    (false, true) => b,
                    (false, false) => continue,
                };
                if Self::reserve(pick, now) {
                    return Ok(pick.clone());
                }
            }
        }
        let mut free: Vec<&Arc<Instance>> = Vec::with_capacity(n.min(64));
        let mut eligible = false;
        for i in instances.iter() {
            if !i.healthy(now, self.heartbeat_timeout_ms) || exclude.contains(&i.id) {
                continue;
            }
            eligible = true;
            if i.outstanding() < i.capacity && i.breaker.admits(now) {
                free.push(i);
            }
        }
        if !eligible {
            return Err(PickMiss::NoneEligible);
        }
        while !free.is_empty() {
            let n = free.len();
            let idx = if n == 1 {
                0
            } else {
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                if free[b].cost() < free[a].cost() {
                    b
                } else {
                    a
                }
            };
            let pick = free[idx];
            if Self::reserve(pick, now) {
                return Ok(pick.clone());
            }
            free.swap_remove(idx);
        }
        Err(PickMiss::Busy)
    }

    /// Hands free capacity of `model` to its waiters, in queue order.
    pub fn dispatch(&self, model: &str) {
        let gate = self.gate(model);
        let mut queue = lock(&gate.queue);
        if queue.is_empty() {
            return;
        }
        let mut served = Vec::new();
        for (key, waiter) in queue.iter() {
            match self.try_pick(model, &waiter.exclude) {
                Ok(inst) => {
                    *lock(&waiter.assigned) = Some(inst);
                    waiter.notify.notify_one();
                    served.push(*key);
                }
                // Nothing free for a waiter without exclusions means
                // nothing is free for anyone behind it either.
                Err(PickMiss::Busy) if waiter.exclude.is_empty() => break,
                Err(_) => {
                    // Let a waiter with no untried instance give up.
                    waiter.notify.notify_one();
                }
            }
        }
        for key in served {
            queue.remove(&key);
        }
    }

    /// Waits for a slot on an instance of `model` until `deadline`.
    /// Higher `priority` waiters are served first; FIFO within a priority.
    pub async fn acquire(
        self: &Arc<Self>,
        model: &str,
        deadline: Instant,
        exclude: &[String],
        priority: u8,
    ) -> Result<Lease, AcquireError> {
        let gate = self.gate(model);
        let lease = |instance: Arc<Instance>| Lease {
            instance,
            registry: self.clone(),
            since: Instant::now(),
            reported: false,
        };
        let waiter = Arc::new(Waiter {
            exclude: exclude.to_vec(),
            assigned: Mutex::new(None),
            notify: Notify::new(),
        });
        let key = (Reverse(priority), gate.seq.fetch_add(1, Ordering::SeqCst));
        {
            let mut queue = lock(&gate.queue);
            // Fast path only when nobody is queued ahead.
            if queue.is_empty() {
                match self.try_pick(model, exclude) {
                    Ok(inst) => return Ok(lease(inst)),
                    Err(PickMiss::NoneEligible) if !exclude.is_empty() => {
                        return Err(AcquireError::Exhausted)
                    }
                    Err(_) => {}
                }
            }
            if queue.len() >= self.max_queue {
                drop(queue);
                return Err(AcquireError::NoCapacity {
                    retry_after_s: self.retry_after(model, &gate),
                });
            }
            queue.insert(key, waiter.clone());
        }
        let mut guard = QueueGuard {
            registry: self,
            gate: &gate,
            key,
            waiter: &waiter,
            done: false,
        };
        loop {
            if let Some(inst) = lock(&waiter.assigned).take() {
                guard.done = true;
                return Ok(lease(inst));
            }
            let now = Instant::now();
            if now >= deadline {
                guard.leave();
                if let Some(inst) = lock(&waiter.assigned).take() {
                    return Ok(lease(inst));
                }
                return Err(AcquireError::NoCapacity {
                    retry_after_s: self.retry_after(model, &gate),
                });
            }
            if !exclude.is_empty() {
                let t = now_ms();
                let untried = self
                    .instances_of(model)
                    .iter()
                    .any(|i| i.healthy(t, self.heartbeat_timeout_ms) && !exclude.contains(&i.id));
                if !untried {
                    guard.leave();
                    if let Some(inst) = lock(&waiter.assigned).take() {
                        return Ok(lease(inst));
                    }
                    return Err(AcquireError::Exhausted);
                }
            }
            // Health changes do not notify: re-dispatch every 250 ms.
            let wake = deadline.min(now + Duration::from_millis(250));
            tokio::select! {
                _ = waiter.notify.notified() => {}
                _ = tokio::time::sleep_until(wake) => self.dispatch(model),
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
        if capacity == 0 {
            return 5;
        }
        let service = gate.service_ms.load(Ordering::Relaxed).max(500);
        let ahead = gate.waiting() as u64 + 1;
        (ahead * service / capacity / 1000).clamp(1, 60)
    }
}

/// Removes a waiter from its queue however `acquire` ends (including
/// cancellation), returning any slot assigned to it in the meantime.
struct QueueGuard<'a> {
    registry: &'a Registry,
    gate: &'a ChuteGate,
    key: QueueKey,
    waiter: &'a Waiter,
    done: bool,
}

impl QueueGuard<'_> {
    fn leave(&mut self) {
        lock(&self.gate.queue).remove(&self.key);
        self.done = true;
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.gate.queue).remove(&self.key);
        }
        if let Some(inst) = lock(&self.waiter.assigned).take() {
            inst.breaker.release();
            inst.unreserve();
            self.registry.dispatch(&inst.model);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, miner: &str, cap: u32) -> Arc<Instance> {
        Arc::new(Instance::new(id.into(), miner, "http://x", "m", cap, 2048))
    }

    fn registry(max_queue: usize) -> Arc<Registry> {
        Arc::new(Registry::new(Duration::from_secs(10), max_queue))
    }

    #[tokio::test]
    async fn never_exceeds_capacity() {
        let r = registry(100);
        r.replace_miner("a", vec![inst("a1", "a", 2)]);
        r.replace_miner("b", vec![inst("b1", "b", 2)]);
        let now = Instant::now();
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(r.acquire("m", now, &[], 0).await.unwrap());
        }
        let on_a = leases.iter().filter(|l| l.instance.id == "a1").count();
        assert_eq!(on_a, 2);
        assert!(matches!(
            r.acquire("m", now, &[], 0).await,
            Err(AcquireError::NoCapacity { .. })
        ));
        drop(leases.pop());
        assert!(r.acquire("m", now, &[], 0).await.is_ok());
    }

    #[tokio::test]
    async fn open_breaker_and_excluded_instances_are_skipped() {
        let r = registry(100);
        r.replace_miner("a", vec![inst("a1", "a", 4)]);
        r.replace_miner("b", vec![inst("b1", "b", 4)]);
        let now = Instant::now();
        let l = r.acquire("m", now, &["a1".into()], 0).await.unwrap();
        assert_eq!(l.instance.id, "b1");
        drop(l);
        for _ in 0..3 {
            let mut l = r.acquire("m", now, &["a1".into()], 0).await.unwrap();
            l.failed();
        }
        for _ in 0..10 {
            let l = r.acquire("m", now, &[], 0).await.unwrap();
            assert_eq!(l.instance.id, "a1");
        }
        // b1 is open and a1 excluded: nothing left to try.
        assert!(r.acquire("m", now, &["a1".into()], 0).await.is_err());
    }

    #[tokio::test]
    async fn failed_probe_removes_and_flapping_backs_off() {
        let r = registry(100);
        let a = inst("a1", "a", 1);
        r.replace_miner("a", vec![a.clone()]);
        let t = now_ms();
        a.probe_failed(t);
        assert!(r.acquire("m", Instant::now(), &[], 0).await.is_err());
        assert!(!a.probe_ok(t + 500), "must wait out the back-off");
        assert!(a.probe_ok(t + 1_000));
        assert!(r.acquire("m", Instant::now(), &[], 0).await.is_ok());
        // Going down again soon after: twice the back-off.
        a.probe_failed(t + 2_000);
        assert!(!a.probe_ok(t + 3_500));
        assert!(a.probe_ok(t + 4_000));
    }

    #[tokio::test]
    async fn waiters_are_served_in_fifo_order_within_priority() {
        let r = registry(100);
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        let held = r.acquire("m", Instant::now(), &[], 0).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, prio) in [(0, 0u8), (1, 0), (2, 1), (3, 0)] {
            let (r, order) = (r.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let l = r
                    .acquire("m", Instant::now() + Duration::from_secs(10), &[], prio)
                    .await
                    .unwrap();
                lock(&order).push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(l);
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*lock(&order), vec![2, 0, 1, 3]);
    }

    #[tokio::test]
    async fn instance_appearing_later_serves_waiter_and_deadline_bounds_wait() {
        let r = registry(100);
        let r2 = r.clone();
        let waiter = tokio::spawn(async move {
            r2.acquire("m", Instant::now() + Duration::from_secs(5), &[], 0)
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        assert!(waiter.await.unwrap());
        let started = Instant::now();
        let _held = r.acquire("m", Instant::now(), &[], 0).await.unwrap();
        let err = r
            .acquire("m", Instant::now() + Duration::from_millis(300), &[], 0)
            .await
            .unwrap_err();
        assert!(matches!(err, AcquireError::NoCapacity { retry_after_s } if retry_after_s >= 1));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            r.gate("m").waiting(),
            0,
            "a timed-out waiter leaves the queue"
        );
    }

    #[tokio::test]
    async fn bounded_queue_refuses_at_once() {
        let r = registry(1);
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        let _held = r.acquire("m", Instant::now(), &[], 0).await.unwrap();
        let r2 = r.clone();
        let queued = tokio::spawn(async move {
            r2.acquire("m", Instant::now() + Duration::from_secs(2), &[], 0)
                .await
                .is_ok()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let err = r
            .acquire("m", Instant::now() + Duration::from_secs(30), &[], 0)
            .await
            .unwrap_err();
        assert!(matches!(err, AcquireError::NoCapacity { .. }));
        assert!(started.elapsed() < Duration::from_secs(1));
        queued.abort();
    }

    #[tokio::test]
    async fn cancelled_waiter_returns_its_assigned_slot() {
        let r = registry(100);
        r.replace_miner("a", vec![inst("a1", "a", 1)]);
        let held = r.acquire("m", Instant::now(), &[], 0).await.unwrap();
        let r2 = r.clone();
        let w = tokio::spawn(async move {
            let _ = r2
                .acquire("m", Instant::now() + Duration::from_secs(5), &[], 0)
                .await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        w.abort();
        let _ = w.await;
        drop(held);
        let a = &r.instances_of("m")[0];
        assert_eq!(a.outstanding(), 0);
        assert!(r.acquire("m", Instant::now(), &[], 0).await.is_ok());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the capacities, breaker states and exclusions, a pick is
        /// never full, never open, never excluded; and when every instance
        /// is open or excluded, nothing is picked.
        #[test]
        fn picks_respect_capacity_breakers_and_exclusions(
            caps in proptest::collection::vec(1u32..4, 1..8),
            open in proptest::collection::vec(any::<bool>(), 8),
            excluded in proptest::collection::vec(any::<bool>(), 8),
            requests in 1usize..40,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let r = Arc::new(Registry::new(Duration::from_secs(10), 1000));
                let mut insts = Vec::new();
                for (i, cap) in caps.iter().enumerate() {
                    let inst = Arc::new(Instance::new(format!("i{i}"), &format!("k{i}"), "http://x", "m", *cap, 2048));
                    if open[i] {
                        for _ in 0..3 {
                            inst.breaker.on_failure(now_ms());
                        }
                    }
                    r.replace_miner(&format!("k{i}"), vec![inst.clone()]);
                    insts.push(inst);
                }
                let exclude: Vec<String> = insts.iter().enumerate()
                    .filter(|(i, _)| excluded[*i]).map(|(_, x)| x.id.clone()).collect();
                let usable: u32 = insts.iter().enumerate()
                    .filter(|(i, _)| !open[*i] && !excluded[*i]).map(|(_, x)| x.capacity).sum();
                let mut leases = Vec::new();
                for _ in 0..requests {
                    if let Ok(l) = r.acquire("m", Instant::now(), &exclude, 0).await {
                            let idx: usize = l.instance.id[1..].parse().unwrap();
                            prop_assert!(!open[idx], "picked an open breaker");
                            prop_assert!(!excluded[idx], "picked an excluded instance");
                            prop_assert!(l.instance.outstanding() <= l.instance.capacity);
                            leases.push(l);
                    }
                }
                // Exactly the usable capacity is handed out, no more.
                prop_assert_eq!(leases.len() as u32, usable.min(requests as u32));
                Ok(())
            })?;
        }

        /// With equal instances, power of two choices spreads load: no
        /// instance ends up with more than twice the fair share.
        #[test]
        fn load_spreads_across_equal_instances(n in 2usize..8, per in 2u32..6) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let r = Arc::new(Registry::new(Duration::from_secs(10), 1000));
                for i in 0..n {
                    r.replace_miner(&format!("k{i}"), vec![Arc::new(Instance::new(format!("i{i}"), &format!("k{i}"), "http://x", "m", 1000, 2048))]);
                }
                let total = n * per as usize;
                let mut leases = Vec::new();
                for _ in 0..total {
                    leases.push(r.acquire("m", Instant::now(), &[], 0).await.unwrap());
                }
                for inst in r.instances_of("m").iter() {
                    prop_assert!(inst.outstanding() <= 2 * per, "{} has {} of {}", inst.id, inst.outstanding(), total);
                }
                Ok(())
            })?;
        }
    }
}

#[cfg(test)]
mod sampling {
    use super::*;

    /// The sampling path (many instances) keeps the same guarantees.
    #[tokio::test]
    async fn large_tables_never_pick_open_full_or_excluded() {
        let r = Arc::new(Registry::new(Duration::from_secs(10), 1000));
        let mut usable = 0;
        let mut exclude = Vec::new();
        for i in 0..300 {
            let inst = Arc::new(Instance::new(
                format!("i{i}"),
                &format!("k{i}"),
                "http://x",
                "m",
                2,
                2048,
            ));
            match i % 3 {
                0 => {
                    for _ in 0..3 {
                        inst.breaker.on_failure(now_ms());
                    }
                }
                1 if i % 7 == 0 => exclude.push(inst.id.clone()),
                _ => usable += 2,
            }
            r.replace_miner(&format!("k{i}"), vec![inst]);
        }
        let mut leases = Vec::new();
        while let Ok(l) = r.acquire("m", Instant::now(), &exclude, 0).await {
            let i: usize = l.instance.id[1..].parse().unwrap();
            assert_ne!(i % 3, 0, "picked an open breaker");
            assert!(!exclude.contains(&l.instance.id));
            assert!(l.instance.outstanding() <= 2);
            leases.push(l);
        }
        assert_eq!(leases.len(), usable);
    }
}
