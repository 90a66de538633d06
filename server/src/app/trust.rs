//! Trust policies and the OIDC exchange: who may act as an account from CI without a stored secret. An admin
//! gives an account policies (issuer, audience, claim globs, token lifetime); a job offers its identity token at
//! `POST /v1/auth/oidc` and gets a short-lived token of the account whose policy admits it. A refusal names the
//! failed check (`signature`, `issuer`, `audience`, `expired`, `no_matching_policy`), never a policy.

use chrono::Utc;
use warmpool_api::{
    glob_matches, FieldError, List, OidcToken, TokenId, TrustPolicy, TrustPolicyCreate, TrustPolicyId,
    TOKEN_TTL_DEFAULT_SECONDS,
};

use super::accounts::{hash, secret_with_prefix};
use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::oidc::{normalize_issuer, Refusal, Verified, VerifyError};
use crate::store::{Page, TokenRow};

impl App {
    pub async fn create_trust_policy(
        &self,
        caller: &Caller,
        account_id: &str,
        req: TrustPolicyCreate,
    ) -> AppResult<TrustPolicy> {
        Self::require_admin(caller)?;
        let Some(account) = self.store.get_account(account_id).await? else {
            return Err(not_found("account", account_id));
        };
        req.validate()?;
        if !self.oidc.trusts(&req.issuer) {
            let trusted = self.oidc.issuers();
            let message = if trusted.is_empty() {
                "is not trusted: this server was started without --oidc-issuer".to_string()
            } else {
                format!("must be one of the server's --oidc-issuer values: {}", trusted.join(", "))
            };
            return Err(FieldError::new("issuer", message).into());
        }
        let policy = TrustPolicy {
            id: new_id(TrustPolicyId::from_suffix),
            account_id: account.id,
            name: req.name,
            issuer: normalize_issuer(&req.issuer).to_string(),
            audience: req.audience,
            claims: req.claims,
            token_ttl_seconds: req.token_ttl_seconds.unwrap_or(TOKEN_TTL_DEFAULT_SECONDS),
            created_at: Utc::now(),
        };
        self.store.insert_trust_policy(&policy).await?;
        tracing::info!(account = %account_id, policy = %policy.id, issuer = %policy.issuer, "Trust policy created");
        Ok(policy)
    }

    pub async fn list_trust_policies(
        &self,
        caller: &Caller,
        account_id: &str,
        page: &Page,
    ) -> AppResult<List<TrustPolicy>> {
        Self::require_admin(caller)?;
        if self.store.get_account(account_id).await?.is_none() {
            return Err(not_found("account", account_id));
        }
        super::paged(
            page,
            async |p| self.store.list_trust_policies(account_id, p).await,
            |t: &TrustPolicy| &t.id,
            |t| t,
        )
        .await
    }

    pub async fn get_trust_policy(
        &self,
        caller: &Caller,
        account_id: &str,
        id: &str,
    ) -> AppResult<TrustPolicy> {
        Self::require_admin(caller)?;
        self.store.get_trust_policy(account_id, id).await?.ok_or_else(|| not_found("trust policy", id))
    }

    pub async fn delete_trust_policy(&self, caller: &Caller, account_id: &str, id: &str) -> AppResult<()> {
        Self::require_admin(caller)?;
        if !self.store.delete_trust_policy(account_id, id).await? {
            return Err(not_found("trust policy", id));
        }
        tracing::info!(account = %account_id, policy = %id, "Trust policy deleted");
        Ok(())
    }

    /// Exchanges a verified identity token for a short-lived token of the account whose policy admits it.
    pub async fn exchange_oidc(&self, token: &str) -> AppResult<OidcToken> {
        let verified = match self.oidc.verify(token).await {
            Ok(v) => v,
            Err(VerifyError::Refused(r)) => return Err(self.refused(r, None)),
            Err(e @ VerifyError::KeysUnavailable { .. }) => {
                tracing::warn!(error = &e as &dyn std::error::Error, "OIDC exchange without keys");
                return Err(AppError::ServiceUnavailable(format!(
                    "{e}; retry once the issuer answers again"
                )));
            }
        };
        let policies = self.store.trust_policies_for_issuer(&verified.issuer).await?;
        let policy = match pick_policy(&policies, &verified) {
            Ok(p) => p,
            Err(r) => return Err(self.refused(r, Some(&verified))),
        };
        let now = Utc::now();
        let expires_at = now + chrono::Duration::seconds(policy.token_ttl_seconds as i64);
        let secret = secret_with_prefix("wpt_");
        let row = TokenRow {
            id: new_id(TokenId::from_suffix),
            account_id: Some(policy.account_id.clone()),
            name: Some(format!("oidc:{}", policy.name)),
            hash: hash(&secret),
            admin: false,
            created_at: now,
            expires_at: Some(expires_at),
            trust_policy: Some(policy.id.clone()),
        };
        self.store.insert_token(&row).await?;
        tracing::info!(
            account = %policy.account_id,
            policy = %policy.id,
            token = %row.id,
            sub = verified.claim_text("sub").unwrap_or_default(),
            %expires_at,
            "OIDC token exchanged"
        );
        Ok(OidcToken {
            token: secret,
            account_id: policy.account_id.clone(),
            expires_at,
            policy: policy.id.clone(),
        })
    }

    fn refused(&self, r: Refusal, verified: Option<&Verified>) -> AppError {
        // The log may say who asked; the caller learns only which check failed.
        tracing::info!(
            check = r.check,
            reason = %r.message,
            iss = verified.map(|v| v.issuer.as_str()).unwrap_or_default(),
            sub = verified.and_then(|v| v.claim_text("sub")).unwrap_or_default(),
            "OIDC token refused"
        );
        AppError::OidcRefused { check: r.check, message: format!("identity token refused: {}", r.message) }
    }
}

/// The first policy (in id order) of the token's issuer whose audience the token names and whose every claim
/// glob matches. Refusals say which check failed without naming a policy or a glob.
fn pick_policy<'a>(policies: &'a [TrustPolicy], token: &Verified) -> Result<&'a TrustPolicy, Refusal> {
    let audiences = token.audiences();
    let for_audience: Vec<&TrustPolicy> =
        policies.iter().filter(|p| audiences.contains(&p.audience.as_str())).collect();
    if !policies.is_empty() && for_audience.is_empty() {
        return Err(Refusal::new("audience", "no trust policy accepts the token's audience (aud)"));
    }
    for_audience
        .into_iter()
        .find(|p| {
            p.claims
                .iter()
                .all(|(claim, glob)| token.claim_text(claim).is_some_and(|v| glob_matches(glob, &v)))
        })
        .ok_or_else(|| Refusal::new("no_matching_policy", "no trust policy admits the token's claims"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmpool_testkit::typed;

    fn policy(id: &str, audience: &str, claims: &[(&str, &str)]) -> TrustPolicy {
        TrustPolicy {
            id: typed(id),
            account_id: typed(&format!("acc_{id}")),
            name: id.into(),
            issuer: "https://issuer.example".into(),
            audience: audience.into(),
            claims: claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            token_ttl_seconds: 600,
            created_at: Utc::now(),
        }
    }

    fn token(claims: serde_json::Value) -> Verified {
        Verified { issuer: "https://issuer.example".into(), claims: claims.as_object().unwrap().clone() }
    }

    #[test]
    fn the_first_policy_whose_audience_and_claims_match_wins() {
        let policies = [
            policy("trp_1", "warmpool", &[("repository", "octo/app"), ("ref", "refs/heads/main")]),
            policy("trp_2", "warmpool", &[("repository", "octo/*")]),
            policy("trp_3", "other", &[("repository", "*")]),
        ];
        let pick = |claims| pick_policy(&policies, &token(claims)).map(|p| p.id.clone()).map_err(|r| r.check);
        let main = serde_json::json!({"aud": "warmpool", "repository": "octo/app", "ref": "refs/heads/main"});
        assert_eq!(pick(main), Ok(typed("trp_1")));
        let branch =
            serde_json::json!({"aud": ["x", "warmpool"], "repository": "octo/app", "ref": "refs/heads/dev"});
        assert_eq!(pick(branch), Ok(typed("trp_2")));
        let fork = serde_json::json!({"aud": "warmpool", "repository": "fork/app", "ref": "refs/heads/main"});
        assert_eq!(pick(fork), Err("no_matching_policy"));
        let other = serde_json::json!({"aud": "other", "repository": "anything"});
        assert_eq!(pick(other), Ok(typed("trp_3")));
        let nobody = serde_json::json!({"aud": "nobody", "repository": "octo/app"});
        assert_eq!(pick(nobody), Err("audience"));
        // A claim the token lacks, or one that is not a scalar, matches no glob, not even `*`.
        let missing = serde_json::json!({"aud": "other"});
        assert_eq!(pick(missing), Err("no_matching_policy"));
        let array = serde_json::json!({"aud": "other", "repository": ["a"]});
        assert_eq!(pick(array), Err("no_matching_policy"));
    }
}
