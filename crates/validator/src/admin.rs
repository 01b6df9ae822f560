//! The admin API (`/admin/v1/*`, guarded by the configured admin key) and
//! the user-facing usage report (`/v1/usage`).

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use sluice_store::ledger::{format_usd, parse_usd};
use sluice_store::{now_ms, StoreError};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.admin_key else {
        return Err(ApiError::Forbidden(
            "the admin API is disabled (no admin_key configured)".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::InvalidApiKey("Incorrect admin key.".into()))
    }
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(what) => ApiError::invalid(format!("not found: {what}"), None),
        StoreError::Invalid(msg) => ApiError::invalid(msg, None),
        other => ApiError::internal(other),
    }
}

fn respond(r: Result<serde_json::Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tier: Option<String>,
    /// Add the key to an existing user instead of creating one.
    #[serde(default)]
    user_id: Option<String>,
}

pub async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    respond(
        async {
            check_admin(&state, &headers)?;
            let req: CreateKey = crate::api::parse_json(&body)?;
            let name = req.name.unwrap_or_else(|| "default".into());
            let tier = req.tier.unwrap_or_else(|| "free".into());
            let user = match req.user_id {
                Some(u) => u,
                None => state
                    .store
                    .create_user(&name, &tier)
                    .await
                    .map_err(store_err)?,
            };
            let (key_id, key) = state
                .store
                .create_key(&user, &name)
                .await
                .map_err(store_err)?;
            Ok(serde_json::json!({"key": key, "key_id": key_id, "user_id": user, "tier": tier}))
        }
        .await,
    )
}

pub async fn list_keys(State(state): State<AppState>, headers: HeaderMap) -> Response {
    respond(
        async {
            check_admin(&state, &headers)?;
            let keys = state.store.list_keys().await.map_err(store_err)?;
            let data: Vec<_> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({"key_id": k.key_id, "user_id": k.user_id, "name": k.name,
                                       "tier": k.tier, "revoked": k.revoked})
                })
                .collect();
            Ok(serde_json::json!({"object": "list", "data": data}))
        }
        .await,
    )
}

pub async fn revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Response {
    respond(
        async {
            check_admin(&state, &headers)?;
            state.store.revoke_key(&key_id).await.map_err(store_err)?;
            Ok(serde_json::json!({"key_id": key_id, "revoked": true}))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBalance {
    user_id: String,
    /// Dollars, as a string for exactness: "10" or "2.50".
    usd: String,
}

pub async fn add_balance(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    respond(
        async {
            check_admin(&state, &headers)?;
            let req: AddBalance = crate::api::parse_json(&body)?;
            let amount =
                parse_usd(&req.usd).map_err(|m| ApiError::invalid(m, Some("usd".to_string())))?;
            state
                .store
                .add_funds(&req.user_id, amount)
                .await
                .map_err(store_err)?;
            let b = state.store.balance(&req.user_id).await.map_err(store_err)?;
            Ok(
                serde_json::json!({"user_id": req.user_id, "balance_usd": format_usd(b.ledger),
                                  "available_usd": format_usd(b.available())}),
            )
        }
        .await,
    )
}

pub async fn ledger_check(State(state): State<AppState>, headers: HeaderMap) -> Response {
    respond(
        async {
            check_admin(&state, &headers)?;
            let c = state.store.ledger_check().await.map_err(store_err)?;
            Ok(serde_json::json!({
                "entries": c.entries, "total": c.total, "unbalanced_txns": c.unbalanced_txns,
                "user_debits": c.user_debits, "miner_credits": c.miner_credits, "fees": c.fees,
                "settlements": c.settlements, "open_reservations": c.open_reservations,
                "mismatched_balances": c.mismatched_balances,
                "balanced": c.is_balanced(),
            }))
        }
        .await,
    )
}

#[derive(Deserialize)]
pub struct UsageQuery {
    days: Option<u32>,
}

/// `GET /v1/usage?days=N`: the caller's own usage per UTC day and model.
pub async fn usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Response {
    respond(
        async {
            let caller = state.auth.authenticate(&headers).await?;
            let days = q.days.unwrap_or(30).clamp(1, 366) as i64;
            let since = now_ms() - days * 86_400_000;
            let rows = state.store.usage(&caller.user_id, since).await.map_err(store_err)?;
            let balance = state.store.balance(&caller.user_id).await.map_err(store_err)?;
            let data: Vec<_> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({"day": r.day, "model": r.model, "requests": r.requests,
                        "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                        "cost_usd": format_usd(r.cost), "cost_pico_usd": r.cost})
                })
                .collect();
            Ok(serde_json::json!({"object": "list", "user_id": caller.user_id, "tier": caller.tier,
                "balance_usd": format_usd(balance.ledger), "available_usd": format_usd(balance.available()),
                "data": data}))
        }
        .await,
    )
}
