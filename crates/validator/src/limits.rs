//! Per-key request and token rate limits over a sliding 60-second window.
//! One node keeps the windows in memory; replicas share them in Redis,
//! where a Lua script checks and records atomically, so a limit holds
//! exactly however requests are spread over replicas. (The free tier's
//! daily quota is a durable counter in the database, see the store.)
//!
//! If Redis is unreachable the limiter fails open (logs, admits): rate
//! limits protect capacity, the ledger protects money.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

const WINDOW_MS: i64 = 60_000;

/// Limits of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    pub rpm: u64,
    pub tpm: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Requests,
    Tokens,
}

/// The outcome of an admission, with what the rate-limit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    pub exceeded: Option<Exceeded>,
    pub requests_limit: u64,
    pub requests_remaining: u64,
    /// Until one more request fits.
    pub requests_reset_ms: i64,
    pub tokens_limit: u64,
    pub tokens_remaining: u64,
    /// Until the window has room for the tokens asked for.
    pub tokens_reset_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One key's window in memory, with running totals so that admitting
/// and updating cost O(1) whatever the limits (a key allowed 100k
/// requests a minute keeps 100k entries). An admitted request is found
/// again by the sequence number [`Limiter::admit`] hands out, not by its
/// id: an entry is 32 bytes in a ring, with no string or hash-map slot of
/// its own (at 15,000 requests a second one key's window holds 900,000).
#[derive(Default)]
pub struct Window {
    /// Tells this window from an earlier one of the same key that was
    /// dropped while idle (numbered per limiter).
    id: u64,
    /// Oldest first, in increasing `seq`; entries of removed requests stay
    /// (dead) until they reach either end.
    entries: VecDeque<Entry>,
    /// The sequence number the next entry gets. Never reused, so a stale
    /// [`Recorded`] cannot reach a newer request's entry.
    next_seq: u64,
    count: u64,
    used: u64,
}

struct Entry {
    seq: u64,
    ts: i64,
    tokens: u64,
    live: bool,
}

/// Where [`Limiter::admit`] recorded a request, for [`Limiter::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The entry's window and sequence number on this node.
    Local { window: u64, seq: u64 },
    /// In Redis, found by the request id.
    Shared,
}

/// The outcome of [`Limiter::admit`]: the decision and, when the request
/// fits, where it was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub state: WindowState,
    pub recorded: Option<Recorded>,
}

impl Window {
    fn prune(&mut self, now: i64) {
        while let Some(e) = self.entries.front() {
            if e.live && e.ts > now - WINDOW_MS {
                break;
            }
            if let Some(e) = self.entries.pop_front() {
                if e.live {
                    self.count -= 1;
                    self.used -= e.tokens;
                }
            }
        }
        while self.entries.back().is_some_and(|e| !e.live) {
            self.entries.pop_back();
        }
    }

    fn push(&mut self, ts: i64, tokens: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry {
            seq,
            ts,
            tokens,
            live: true,
        });
        self.count += 1;
        self.used += tokens;
        seq
    }

    /// The live entry with sequence number `seq`, if still in the window.
    fn find(&mut self, seq: u64) -> Option<&mut Entry> {
        let first = self.entries.front()?.seq;
        // Sequence numbers are contiguous unless dead entries were taken
        // off the back: try the direct index, then search.
        let guess = usize::try_from(seq.checked_sub(first)?).ok()?;
        let at = match self.entries.get(guess) {
            Some(e) if e.seq == seq => guess,
            _ => self.entries.binary_search_by_key(&seq, |e| e.seq).ok()?,
        };
        self.entries.get_mut(at).filter(|e| e.live)
    }

    fn update(&mut self, seq: u64, tokens: Option<u64>) {
        let Some(e) = self.find(seq) else {
            return;
        };
        let old = e.tokens;
        match tokens {
            Some(t) => {
                e.tokens = t;
                self.used = self.used - old + t;
            }
            None => {
                e.tokens = 0;
                e.live = false;
                self.used -= old;
                self.count -= 1;
            }
        }
    }

    fn state(&self, tokens: u64, limits: WindowLimits, now: i64) -> WindowState {
        let live = self.entries.iter().filter(|e| e.live);
        decide_totals(
            self.count,
            self.used,
            live.clone().next().map(|e| e.ts),
            self.entries.back().map(|e| e.ts),
            live.map(|e| (e.ts, e.tokens)),
            tokens,
            limits,
            now,
        )
    }
}

pub enum Limiter {
    Local(Mutex<Windows>),
    Redis(RedisLimiter),
}

/// This node's windows, by key id.
#[derive(Default)]
pub struct Windows {
    by_key: HashMap<String, Window>,
    /// Windows made so far: the next one's id.
    made: u64,
}

pub struct RedisLimiter {
    conn: redis::aio::MultiplexedConnection,
    admit: redis::Script,
    update: redis::Script,
}

impl Limiter {
    pub fn local() -> Self {
        Limiter::Local(Mutex::new(Windows::default()))
    }

    pub async fn redis(url: &str) -> Result<Self, LimitError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok(Limiter::Redis(RedisLimiter {
            conn,
            admit: redis::Script::new(ADMIT_LUA),
            update: redis::Script::new(UPDATE_LUA),
        }))
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Limiter::Redis(_))
    }

    /// Checks and (if allowed) records a request of `tokens` estimated tokens.
    pub async fn admit(
        &self,
        key_id: &str,
        request_id: &str,
        tokens: u64,
        limits: WindowLimits,
        now: i64,
    ) -> Result<Admission, LimitError> {
        let tokens = tokens.min(limits.tpm);
        match self {
            Limiter::Local(windows) => {
                let mut guard = sluice_proto::sync::lock(windows);
                let Windows { by_key, made } = &mut *guard;
                if by_key.len() > 100_000 {
                    by_key.retain(|_, w| w.entries.back().is_some_and(|e| e.ts > now - WINDOW_MS));
                }
                let window = match by_key.get_mut(key_id) {
                    Some(w) => w,
                    None => {
                        *made += 1;
                        by_key.entry(key_id.to_string()).or_insert(Window {
                            id: *made,
                            ..Window::default()
                        })
                    }
                };
                window.prune(now);
                let state = window.state(tokens, limits, now);
                let recorded = state.exceeded.is_none().then(|| Recorded::Local {
                    window: window.id,
                    seq: window.push(now, tokens),
                });
                Ok(Admission { state, recorded })
            }
            Limiter::Redis(r) => {
                let mut conn = r.conn.clone();
                let (zset, tokens_key) = redis_keys(key_id);
                let reply: Vec<i64> = r
                    .admit
                    .key(zset)
                    .key(tokens_key)
                    .arg(now)
                    .arg(WINDOW_MS)
                    .arg(limits.rpm)
                    .arg(limits.tpm)
                    .arg(tokens)
                    .arg(request_id)
                    .invoke_async(&mut conn)
                    .await?;
                // The script returns the window's totals as they were
                // before this request (and recorded it if it fits): decide
                // the same way.
                let state = decide_reply(&reply, tokens, limits, now);
                let recorded = state.exceeded.is_none().then_some(Recorded::Shared);
                Ok(Admission { state, recorded })
            }
        }
    }

    /// Replaces a recorded request's token estimate with its actual count,
    /// or removes it (`None`: the request was not served). `recorded` is
    /// what [`Limiter::admit`] returned for the request.
    pub async fn update(
        &self,
        key_id: &str,
        request_id: &str,
        recorded: Recorded,
        tokens: Option<u64>,
    ) -> Result<(), LimitError> {
        match self {
            Limiter::Local(windows) => {
                if let Recorded::Local { window, seq } = recorded {
                    let mut windows = sluice_proto::sync::lock(windows);
                    if let Some(w) = windows.by_key.get_mut(key_id) {
                        if w.id == window {
                            w.update(seq, tokens);
                        }
                    }
                }
                Ok(())
            }
            Limiter::Redis(r) => {
                let mut conn = r.conn.clone();
                let (zset, tokens_key) = redis_keys(key_id);
                let _: i64 = r
                    .update
                    .key(zset)
                    .key(tokens_key)
                    .arg(request_id)
                    .arg(tokens.map_or(-1, |t| t as i64))
                    .invoke_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }
}

/// A key's window in Redis: a sorted set of request ids by admission time,
/// and a hash of each id's tokens plus the running total (`#used`). The
/// braces keep both in one slot of a Redis Cluster.
fn redis_keys(key_id: &str) -> (String, String) {
    (
        format!("sluice:rl2:{{{key_id}}}"),
        format!("sluice:rl2:{{{key_id}}}:tokens"),
    )
}

/// The admission decision from [`ADMIT_LUA`]'s reply: count, tokens used,
/// oldest and newest time (-1: empty), then (time, tokens) pairs oldest
/// first, present only when the tokens asked for do not fit.
fn decide_reply(reply: &[i64], tokens: u64, limits: WindowLimits, now: i64) -> WindowState {
    let at = |i: usize| reply.get(i).copied().unwrap_or(-1);
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    let time = |v: i64| (v >= 0).then_some(v);
    let entries = reply
        .get(4..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|p| (p[0], unsigned(p[1])));
    decide_totals(
        unsigned(at(0)),
        unsigned(at(1)),
        time(at(2)),
        time(at(3)),
        entries,
        tokens,
        limits,
        now,
    )
}

/// The admission decision from a window's totals: `count` live entries
/// holding `used` tokens, the oldest and newest entry times, and the live
/// entries oldest first (walked only to find when enough tokens leave).
#[allow(clippy::too_many_arguments)]
fn decide_totals(
    count: u64,
    used: u64,
    oldest: Option<i64>,
    newest: Option<i64>,
    live: impl Iterator<Item = (i64, u64)>,
    tokens: u64,
    limits: WindowLimits,
    now: i64,
) -> WindowState {
    let oldest_reset = oldest.map_or(0, |ts| ts + WINDOW_MS - now).max(0);
    let exceeded = if count + 1 > limits.rpm {
        Some(Exceeded::Requests)
    } else if used + tokens > limits.tpm {
        Some(Exceeded::Tokens)
    } else {
        None
    };
    // When will enough tokens have left the window?
    let mut tokens_reset = 0;
    if used + tokens > limits.tpm {
        let mut freed = 0;
        for (ts, t) in live {
            freed += t;
            if used - freed + tokens <= limits.tpm {
                tokens_reset = (ts + WINDOW_MS - now).max(0);
                break;
            }
        }
    }
    // The newest entry leaves the window last.
    let full_reset = if exceeded.is_none() {
        WINDOW_MS
    } else {
        newest.map_or(0, |ts| (ts + WINDOW_MS - now).max(0))
    };
    let (count_after, used_after) = if exceeded.is_none() {
        (count + 1, used + tokens)
    } else {
        (count, used)
    };
    WindowState {
        exceeded,
        requests_limit: limits.rpm,
        requests_remaining: limits.rpm.saturating_sub(count_after),
        // Over a limit: until the next request fits. Otherwise, as OpenAI
        // reports it: until the window is back to its initial state.
        requests_reset_ms: if count_after >= limits.rpm {
            oldest_reset.max(1)
        } else {
            full_reset
        },
        tokens_limit: limits.tpm,
        tokens_remaining: limits.tpm.saturating_sub(used_after),
        tokens_reset_ms: if exceeded == Some(Exceeded::Tokens) {
            tokens_reset
        } else {
            full_reset
        },
    }
}

/// Prunes the window (subtracting what leaves from the running total),
/// returns its totals as they were before this request, and records the
/// request if it fits. Work per call is O(log n) plus what leaves the
/// window; the entries themselves are returned only when the tokens asked
/// for do not fit (to tell when enough will have left). KEYS: the sorted
/// set, the tokens hash. ARGV: now, window, rpm, tpm, tokens, request id.
const ADMIT_LUA: &str = r#"
local z, t = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local id = ARGV[6]
local cutoff = now - window
local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
if #old > 0 then
  local freed = 0
  for i = 1, #old, 500 do
    local part = {}
    for j = i, math.min(i + 499, #old) do part[#part + 1] = old[j] end
    local tk = redis.call('HMGET', t, unpack(part))
    for j = 1, #tk do freed = freed + (tonumber(tk[j]) or 0) end
    redis.call('HDEL', t, unpack(part))
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
  redis.call('HINCRBY', t, '#used', -freed)
end
local count = redis.call('ZCARD', z)
local used = tonumber(redis.call('HGET', t, '#used')) or 0
local out = {count, used, -1, -1}
if count > 0 then
  out[3] = tonumber(redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')[2])
  out[4] = tonumber(redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')[2])
end
if used + tokens > tpm then
  local all = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
  for i = 1, #all, 1000 do
    local part = {}
    for j = i, math.min(i + 999, #all), 2 do part[#part + 1] = all[j] end
    local tk = redis.call('HMGET', t, unpack(part))
    for j = 1, #part do
      out[#out + 1] = tonumber(all[i + 2 * (j - 1) + 1])
      out[#out + 1] = tonumber(tk[j]) or 0
    end
  end
end
if count + 1 <= rpm and used + tokens <= tpm then
  -- An id admitted twice counts once, with its latest tokens.
  local prev = tonumber(redis.call('HGET', t, id)) or 0
  redis.call('ZADD', z, now, id)
  redis.call('HSET', t, id, tokens)
  redis.call('HINCRBY', t, '#used', tokens - prev)
  redis.call('PEXPIRE', z, window * 2)
  redis.call('PEXPIRE', t, window * 2)
end
return out
"#;

/// Rewrites (ARGV[2] >= 0) or removes (ARGV[2] = -1) a request's entry and
/// moves the running total with it; a request no longer in the window is
/// left alone. KEYS: the sorted set, the tokens hash.
const UPDATE_LUA: &str = r#"
local z, t = KEYS[1], KEYS[2]
local id = ARGV[1]
local tokens = tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', t, id))
if not old then
  return 0
end
if tokens >= 0 then
  redis.call('HSET', t, id, tokens)
  redis.call('HINCRBY', t, '#used', tokens - old)
else
  redis.call('ZREM', z, id)
  redis.call('HDEL', t, id)
  redis.call('HINCRBY', t, '#used', -old)
end
return 1
"#;

/// OpenAI-style duration for reset headers: `1s`, `6m0s`, `1h2m3s`, `250ms`.
pub fn reset_string(ms: i64) -> String {
    let mut out = String::with_capacity(16);
    Reset(ms).push_to(&mut out);
    out
}

/// A reset duration in milliseconds, written as [`reset_string`] gives it.
pub struct Reset(pub i64);

impl Reset {
    /// Appends the time as the `x-ratelimit-reset-*` headers write it
    /// (`250ms`, `7s`, `1m5s`, `2h0m1s`). Integers through `itoa`: these
    /// headers are written on every response.
    pub fn push_to(&self, out: &mut String) {
        let mut n = itoa::Buffer::new();
        let ms = self.0.max(0);
        if ms < 1000 {
            out.push_str(n.format(ms));
            out.push_str("ms");
            return;
        }
        let s = (ms + 999) / 1000;
        let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
        if h > 0 {
            out.push_str(n.format(h));
            out.push('h');
        }
        if h > 0 || m > 0 {
            out.push_str(n.format(m));
            out.push('m');
        }
        out.push_str(n.format(s));
        out.push('s');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: WindowLimits = WindowLimits { rpm: 3, tpm: 100 };

    /// The admission decision over a plain list of a window's (time,
    /// tokens) entries: the reference the running totals are checked
    /// against.
    fn decide(entries: &[(i64, u64)], tokens: u64, limits: WindowLimits, now: i64) -> WindowState {
        let live = entries
            .iter()
            .copied()
            .filter(|(ts, _)| *ts > now - WINDOW_MS);
        let count = live.clone().count() as u64;
        let used: u64 = live.clone().map(|(_, t)| t).sum();
        let oldest = live.clone().next().map(|(ts, _)| ts);
        let newest = live.clone().next_back().map(|(ts, _)| ts);
        decide_totals(count, used, oldest, newest, live, tokens, limits, now)
    }

    #[tokio::test]
    async fn local_window_counts_requests_and_tokens() {
        let l = Limiter::local();
        for i in 0..3 {
            let a = l
                .admit("k", &format!("r{i}"), 10, L, 1_000 + i)
                .await
                .unwrap();
            assert_eq!(a.state.exceeded, None);
            assert_eq!(
                a.recorded,
                Some(Recorded::Local {
                    window: 1,
                    seq: i as u64
                })
            );
            assert_eq!(a.state.requests_remaining, 2 - i as u64);
            // Until the window is empty again; once full, until one fits.
            let expected = if i < 2 { 60_000 } else { 59_998 };
            assert_eq!(a.state.requests_reset_ms, expected);
        }
        let a = l.admit("k", "r3", 10, L, 2_000).await.unwrap();
        assert_eq!(a.state.exceeded, Some(Exceeded::Requests));
        assert_eq!(a.state.requests_reset_ms, 59_000);
        assert_eq!(a.recorded, None);
        // The window slides.
        let a = l.admit("k", "r4", 10, L, 61_001).await.unwrap();
        assert_eq!(a.state.exceeded, None);
        // Tokens: estimates are replaced by actual counts.
        let l = Limiter::local();
        let first = l.admit("t", "a", 90, L, 0).await.unwrap();
        assert_eq!(first.state.exceeded, None);
        let a = first.recorded.unwrap();
        assert_eq!(
            l.admit("t", "b", 20, L, 1).await.unwrap().state.exceeded,
            Some(Exceeded::Tokens)
        );
        l.update("t", "a", a, Some(40)).await.unwrap();
        let second = l.admit("t", "b", 20, L, 2).await.unwrap();
        assert_eq!(second.state.exceeded, None);
        assert_eq!(second.state.tokens_remaining, 40);
        let b = second.recorded.unwrap();
        l.update("t", "b", b, None).await.unwrap();
        // Removing twice, or updating what was removed, changes nothing.
        l.update("t", "b", b, None).await.unwrap();
        l.update("t", "b", b, Some(50)).await.unwrap();
        assert_eq!(
            l.admit("t", "c", 60, L, 3)
                .await
                .unwrap()
                .state
                .tokens_remaining,
            0
        );
    }

    /// A removed entry taken off the back of the window leaves a gap in
    /// the sequence numbers: later entries are still found, and the
    /// removed one's number never comes back to reach a newer request.
    #[tokio::test]
    async fn sequence_numbers_survive_gaps_and_are_never_reused() {
        let limits = WindowLimits {
            rpm: 100,
            tpm: 10_000,
        };
        let l = Limiter::local();
        let admit = |id: &'static str, tokens, now| {
            let l = &l;
            async move { l.admit("k", id, tokens, limits, now).await.unwrap() }
        };
        let a = admit("a", 10, 0).await.recorded.unwrap();
        let b = admit("b", 20, 1).await.recorded.unwrap();
        l.update("k", "b", b, None).await.unwrap();
        // The next admission prunes the dead `b` off the back.
        let c = admit("c", 30, 2).await;
        assert_eq!(c.state.tokens_remaining, 10_000 - 10 - 30);
        let c = c.recorded.unwrap();
        assert_ne!(c, b);
        // `b`'s number reaches nothing, not `c`.
        l.update("k", "b", b, Some(1_000)).await.unwrap();
        l.update("k", "c", c, Some(5)).await.unwrap();
        l.update("k", "a", a, Some(1)).await.unwrap();
        assert_eq!(
            admit("d", 0, 3).await.state.tokens_remaining,
            10_000 - 1 - 5
        );
    }

    /// A key's window dropped while idle (past 100,000 keys) and made
    /// again numbers its entries afresh: a request admitted into the old
    /// one cannot move the new one's entries when it settles.
    #[tokio::test]
    async fn a_window_made_again_ignores_the_old_ones_records() {
        let limits = WindowLimits {
            rpm: 100,
            tpm: 10_000,
        };
        let l = Limiter::local();
        let old = l
            .admit("k", "a", 10, limits, 0)
            .await
            .unwrap()
            .recorded
            .unwrap();
        for i in 0..100_001 {
            l.admit(&format!("other-{i}"), "x", 1, limits, 1)
                .await
                .unwrap();
        }
        // A minute later `k` is idle: the next admission drops its window.
        let now = WINDOW_MS + 5;
        l.admit("other", "y", 1, limits, now).await.unwrap();
        let new = l.admit("k", "b", 10, limits, now).await.unwrap();
        assert_eq!(new.state.tokens_remaining, 10_000 - 10);
        assert_ne!(new.recorded.unwrap(), old);
        // The long request that was admitted first settles now.
        l.update("k", "a", old, None).await.unwrap();
        l.update("k", "a", old, Some(5_000)).await.unwrap();
        let after = l.admit("k", "c", 10, limits, now + 1).await.unwrap();
        assert_eq!(after.state.tokens_remaining, 10_000 - 20);
        assert_eq!(after.state.requests_remaining, 100 - 2);
    }

    /// Drives `l` through random admissions, updates and removals of
    /// `key` and checks every decision against `decide` over a plain list
    /// of entries.
    async fn matches_the_plain_window(l: &Limiter, key: &str, steps: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let limits = WindowLimits {
            rpm: 40,
            tpm: 2_000,
        };
        // (time, id, tokens) of recorded requests.
        let mut plain: Vec<(i64, String, u64)> = Vec::new();
        // Every admitted request's record, removed ones included: updates
        // may name any of them.
        let mut admitted: Vec<(String, Recorded)> = Vec::new();
        let mut now = 1_000_000;
        for i in 0..steps {
            now += rng.gen_range(0..3_000);
            match rng.gen_range(0..4) {
                0 | 1 => {
                    let id = format!("r{i}");
                    let tokens = rng.gen_range(1..200);
                    let got = l.admit(key, &id, tokens, limits, now).await.unwrap();
                    plain.retain(|(ts, _, _)| *ts > now - WINDOW_MS);
                    let entries: Vec<(i64, u64)> = plain.iter().map(|e| (e.0, e.2)).collect();
                    assert_eq!(got.state, decide(&entries, tokens, limits, now), "step {i}");
                    assert_eq!(got.recorded.is_some(), got.state.exceeded.is_none());
                    if let Some(r) = got.recorded {
                        plain.push((now, id.clone(), tokens));
                        admitted.push((id, r));
                    }
                }
                2 if !admitted.is_empty() => {
                    let (id, r) = admitted[rng.gen_range(0..admitted.len())].clone();
                    let t = rng.gen_range(0..300);
                    l.update(key, &id, r, Some(t)).await.unwrap();
                    if let Some(e) = plain.iter_mut().find(|e| e.1 == id) {
                        e.2 = t;
                    }
                }
                _ if !admitted.is_empty() => {
                    let (id, r) = admitted[rng.gen_range(0..admitted.len())].clone();
                    l.update(key, &id, r, None).await.unwrap();
                    if let Some(pos) = plain.iter().position(|e| e.1 == id) {
                        plain.remove(pos);
                    }
                }
                _ => {}
            }
        }
    }

    /// The O(1) window agrees with `decide` over a plain list of entries.
    #[tokio::test]
    async fn running_totals_match_the_plain_window() {
        matches_the_plain_window(&Limiter::local(), "k", 5_000, 7).await;
    }

    #[test]
    fn token_reset_is_when_enough_leaves() {
        let s = decide(&[(0, 50), (10_000, 40)], 30, L, 20_000);
        assert_eq!(s.exceeded, Some(Exceeded::Tokens));
        assert_eq!(s.tokens_reset_ms, 40_000);
    }

    #[test]
    fn reset_strings() {
        assert_eq!(reset_string(250), "250ms");
        assert_eq!(reset_string(1_000), "1s");
        assert_eq!(reset_string(360_000), "6m0s");
        assert_eq!(reset_string(3_723_000), "1h2m3s");
        assert_eq!(reset_string(3_600_000), "1h0m0s");
        assert_eq!(reset_string(-5), "0ms");
    }

    /// The Redis window's running totals agree with `decide` over a plain
    /// list of entries, through admissions, updates, removals and pruning.
    #[tokio::test]
    async fn redis_running_totals_match_the_plain_window() {
        let Ok(url) = std::env::var("SLUICE_TEST_REDIS_URL") else {
            eprintln!("skipped: SLUICE_TEST_REDIS_URL is not set");
            return;
        };
        let l = Limiter::redis(&url).await.unwrap();
        let key = format!("props-{}-{}", sluice_store::now_ms(), std::process::id());
        matches_the_plain_window(&l, &key, 2_000, 11).await;
    }

    #[tokio::test]
    async fn redis_window_is_shared_and_exact() {
        let Ok(url) = std::env::var("SLUICE_TEST_REDIS_URL") else {
            eprintln!("skipped: SLUICE_TEST_REDIS_URL is not set");
            return;
        };
        let a = Limiter::redis(&url).await.unwrap();
        let b = Limiter::redis(&url).await.unwrap();
        let key = format!("test-{}", sluice_store::now_ms());
        let now = sluice_store::now_ms();
        let mut admitted = 0;
        for i in 0..6 {
            let l = if i % 2 == 0 { &a } else { &b };
            if l.admit(&key, &format!("r{i}"), 10, L, now + i)
                .await
                .unwrap()
                .state
                .exceeded
                .is_none()
            {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 3);
        a.update(&key, "r0", Recorded::Shared, None).await.unwrap();
        assert!(b
            .admit(&key, "r9", 10, L, now + 10)
            .await
            .unwrap()
            .state
            .exceeded
            .is_none());
    }
}
