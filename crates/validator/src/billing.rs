//! Admission by tier and settlement of each request.
//!
//! - Free tier: a durable per-key daily request quota (database counter,
//!   exact across replicas) plus per-minute windows.
//! - Paid tier: per-minute request and token windows plus a balance
//!   reservation sized to the request's worst case; settlement charges
//!   the exact cost from the engine's token counts (same rule streamed or
//!   not) and credits each miner for what it produced.
//!
//! Requests the service fails to serve give back their quota, their
//! window entry and their reservation.

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use sluice_store::ledger::{format_usd, ms_until_utc_midnight, utc_day, Settlement};
use sluice_store::{now_ms, Chute};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::forward::Trace;
use crate::limits::{Exceeded, Recorded, Reset, WindowLimits};
use crate::AppState;

/// What the `x-ratelimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    pub limit_requests: u64,
    pub remaining_requests: u64,
    pub reset_requests_ms: i64,
    pub limit_tokens: u64,
    pub remaining_tokens: u64,
    pub reset_tokens_ms: i64,
}

impl RateHeaders {
    pub fn apply(&self, headers: &mut HeaderMap) {
        const NAMES: [HeaderName; 6] = [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ];
        // The six values are slices of one buffer: one allocation, not six.
        let mut buf = String::with_capacity(96);
        let mut ends = [0usize; 6];
        let mut n = itoa::Buffer::new();
        for (i, end) in ends.iter_mut().enumerate() {
            match i {
                0 => buf.push_str(n.format(self.limit_requests)),
                1 => buf.push_str(n.format(self.remaining_requests)),
                2 => Reset(self.reset_requests_ms).push_to(&mut buf),
                3 => buf.push_str(n.format(self.limit_tokens)),
                4 => buf.push_str(n.format(self.remaining_tokens)),
                _ => Reset(self.reset_tokens_ms).push_to(&mut buf),
            }
            *end = buf.len();
        }
        let bytes = Bytes::from(buf);
        let mut start = 0;
        for (name, end) in NAMES.into_iter().zip(ends) {
            if let Ok(v) = HeaderValue::from_maybe_shared(bytes.slice(start..end)) {
                headers.insert(name, v);
            }
            start = end;
        }
    }
}

/// What admission took, to be settled or given back.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub paid: bool,
    /// The UTC day whose free quota this request used.
    pub day: Option<String>,
    /// Where the rate limiter recorded the request, if it did.
    pub window: Option<Recorded>,
    pub reserved: bool,
    pub price_in: i64,
    pub price_out: i64,
}

fn secs_ceil(ms: i64) -> u64 {
    ((ms.max(0) + 999) / 1000).max(1) as u64
}

/// Admits a request or refuses it with 429 / 402. `headers` receives the
/// rate-limit figures whatever the outcome.
pub async fn admit(
    state: &AppState,
    caller: &Caller,
    request_id: &str,
    chute: &Chute,
    prompt_bytes: usize,
    max_tokens: Option<u32>,
    headers: &mut Option<RateHeaders>,
) -> Result<Admitted, ApiError> {
    // Before anything is taken: a ledger writer that is behind would make
    // this request's settlement wait in memory after its answer.
    if state.store.ledger_backlogged() {
        state.metrics.inc("sluice_ledger_refusals_total", &[], 1);
        return Err(ApiError::Overloaded {
            message:
                "This validator is behind on recording finished requests; please retry shortly."
                    .into(),
            retry_after_s: 1,
        });
    }
    let cfg = &state.config;
    let now = now_ms();
    let paid = caller.tier == "paid";
    let mut day = None;
    let mut daily: Option<(u64, u64)> = None;
    if !paid {
        let today = utc_day(now);
        let limit = cfg.free_daily_requests;
        match state
            .store
            .take_daily(&caller.key_id, &today, limit)
            .await
            .map_err(ApiError::internal)?
        {
            Some(used) => {
                daily = Some((limit as u64, (limit - used).max(0) as u64));
                day = Some(today);
            }
            None => {
                let reset = ms_until_utc_midnight(now);
                *headers = Some(RateHeaders {
                    limit_requests: limit as u64,
                    remaining_requests: 0,
                    reset_requests_ms: reset,
                    limit_tokens: cfg.free_tpm,
                    remaining_tokens: cfg.free_tpm,
                    reset_tokens_ms: 0,
                });
                return Err(ApiError::QuotaExceeded {
                    message: format!(
                        "You have used the free tier's {limit} requests for today (UTC). The quota resets at midnight UTC; a paid key has no daily quota."
                    ),
                    retry_after_s: secs_ceil(reset),
                });
            }
        }
    }
    let limits = if paid {
        WindowLimits {
            rpm: cfg.paid_rpm,
            tpm: cfg.paid_tpm,
        }
    } else {
        WindowLimits {
            rpm: cfg.free_rpm,
            tpm: cfg.free_tpm,
        }
    };
    let estimate = prompt_bytes as u64 / 3 + max_tokens.unwrap_or(256) as u64;
    let (window, recorded) = match state
        .limiter
        .admit(&caller.key_id, request_id, estimate, limits, now)
        .await
    {
        Ok(a) => (Some(a.state), a.recorded),
        Err(e) => {
            tracing::warn!(error = %e, "rate limiter unavailable; admitting without it");
            (None, None)
        }
    };
    let h = RateHeaders {
        limit_requests: daily.map_or(limits.rpm, |d| d.0),
        remaining_requests: match (daily, window) {
            (Some(d), _) => d.1,
            (None, Some(w)) => w.requests_remaining,
            (None, None) => limits.rpm,
        },
        reset_requests_ms: match (daily, window) {
            (Some(_), _) => ms_until_utc_midnight(now),
            (None, Some(w)) => w.requests_reset_ms,
            (None, None) => 0,
        },
        limit_tokens: limits.tpm,
        remaining_tokens: window.map_or(limits.tpm, |w| w.tokens_remaining),
        reset_tokens_ms: window.map_or(0, |w| w.tokens_reset_ms),
    };
    *headers = Some(h);
    if let Some(w) = window {
        if let Some(which) = w.exceeded {
            if let Some(d) = &day {
                if let Err(e) = state.store.refund_daily(&caller.key_id, d).await {
                    tracing::warn!(error = %e, "could not refund a daily quota unit");
                }
            }
            let (what, reset) = match which {
                Exceeded::Requests => (
                    format!("{} requests per minute", limits.rpm),
                    w.requests_reset_ms,
                ),
                Exceeded::Tokens => (
                    format!("{} tokens per minute", limits.tpm),
                    w.tokens_reset_ms,
                ),
            };
            return Err(ApiError::RateLimited {
                message: format!("Rate limit reached: this key may use {what}. Retry after the time in Retry-After."),
                retry_after_s: secs_ceil(reset),
            });
        }
    }
    let mut admitted = Admitted {
        paid,
        day,
        window: recorded,
        reserved: false,
        price_in: chute.price_in_micros,
        price_out: chute.price_out_micros,
    };
    if paid {
        // Worst case: one token per prompt byte (plus the template), and
        // the whole context for output when max_tokens is unset.
        let context = state.registry.max_context(&chute.model_id).unwrap_or(2048);
        let amount = (prompt_bytes as i64 + 64) * chute.price_in_micros
            + max_tokens.unwrap_or(context) as i64 * chute.price_out_micros;
        let ok = state
            .store
            .reserve(request_id, &caller.user_id, amount, &state.replica_id)
            .await
            .map_err(ApiError::internal)?;
        if !ok {
            give_back(state, caller, request_id, &admitted).await;
            let available = state
                .store
                .balance(&caller.user_id)
                .await
                .map(|b| b.available())
                .unwrap_or(0);
            return Err(ApiError::InsufficientBalance(format!(
                "Your available balance ({}) does not cover this request (up to {}). Add funds or lower max_tokens.",
                format_usd(available),
                format_usd(amount)
            )));
        }
        admitted.reserved = true;
    }
    Ok(admitted)
}

/// Gives back the quota unit and window entry admission took (the
/// request was not served).
async fn give_back(state: &AppState, caller: &Caller, request_id: &str, admitted: &Admitted) {
    if let Some(day) = &admitted.day {
        if let Err(e) = state.store.refund_daily(&caller.key_id, day).await {
            tracing::warn!(error = %e, "could not refund a daily quota unit");
        }
    }
    if let Some(recorded) = admitted.window {
        if let Err(e) = state
            .limiter
            .update(&caller.key_id, request_id, recorded, None)
            .await
        {
            tracing::warn!(error = %e, "could not remove a rate-limit window entry");
        }
    }
}

/// Closes a finished request's admission and works out what it owes:
/// its cost in pico-dollars and the settlement to write (with the request
/// row, in one transaction) when it was served.
pub async fn finish(
    state: &AppState,
    caller: &Caller,
    request_id: &str,
    admitted: &Admitted,
    trace: &Trace,
) -> (i64, Option<Settlement>) {
    let served = matches!(trace.status, "ok" | "cancelled")
        && (trace.prompt_tokens > 0 || trace.completion_tokens > 0);
    if !served {
        if admitted.reserved {
            if let Err(e) = state.store.release(request_id).await {
                tracing::error!(error = %e, "could not release a reservation (recovered on restart)");
            }
        }
        give_back(state, caller, request_id, admitted).await;
        return (0, None);
    }
    let cost = trace.prompt_tokens as i64 * admitted.price_in
        + trace.completion_tokens as i64 * admitted.price_out;
    let keep = 100 - state.config.fee_percent.min(100) as i64;
    let mut credits: Vec<(String, i64)> = trace
        .contributions
        .iter()
        .map(|c| {
            (
                c.miner_key.clone(),
                c.completion_tokens as i64 * admitted.price_out,
            )
        })
        .collect();
    // The prompt was processed by the instance that finished the answer.
    let input = trace.prompt_tokens as i64 * admitted.price_in;
    match (credits.last_mut(), &trace.miner_key) {
        (Some(last), _) => last.1 += input,
        (None, Some(key)) => credits.push((key.clone(), input)),
        (None, None) => {}
    }
    for c in credits.iter_mut() {
        c.1 = c.1 * keep / 100;
    }
    let credited: i64 = credits.iter().map(|c| c.1).sum();
    let settlement = Settlement {
        request_id: request_id.to_string(),
        user_id: caller.user_id.clone(),
        user_pays: admitted.paid,
        cost,
        credits,
        fee: cost - credited,
    };
    if let Some(recorded) = admitted.window {
        let actual = (trace.prompt_tokens + trace.completion_tokens) as u64;
        if let Err(e) = state
            .limiter
            .update(&caller.key_id, request_id, recorded, Some(actual))
            .await
        {
            tracing::warn!(error = %e, "could not update the token window");
        }
    }
    (cost, Some(settlement))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_headers_carry_each_value() {
        let mut headers = HeaderMap::new();
        RateHeaders {
            limit_requests: 200,
            remaining_requests: 7,
            reset_requests_ms: 250,
            limit_tokens: 40_000,
            remaining_tokens: 0,
            reset_tokens_ms: 3_723_000,
        }
        .apply(&mut headers);
        let got: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("x-ratelimit-limit-requests", "200"),
                ("x-ratelimit-remaining-requests", "7"),
                ("x-ratelimit-reset-requests", "250ms"),
                ("x-ratelimit-limit-tokens", "40000"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1h2m3s"),
            ]
        );
    }
}
