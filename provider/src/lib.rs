//! `terraform-provider-warmpool`: Warmpool templates, warm pools and OIDC trust policies as Terraform resources
//! (protocol 6, crate `tf-provider`). All HTTP goes through `warmpool-client`, configured once in `configure` and
//! shared with every resource and data source. Nothing but the plugin handshake is printed on stdout.

pub mod data;
pub mod model;
pub mod pool;
pub mod schema;
pub mod template;
pub mod trust;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint::*, Schema};
use tf_provider::value::ValueEmpty;
use tf_provider::{map, Diagnostics, DynamicDataSource, DynamicResource, Provider};

use model::{known, Str};

/// The API client, set by `configure` (resources are built before it runs).
#[derive(Clone, Default)]
pub struct Shared(Arc<RwLock<Option<warmpool_client::Client>>>);

impl Shared {
    pub fn client(&self, diags: &mut Diagnostics) -> Option<warmpool_client::Client> {
        let client = self.0.read().expect("client lock").clone();
        if client.is_none() {
            diags.root_error_short("the warmpool provider is not configured");
        }
        client
    }
}

/// Turns a client error into a diagnostic (the server's code and message) and the value into an `Option`, the
/// currency of tf-provider's methods.
pub trait OrDiag<T> {
    fn or_diag(self, diags: &mut Diagnostics, summary: impl Into<String>) -> Option<T>;
}

impl<T> OrDiag<T> for Result<T, warmpool_client::Error> {
    fn or_diag(self, diags: &mut Diagnostics, summary: impl Into<String>) -> Option<T> {
        match self {
            Ok(v) => Some(v),
            Err(e) => {
                diags.root_error(summary.into(), e.to_string());
                None
            }
        }
    }
}

/// Deleting something that is already gone is a success.
pub fn gone_is_ok(result: Result<(), warmpool_client::Error>) -> Result<(), warmpool_client::Error> {
    match result {
        Err(e) if e.code() == Some("not_found") => Ok(()),
        other => other,
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProviderConfig {
    pub endpoint: Str,
    pub token: Str,
}

#[derive(Clone, Default)]
pub struct WarmpoolProvider {
    shared: Shared,
}

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7070";

pub fn provider_schema() -> Schema {
    let mut token = schema::string(Optional, "API token (default WARMPOOL_TOKEN).");
    token.sensitive = true;
    Schema {
        version: 1,
        block: schema::block(
            "Warmpool: templates and warm pools of ready sandboxes.",
            vec![
                (
                    "endpoint",
                    schema::string(
                        Optional,
                        "Control plane URL (default WARMPOOL_ENDPOINT, then http://127.0.0.1:7070).",
                    ),
                ),
                ("token", token),
            ],
            vec![],
        ),
    }
}

#[async_trait::async_trait]
impl Provider for WarmpoolProvider {
    type Config<'a> = ProviderConfig;
    type MetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(provider_schema())
    }

    async fn validate<'a>(&self, _diags: &mut Diagnostics, _config: Self::Config<'a>) -> Option<()> {
        Some(())
    }

    async fn configure<'a>(
        &self,
        diags: &mut Diagnostics,
        _version: String,
        config: Self::Config<'a>,
    ) -> Option<()> {
        let endpoint = known(&config.endpoint)
            .or_else(|| std::env::var("WARMPOOL_ENDPOINT").ok().filter(|e| !e.is_empty()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let token =
            known(&config.token).or_else(|| std::env::var("WARMPOOL_TOKEN").ok().filter(|t| !t.is_empty()));
        let c = match warmpool_client::Client::new(&endpoint, token) {
            Ok(c) => c,
            Err(e) => {
                diags.error("Invalid endpoint", e.to_string(), tf_provider::AttributePath::new("endpoint"));
                return None;
            }
        };
        // Plan reads the server too: a wrong token or an unreachable server fails here, at plan, not at apply.
        match c.list_templates().await {
            Ok(_) => {}
            Err(warmpool_client::Error::Api { status: 401, message, .. }) => {
                diags.error(
                    "The Warmpool server refused the token",
                    format!("{endpoint} answered: {message}. Set the provider's token (or WARMPOOL_TOKEN)."),
                    tf_provider::AttributePath::new("token"),
                );
                return None;
            }
            Err(e) => {
                diags.error(
                    "Cannot reach the Warmpool server",
                    format!("{endpoint}: {e}. Set the provider's endpoint (or WARMPOOL_ENDPOINT)."),
                    tf_provider::AttributePath::new("endpoint"),
                );
                return None;
            }
        }
        *self.shared.0.write().expect("client lock") = Some(c);
        Some(())
    }

    fn get_resources(&self, _diags: &mut Diagnostics) -> Option<HashMap<String, Box<dyn DynamicResource>>> {
        Some(map! {
            "template" => template::TemplateResource { shared: self.shared.clone() },
            "warm_pool" => pool::PoolResource { shared: self.shared.clone() },
            "oidc_trust_policy" => trust::TrustPolicyResource { shared: self.shared.clone() },
        })
    }

    fn get_data_sources(
        &self,
        _diags: &mut Diagnostics,
    ) -> Option<HashMap<String, Box<dyn DynamicDataSource>>> {
        Some(map! {
            "template" => data::TemplateDataSource { shared: self.shared.clone() },
            "warm_pool" => data::PoolDataSource { shared: self.shared.clone() },
        })
    }
}
