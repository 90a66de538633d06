//! Accounts (tenants), their quotas, and API tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, TokenId};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountCreate {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// Quotas left out take the server's `--default-quotas`.
    #[serde(default)]
    pub quotas: Quotas,
    /// Whether the account's sandboxes may use `network: {"mode": "host"}` (the host's network namespace,
    /// loopback services included). Default false.
    #[serde(default)]
    pub allow_host_network: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_host_network: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub quotas: Quotas,
    /// Sandboxes of this account may use the host's network (`network.mode: host`); set by an admin.
    #[serde(default)]
    pub allow_host_network: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub account_id: AccountId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The secret is shown once, here; the server keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TokenCreated {
    pub id: TokenId,
    pub token: String,
    pub account_id: AccountId,
    pub name: Option<String>,
}
