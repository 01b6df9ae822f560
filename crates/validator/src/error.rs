//! The one place API errors become HTTP: status, OpenAI-shaped JSON body,
//! `Retry-After`, and a low-cardinality label for metrics. Internal detail
//! is logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_proto::openai::{ErrorBody, ErrorDetail};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    InvalidApiKey(String),
    #[error("{message}")]
    ModelNotFound { message: String },
    #[error("{message}")]
    ContextLengthExceeded { message: String },
    #[error("no capacity for {model} before the request's deadline")]
    NoCapacity { model: String, retry_after_s: u64 },
    /// The validator itself cannot take more work for now (its ledger
    /// writer is behind).
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    #[error("every eligible instance failed")]
    AllTargetsFailed { attempts: u32 },
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{message}")]
    QuotaExceeded { message: String, retry_after_s: u64 },
    #[error("{0}")]
    InsufficientBalance(String),
    #[error("not found")]
    RouteNotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound { .. } | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::NoCapacity { .. } | ApiError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::InsufficientBalance(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::AllTargetsFailed { .. } | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The `error.code` clients see (and the metrics label).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::InvalidApiKey(_) => "invalid_api_key",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::ContextLengthExceeded { .. } => "context_length_exceeded",
            ApiError::NoCapacity { .. } => "no_capacity",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QuotaExceeded { .. } => "quota_exceeded",
            ApiError::InsufficientBalance(_) => "insufficient_balance",
            ApiError::AllTargetsFailed { .. } => "all_targets_failed",
            ApiError::RouteNotFound => "not_found",
            ApiError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::BodyTooLarge { .. }
            | ApiError::ModelNotFound { .. }
            | ApiError::ContextLengthExceeded { .. }
            | ApiError::RouteNotFound => "invalid_request_error",
            ApiError::InvalidApiKey(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NoCapacity { .. } | ApiError::Overloaded { .. } => "service_unavailable",
            ApiError::RateLimited { .. } | ApiError::QuotaExceeded { .. } => "rate_limit_error",
            ApiError::InsufficientBalance(_) => "insufficient_quota",
            ApiError::AllTargetsFailed { .. } | ApiError::Internal(_) => "server_error",
        }
    }

    /// True when the same request may succeed if sent again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NoCapacity { .. }
                | ApiError::Overloaded { .. }
                | ApiError::AllTargetsFailed { .. }
                | ApiError::RateLimited { .. }
                | ApiError::QuotaExceeded { .. }
        )
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::NoCapacity { retry_after_s, .. }
            | ApiError::Overloaded { retry_after_s, .. }
            | ApiError::RateLimited { retry_after_s, .. }
            | ApiError::QuotaExceeded { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::AllTargetsFailed { .. } => Some(1),
            _ => None,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound { .. } => Some("model".into()),
            ApiError::ContextLengthExceeded { .. } => Some("messages".into()),
            _ => None,
        }
    }

    /// The client-facing body; internal errors say nothing specific.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "The server had an error while processing your request.".to_string()
            }
            ApiError::AllTargetsFailed { attempts } => {
                format!("Every eligible instance failed ({attempts} attempts). Please retry.")
            }
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: self.kind().to_string(),
                param: self.param(),
                code: Some(self.code().to_string()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_status_code_and_type() {
        let cases = [
            (
                ApiError::InvalidApiKey("bad".into()),
                401,
                "invalid_api_key",
                "authentication_error",
            ),
            (
                ApiError::ModelNotFound {
                    message: "x".into(),
                },
                404,
                "model_not_found",
                "invalid_request_error",
            ),
            (
                ApiError::invalid("bad", Some("temperature".into())),
                400,
                "invalid_request",
                "invalid_request_error",
            ),
            (
                ApiError::NoCapacity {
                    model: "m".into(),
                    retry_after_s: 3,
                },
                503,
                "no_capacity",
                "service_unavailable",
            ),
            (
                ApiError::Overloaded {
                    message: "behind".into(),
                    retry_after_s: 1,
                },
                503,
                "overloaded",
                "service_unavailable",
            ),
            (
                ApiError::AllTargetsFailed { attempts: 3 },
                500,
                "all_targets_failed",
                "server_error",
            ),
        ];
        for (err, status, code, kind) in cases {
            assert_eq!(err.status().as_u16(), status);
            let body = err.body();
            assert_eq!(body.error.code.as_deref(), Some(code));
            assert_eq!(body.error.kind, kind);
        }
    }

    #[test]
    fn retry_after_header_and_param() {
        let resp = ApiError::NoCapacity {
            model: "m".into(),
            retry_after_s: 7,
        }
        .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let overloaded = ApiError::Overloaded {
            message: "behind".into(),
            retry_after_s: 1,
        };
        assert!(overloaded.is_retryable());
        assert_eq!(
            overloaded.into_response().headers()[header::RETRY_AFTER],
            "1"
        );
        let body = ApiError::invalid("x", Some("top_p".into())).body();
        assert_eq!(body.error.param.as_deref(), Some("top_p"));
    }

    #[test]
    fn internal_detail_never_leaks() {
        let body = ApiError::internal("db password wrong at 10.0.0.1").body();
        assert!(!body.error.message.contains("10.0.0.1"));
    }
}
