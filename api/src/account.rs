//! Accounts (tenants), their quotas, and API tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Sandboxes the account may own at once (checked-out and cold; not warm inventory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1000000)]
    pub max_sandboxes: Option<u64>,
    /// Warm (unclaimed) sandboxes across the account's pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 1000000)]
    pub max_warm_sandboxes: Option<u64>,
}

impl Quotas {
    /// The largest quota; more than one control plane runs anyway.
    pub const MAX: u64 = 1_000_000;

    pub fn validate(&self) -> Result<(), crate::FieldError> {
        for (field, value) in [
            ("quotas.max_sandboxes", self.max_sandboxes),
            ("quotas.max_warm_sandboxes", self.max_warm_sandboxes),
        ] {
            if value.is_some_and(|v| v > Self::MAX) {
                return Err(crate::FieldError::new(field, format!("must be at most {}", Self::MAX)));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountCreate {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    #[serde(default)]
    pub quotas: Quotas,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub quotas: Quotas,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub account_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The secret is shown once, here; the server keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenCreated {
    pub id: String,
    pub token: String,
    pub account_id: String,
    pub name: Option<String>,
}
