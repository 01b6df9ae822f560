//! Retry policy in one place: per-instance circuit breakers, the global
//! retry budget, and the timing constants of health checking.
//!
//! - A breaker opens after `CONSECUTIVE_FAILURES` failures in a row, or
//!   when more than half of the last `WINDOW` outcomes failed (with at
//!   least `MIN_WINDOW` outcomes). It stays open for an exponentially
//!   growing time (500 ms doubling to 30 s), then lets exactly one probe
//!   request through (half-open): success closes it, failure re-opens it.
//! - The retry budget allows retries worth 20% of recent requests plus a
//!   floor of 5 per second, so a broad outage cannot multiply load.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const CONSECUTIVE_FAILURES: u32 = 3;
pub const WINDOW: usize = 20;
pub const MIN_WINDOW: usize = 10;
pub const MAX_ERROR_RATIO: f64 = 0.5;
pub const BASE_OPEN_MS: i64 = 500;
pub const MAX_OPEN_MS: i64 = 30_000;
/// How often the validator probes every instance's `/health`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { until_ms: i64 },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive: u32,
    /// Times opened without a full recovery (drives the back-off).
    opens: u32,
    window: VecDeque<bool>,
}

#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive: 0,
                opens: 0,
                window: VecDeque::with_capacity(WINDOW),
            }),
        }
    }
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        sluice_proto::sync::lock(&self.inner)
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether a request could be sent now (without claiming the probe).
    pub fn admits(&self, now_ms: i64) -> bool {
        match self.lock().state {
            BreakerState::Closed => true,
            BreakerState::Open { until_ms } => now_ms >= until_ms,
            BreakerState::HalfOpen { probing } => !probing,
        }
    }

    /// Claims the right to send one request; in half-open state only one
    /// request (the probe) is let through. Returns false if refused.
    pub fn claim(&self, now_ms: i64) -> bool {
        let mut g = self.lock();
        match g.state {
            BreakerState::Closed => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                g.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probing: false } => {
                g.state = BreakerState::HalfOpen { probing: true };
                true
            }
            BreakerState::HalfOpen { probing: true } => false,
        }
    }

    /// A claimed request ended without a verdict (e.g. client left).
    pub fn release(&self) {
        let mut g = self.lock();
        if let BreakerState::HalfOpen { probing: true } = g.state {
            g.state = BreakerState::HalfOpen { probing: false };
        }
    }

    pub fn on_success(&self) {
        let mut g = self.lock();
        g.consecutive = 0;
        push(&mut g.window, true);
        if matches!(g.state, BreakerState::HalfOpen { .. }) {
            g.state = BreakerState::Closed;
            g.opens = 0;
            g.window.clear();
        }
    }

    pub fn on_failure(&self, now_ms: i64) {
        let mut g = self.lock();
        g.consecutive += 1;
        push(&mut g.window, false);
        let failures = g.window.iter().filter(|ok| !**ok).count();
        let ratio_trips = g.window.len() >= MIN_WINDOW
            && failures as f64 / g.window.len() as f64 > MAX_ERROR_RATIO;
        let trips = match g.state {
            BreakerState::HalfOpen { .. } => true,
            BreakerState::Closed => g.consecutive >= CONSECUTIVE_FAILURES || ratio_trips,
            BreakerState::Open { .. } => false,
        };
        if trips {
            let backoff = (BASE_OPEN_MS << g.opens.min(10)).min(MAX_OPEN_MS);
            g.opens += 1;
            g.state = BreakerState::Open {
                until_ms: now_ms + backoff,
            };
        }
    }
}

fn push(window: &mut VecDeque<bool>, ok: bool) {
    if window.len() == WINDOW {
        window.pop_front();
    }
    window.push_back(ok);
}

/// Global retry budget (token bucket): each first attempt deposits
/// `RATIO` tokens, time adds `FLOOR_PER_SEC`, a retry spends one.
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<(f64, Instant)>,
}

const RATIO: f64 = 0.2;
const FLOOR_PER_SEC: f64 = 5.0;
const MAX_TOKENS: f64 = 100.0;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            inner: Mutex::new((10.0, Instant::now())),
        }
    }
}

impl RetryBudget {
    fn refill(g: &mut (f64, Instant), now: Instant) {
        let dt = now.saturating_duration_since(g.1).as_secs_f64();
        g.0 = (g.0 + dt * FLOOR_PER_SEC).min(MAX_TOKENS);
        g.1 = now;
    }

    pub fn deposit(&self) {
        if let Ok(mut g) = self.inner.lock() {
            Self::refill(&mut g, Instant::now());
            g.0 = (g.0 + RATIO).min(MAX_TOKENS);
        }
    }

    /// Spends one retry; false when the budget is exhausted.
    pub fn try_spend(&self) -> bool {
        self.try_spend_at(Instant::now())
    }

    pub fn try_spend_at(&self, now: Instant) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        Self::refill(&mut g, now);
        if g.0 >= 1.0 {
            g.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_half_opens() {
        let b = Breaker::default();
        b.on_failure(0);
        b.on_failure(0);
        assert!(b.admits(0));
        b.on_failure(0);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 500 });
        assert!(!b.admits(100));
        assert!(!b.claim(100));
        // After the open time, exactly one probe goes through.
        assert!(b.claim(600));
        assert!(!b.claim(600));
        assert!(!b.admits(600));
        // A failed probe re-opens for longer.
        b.on_failure(600);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 1600 });
        assert!(b.claim(1600));
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn released_probe_can_be_claimed_again() {
        let b = Breaker::default();
        for _ in 0..3 {
            b.on_failure(0);
        }
        assert!(b.claim(1000));
        b.release();
        assert!(b.claim(1000));
    }

    #[test]
    fn error_ratio_trips_without_consecutive_failures() {
        let b = Breaker::default();
        for _ in 0..10 {
            b.on_success();
        }
        // Two failures, one success, repeated: never three in a row, but
        // the failure ratio over the window climbs past one half.
        let mut opened_after = None;
        for round in 0..10 {
            b.on_failure(0);
            b.on_failure(0);
            if matches!(b.state(), BreakerState::Open { .. }) {
                opened_after = Some(round);
                break;
            }
            b.on_success();
        }
        let round = opened_after.expect("the error ratio must open the breaker");
        assert!(round >= 3, "opened too early, after round {round}");
    }

    #[test]
    fn retry_budget_is_bounded_and_refills() {
        let budget = RetryBudget::default();
        let start = Instant::now();
        let mut spent = 0;
        while budget.try_spend_at(start) {
            spent += 1;
            assert!(spent <= 11, "budget must be bounded");
        }
        assert!(spent >= 10);
        for _ in 0..10 {
            budget.deposit();
        }
        // 10 deposits at 20% buy about two retries (plus the time floor).
        assert!(budget.try_spend_at(start + Duration::from_millis(1)));
        assert!(budget.try_spend_at(start + Duration::from_secs(1)));
    }
}
