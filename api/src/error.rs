//! The error body every endpoint returns, its codes, and the field-level validation error that feeds it.

use serde::{Deserialize, Serialize};

/// `{"error": {"code", "message", "details"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// One of [`ErrorCode`]'s wire names.
    pub code: String,
    pub message: String,
    /// For `invalid_request`: `{"field": "<path>"}`; for `warm_pool_unavailable`: `{"reason": …}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// The API's error codes, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    /// The caller may not do this, whatever the input (an admin-only route, host networking without the
    /// account's `allow_host_network`).
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    QuotaExceeded,
    WarmPoolUnavailable,
    /// The store or the runtime cannot take writes now (disk full, read-only database, cluster unreachable).
    ServiceUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::WarmPoolUnavailable | ErrorCode::ServiceUnavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::WarmPoolUnavailable => "warm_pool_unavailable",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A value that fails validation, named by its JSON path (`warm_processes[1].cwd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Joins a parent path and a child (`join("readiness", "exec.command")`); an empty parent gives the child.
pub fn join_path(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}.{child}")
    }
}

/// The longest timeout in seconds a sandbox or a pool takes (`timeout_seconds`, `idle_timeout_seconds`): one year.
pub const DURATION_SECONDS_MAX: u64 = 31_536_000;

/// The longest probe delay, period or timeout in milliseconds: one day.
pub const PROBE_MS_MAX: u64 = 86_400_000;

/// A timeout in seconds: 1 to [`DURATION_SECONDS_MAX`].
pub fn validate_seconds(field: &str, value: u64) -> Result<(), FieldError> {
    if (1..=DURATION_SECONDS_MAX).contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(field, format!("must be between 1 and {DURATION_SECONDS_MAX} (got {value})")))
    }
}

/// Names of templates, pools, accounts, processes, tags and volumes: 1–63 characters of `[a-z0-9._-]`,
/// starting with a letter or digit.
pub fn validate_name(field: &str, value: &str) -> Result<(), FieldError> {
    let ok_len = (1..=63).contains(&value.len());
    let first_ok = value.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let chars_ok =
        value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok_len && first_ok && chars_ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit (got {value:?})"
            ),
        ))
    }
}
