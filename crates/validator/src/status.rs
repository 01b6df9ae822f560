//! `GET /status`: a small HTML page per chute — routable instances, queue,
//! availability, latency and tokens over the current UTC day (from the
//! request records, newest 10,000).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sluice_store::ledger::utc_day;
use sluice_store::now_ms;

use crate::AppState;

#[derive(Default)]
struct Day {
    ok: u64,
    failed: u64,
    latency: Vec<i64>,
    ttft: Vec<i64>,
    tokens: i64,
}

fn pct(v: &mut [i64], p: f64) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    format!("{} ms", v[i.min(v.len() - 1)])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub async fn page(State(state): State<AppState>) -> Response {
    let now = now_ms();
    let midnight = now - now.rem_euclid(86_400_000);
    let outcomes = state
        .store
        .recent_outcomes(midnight, 10_000)
        .await
        .unwrap_or_default();
    let mut days: BTreeMap<String, Day> = BTreeMap::new();
    for (model, status, latency, ttft, tokens) in outcomes {
        let d = days.entry(model).or_default();
        match status.as_str() {
            "ok" | "cancelled" => d.ok += 1,
            // Refusals of bad input are the client's, not the chute's.
            "invalid_request" => {}
            _ => d.failed += 1,
        }
        d.latency.push(latency);
        if let Some(t) = ttft {
            d.ttft.push(t);
        }
        d.tokens += tokens;
    }
    let routable: BTreeMap<String, usize> = state.registry.routable_counts().into_iter().collect();
    let mut rows = String::new();
    for chute in state.chutes().iter() {
        let model = &chute.model_id;
        let total = state.registry.instances_of(model).len();
        let d = days.entry(model.clone()).or_default();
        let served = d.ok + d.failed;
        let availability = if served == 0 {
            "–".to_string()
        } else {
            format!("{:.2}%", d.ok as f64 * 100.0 / served as f64)
        };
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(model),
            routable.get(model).copied().unwrap_or(0),
            total,
            state.registry.gate(model).waiting(),
            served,
            availability,
            pct(&mut d.ttft, 0.5),
            pct(&mut d.latency, 0.5),
            pct(&mut d.latency, 0.95),
            d.tokens,
        );
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Sluice status</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}</style></head>\
         <body><h1>Sluice status</h1><p>UTC day {}</p><table><tr><th>chute</th><th>routable instances</th>\
         <th>queued</th><th>requests today</th><th>availability</th><th>TTFT p50</th><th>latency p50</th>\
         <th>latency p95</th><th>tokens generated today</th></tr>{rows}</table></body></html>",
        utc_day(now)
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}
