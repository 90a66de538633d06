//! `warmpool_oidc_trust_policy`: who may act as an account from CI (an issuer, an audience and claim globs),
//! reviewed in a plan like everything else. The server has no update route for policies, so every change to a
//! setting replaces the policy; only a trailing-slash respelling of `issuer` (the server stores issuers without
//! one) is an in-place, state-only update. Imports by `acc_…/trp_…`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint::*, Schema};
use tf_provider::value::{Value, ValueEmpty};
use tf_provider::{AttributePath, Diagnostics, Resource};
use warmpool_api as api;

use crate::model::*;
use crate::schema::*;
use crate::{OrDiag, Shared};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrustPolicyState {
    pub id: Str,
    pub account_id: Str,
    pub name: Str,
    pub issuer: Str,
    pub audience: Str,
    pub claims: StrMap,
    pub token_ttl_seconds: Num,
}

/// The form the server compares and stores issuers in.
fn normalize_issuer(issuer: &str) -> &str {
    issuer.trim_end_matches('/')
}

/// An API field path (`claims.ref`) as an attribute path (`claims["ref"]`), so Terraform shows the line.
pub fn trust_attribute_path(field: &str) -> AttributePath {
    match field.split_once('.') {
        Some((map, key)) => AttributePath::new(map.to_string()).key(key.to_string()),
        None => AttributePath::new(field.to_string()),
    }
}

fn trust_field_error(diags: &mut Diagnostics, e: api::FieldError) {
    diags.error(format!("Invalid {}", e.field), e.message, trust_attribute_path(&e.field));
}

impl TrustPolicyState {
    /// The create request; unknown values (from other resources) become valid placeholders, so validation at
    /// plan time checks only what is known.
    pub fn request(&self) -> Result<api::TrustPolicyCreate, api::FieldError> {
        let or = |v: &Str, placeholder: &str| {
            if v.is_unknown() {
                placeholder.to_string()
            } else {
                known(v).unwrap_or_default()
            }
        };
        let claims: BTreeMap<String, String> = match &self.claims {
            Value::Unknown => [("unknown".to_string(), "*".to_string())].into(),
            Value::Null => BTreeMap::new(),
            Value::Value(m) => m.iter().map(|(k, v)| (k.clone(), or(v, "*"))).collect(),
        };
        let token_ttl_seconds = match self.token_ttl_seconds {
            Value::Value(n) => Some(u64::try_from(n).map_err(|_| {
                api::FieldError::new(
                    "token_ttl_seconds",
                    format!(
                        "must be from {} to {} seconds (got {n})",
                        api::TOKEN_TTL_MIN_SECONDS,
                        api::TOKEN_TTL_MAX_SECONDS
                    ),
                )
            })?),
            _ => None,
        };
        Ok(api::TrustPolicyCreate {
            name: or(&self.name, "unknown"),
            issuer: or(&self.issuer, "https://unknown.invalid"),
            audience: or(&self.audience, "unknown"),
            claims,
            token_ttl_seconds,
        })
    }

    /// Everything the server would refuse but an untrusted issuer, naming the field.
    pub fn validate(&self) -> Result<(), api::FieldError> {
        if let Some(account) = known(&self.account_id) {
            api::AccountId::parse("account_id", &account)?;
        }
        self.request()?.validate()
    }

    /// Takes the server's view. The issuer keeps the configuration's spelling when the server's is the same
    /// issuer (it drops a trailing slash), so a refresh shows no change.
    fn set_from(&mut self, p: &api::TrustPolicy) {
        self.id = s(&p.id);
        self.account_id = s(&p.account_id);
        self.name = s(&p.name);
        if known(&self.issuer).as_deref().map(normalize_issuer) != Some(normalize_issuer(&p.issuer)) {
            self.issuer = s(&p.issuer);
        }
        self.audience = s(&p.audience);
        self.claims = map_value(&p.claims);
        self.token_ttl_seconds = Value::Value(p.token_ttl_seconds as i64);
    }
}

/// The attributes whose change replaces the policy (the server has no update route). `issuer` counts only when
/// it names another issuer, not when a trailing slash is added or dropped.
fn replaced(prior: &TrustPolicyState, proposed: &TrustPolicyState) -> Vec<AttributePath> {
    let issuer = |st: &TrustPolicyState| match &st.issuer {
        Value::Value(i) => Value::Value(normalize_issuer(i).to_string()),
        other => other.clone(),
    };
    [
        ("account_id", proposed.account_id != prior.account_id),
        ("name", proposed.name != prior.name),
        ("issuer", issuer(proposed) != issuer(prior)),
        ("audience", proposed.audience != prior.audience),
        ("claims", proposed.claims != prior.claims),
        ("token_ttl_seconds", proposed.token_ttl_seconds != prior.token_ttl_seconds),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| AttributePath::new(name))
    .collect()
}

pub fn trust_policy_schema() -> Schema {
    Schema {
        version: 1,
        block: block(
            "An OIDC trust policy: identity tokens of an issuer whose claims match may be exchanged for \
             short-lived tokens of an account. Every change replaces the policy.",
            vec![
                ("id", string(Computed, "Trust policy id (trp_…).")),
                ("account_id", string(Required, "The account (acc_…) the exchanged tokens act as.")),
                ("name", string(Required, "Name of the policy.")),
                ("issuer", string(Required, "Token issuer URL; one of the server's --oidc-issuer values.")),
                ("audience", string(Required, "The aud the identity token must carry.")),
                (
                    "claims",
                    string_map(
                        Required,
                        "Claim name to glob (* any run of characters, ? one); every claim must match.",
                    ),
                ),
                (
                    "token_ttl_seconds",
                    number(OptionalComputed, "Lifetime of exchanged tokens, 60 to 21600 (default 3600)."),
                ),
            ],
            vec![],
        ),
    }
}

pub struct TrustPolicyResource {
    pub shared: Shared,
}

#[async_trait::async_trait]
impl Resource for TrustPolicyResource {
    type State<'a> = TrustPolicyState;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(trust_policy_schema())
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: Self::State<'a>) -> Option<()> {
        if let Err(e) = config.validate() {
            trust_field_error(diags, e);
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        mut state: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let (Some(account), Some(id)) = (known(&state.account_id), known(&state.id)) else {
            return Some((state, private));
        };
        match c.get_trust_policy(&account, &id).await {
            Ok(p) => {
                state.set_from(&p);
                Some((state, private))
            }
            // Deleted outside Terraform (or with its account): gone from state, the next plan re-creates it.
            Err(e) if e.code() == Some("not_found") => None,
            Err(e) => {
                diags.root_error("Cannot read trust policy", e.to_string());
                None
            }
        }
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        mut proposed: Self::State<'a>,
        _config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        proposed.id = Value::Unknown;
        if proposed.token_ttl_seconds.is_null() {
            proposed.token_ttl_seconds = Value::Value(api::TOKEN_TTL_DEFAULT_SECONDS as i64);
        }
        Some((proposed, Value::Null))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        prior: Self::State<'a>,
        mut proposed: Self::State<'a>,
        config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>, Vec<AttributePath>)> {
        // Optional + computed keeps the prior value when the configuration drops it: plan the default instead,
        // so removing `token_ttl_seconds = 600` from the configuration is a change.
        if config.token_ttl_seconds.is_null() {
            proposed.token_ttl_seconds = Value::Value(api::TOKEN_TTL_DEFAULT_SECONDS as i64);
        }
        let replace = replaced(&prior, &proposed);
        proposed.id = if replace.is_empty() { prior.id.clone() } else { Value::Unknown };
        Some((proposed, private, replace))
    }

    async fn plan_destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<Self::PrivateState<'a>> {
        Some(private)
    }

    async fn create<'a>(
        &self,
        diags: &mut Diagnostics,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let account = known(&planned.account_id)?;
        let req = planned.request().map_err(|e| trust_field_error(diags, e)).ok()?;
        let policy = match c.create_trust_policy(&account, &req).await {
            Ok(p) => p,
            Err(e) => {
                // An untrusted issuer (or anything else the server names a field for) points at its line.
                let field = match &e {
                    warmpool_client::Error::Api { details, .. } => {
                        details["field"].as_str().map(trust_attribute_path)
                    }
                    _ => None,
                };
                match field {
                    Some(path) => diags.error("Cannot create trust policy", e.to_string(), path),
                    None => diags.root_error("Cannot create trust policy", e.to_string()),
                }
                return None;
            }
        };
        let mut state = planned;
        state.set_from(&policy);
        Some((state, private))
    }

    /// Reached only when `issuer` is respelled (a trailing slash): the server's policy is the same, so only the
    /// state changes. Every other change is planned as a replacement.
    async fn update<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        Some((planned, private))
    }

    async fn destroy<'a>(
        &self,
        diags: &mut Diagnostics,
        state: Self::State<'a>,
        _private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<()> {
        let c = self.shared.client(diags)?;
        let (account, id) = (known(&state.account_id)?, known(&state.id)?);
        crate::gone_is_ok(c.delete_trust_policy(&account, &id).await)
            .or_diag(diags, "Cannot delete trust policy")
    }

    async fn import<'a>(
        &self,
        diags: &mut Diagnostics,
        id: String,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let Some((account, policy)) = parse_import_id(&id) else {
            diags.root_error(
                format!("Cannot import trust policy {id:?}"),
                "the import id is the account id and the policy id joined by a slash: acc_…/trp_…",
            );
            return None;
        };
        let c = self.shared.client(diags)?;
        let p = c
            .get_trust_policy(account, policy)
            .await
            .or_diag(diags, format!("Cannot import trust policy {id}"))?;
        let mut state = TrustPolicyState::default();
        state.set_from(&p);
        Some((state, Value::Null))
    }
}

/// `acc_…/trp_…` → (account, policy).
fn parse_import_id(id: &str) -> Option<(&str, &str)> {
    let (account, policy) = id.split_once('/')?;
    (api::AccountId::is(account) && api::TrustPolicyId::is(policy)).then_some((account, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrustPolicyState {
        TrustPolicyState {
            id: s("trp_1"),
            account_id: s("acc_1"),
            name: s("ci"),
            issuer: s("https://token.actions.githubusercontent.com"),
            audience: s("warmpool"),
            claims: map_value(&[("repository".to_string(), "octo-org/*".to_string())].into()),
            token_ttl_seconds: Value::Value(3600),
        }
    }

    /// A state struct that does not match the schema fails in Terraform without naming the attribute.
    #[test]
    fn state_fields_match_the_schema() {
        let json = serde_json::to_value(TrustPolicyState::default()).unwrap();
        let mut fields: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        let mut attrs: Vec<_> = trust_policy_schema().block.attributes.into_keys().collect();
        fields.sort();
        attrs.sort();
        assert_eq!(fields, attrs);
    }

    #[test]
    fn validation_names_the_attribute() {
        state().validate().unwrap();
        let field = |st: TrustPolicyState| st.validate().unwrap_err().field;
        assert_eq!(field(TrustPolicyState { issuer: s("http://example.com"), ..state() }), "issuer");
        assert_eq!(
            field(TrustPolicyState { token_ttl_seconds: Value::Value(30), ..state() }),
            "token_ttl_seconds"
        );
        assert_eq!(
            field(TrustPolicyState { token_ttl_seconds: Value::Value(-1), ..state() }),
            "token_ttl_seconds"
        );
        assert_eq!(field(TrustPolicyState { account_id: s("twp_1"), ..state() }), "account_id");
        let claims = map_value(&[("ref".to_string(), String::new())].into());
        let e = TrustPolicyState { claims, ..state() }.validate().unwrap_err();
        assert_eq!(e.field, "claims.ref");
        assert_eq!(
            trust_attribute_path(&e.field).to_string(),
            AttributePath::new("claims").key("ref").to_string()
        );
        // Unknown values (from other resources) are not errors at plan time.
        let unknown = TrustPolicyState {
            account_id: Value::Unknown,
            issuer: Value::Unknown,
            claims: Value::Unknown,
            ..state()
        };
        unknown.validate().unwrap();
    }

    #[test]
    fn only_an_issuer_respelling_is_not_a_replacement() {
        let prior = state();
        let slash = TrustPolicyState { issuer: s("https://token.actions.githubusercontent.com/"), ..state() };
        assert!(replaced(&prior, &slash).is_empty());
        let other = TrustPolicyState {
            claims: map_value(&[("repository".to_string(), "octo-org/app".to_string())].into()),
            ..state()
        };
        assert_eq!(
            replaced(&prior, &other).iter().map(ToString::to_string).collect::<Vec<_>>(),
            [AttributePath::new("claims").to_string()]
        );
    }

    #[test]
    fn import_ids_name_account_and_policy() {
        assert_eq!(parse_import_id("acc_1/trp_2"), Some(("acc_1", "trp_2")));
        for bad in ["trp_2", "acc_1", "trp_2/acc_1", "acc_/trp_2", "acc_1/trp_2/x", "acc_1/"] {
            assert_eq!(parse_import_id(bad), None, "{bad}");
        }
    }
}
