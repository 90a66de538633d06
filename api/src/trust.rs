//! OIDC trust policies: which identity tokens (a CI job's, signed by an issuer the server trusts) may be
//! exchanged for a short-lived token of an account. Validation that needs only the value lives here, so the
//! server, the CLI and the Terraform provider refuse the same input naming the same field.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, TrustPolicyId};
use crate::FieldError;

/// Lifetime of exchanged tokens: the default, the shortest and the longest a policy may ask for.
pub const TOKEN_TTL_DEFAULT_SECONDS: u64 = 3600;
pub const TOKEN_TTL_MIN_SECONDS: u64 = 60;
pub const TOKEN_TTL_MAX_SECONDS: u64 = 21600;
/// Claims a policy may list, and the longest claim name and glob.
pub const MAX_POLICY_CLAIMS: usize = 32;
const MAX_CLAIM_NAME: usize = 256;
const MAX_GLOB: usize = 1024;
const MAX_AUDIENCE: usize = 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicyCreate {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// The token issuer (`https://token.actions.githubusercontent.com`); one of the server's `--oidc-issuer`s.
    #[schema(example = "https://token.actions.githubusercontent.com")]
    pub issuer: String,
    /// The `aud` the token must carry (the GitHub Action asks for `warmpool` by default).
    #[schema(min_length = 1, max_length = 1024)]
    pub audience: String,
    /// Claim name → glob its value must match (`*` any run of characters, `?` one character). Every listed
    /// claim must match; a claim the token lacks never matches. At least one claim.
    #[schema(example = json!({"repository": "octo-org/app", "ref": "refs/heads/main"}))]
    pub claims: BTreeMap<String, String>,
    /// Lifetime of the tokens this policy gives out (default 3600, from 60 to 21600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 60, maximum = 21600)]
    pub token_ttl_seconds: Option<u64>,
}

impl TrustPolicyCreate {
    /// Everything but whether the server trusts the issuer.
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::validate_name("name", &self.name)?;
        validate_issuer("issuer", &self.issuer)?;
        if self.audience.trim().is_empty() || self.audience.len() > MAX_AUDIENCE {
            return Err(FieldError::new("audience", format!("must be 1-{MAX_AUDIENCE} characters")));
        }
        validate_claims("claims", &self.claims)?;
        if let Some(ttl) = self.token_ttl_seconds {
            validate_ttl("token_ttl_seconds", ttl)?;
        }
        Ok(())
    }
}

/// An `https://` URL with a host (plain `http://` only on loopback, for tests), no query or fragment.
pub fn validate_issuer(field: &str, issuer: &str) -> Result<(), FieldError> {
    let bad = |why: &str| Err(FieldError::new(field, format!("{why} (got {issuer:?})")));
    let rest = if let Some(rest) = issuer.strip_prefix("https://") {
        rest
    } else if let Some(rest) = issuer.strip_prefix("http://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.split(':').next().unwrap_or(""),
        };
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return bad("must be an https:// URL (http:// only on loopback)");
        }
        rest
    } else {
        return bad("must be an https:// URL");
    };
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return bad("must name a host");
    }
    if issuer.contains(['?', '#']) || issuer.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must be a URL without query, fragment or spaces");
    }
    Ok(())
}

/// Claim names are non-empty; globs non-empty, with `*` and `?` as the only wildcards.
pub fn validate_claims(field: &str, claims: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if claims.is_empty() {
        return Err(FieldError::new(
            field,
            "must list at least one claim (a policy without one admits every token of the issuer)",
        ));
    }
    if claims.len() > MAX_POLICY_CLAIMS {
        return Err(FieldError::new(field, format!("may list at most {MAX_POLICY_CLAIMS} claims")));
    }
    for (name, glob) in claims {
        if name.trim().is_empty() || name.len() > MAX_CLAIM_NAME || name.chars().any(char::is_control) {
            return Err(FieldError::new(
                field,
                format!("claim names must be 1-{MAX_CLAIM_NAME} characters (got {name:?})"),
            ));
        }
        let path = format!("{field}.{name}");
        if glob.is_empty() || glob.len() > MAX_GLOB || glob.chars().any(char::is_control) {
            return Err(FieldError::new(
                path,
                format!("must be a glob of 1-{MAX_GLOB} characters (`*` and `?` are wildcards)"),
            ));
        }
    }
    Ok(())
}

pub fn validate_ttl(field: &str, ttl: u64) -> Result<(), FieldError> {
    if (TOKEN_TTL_MIN_SECONDS..=TOKEN_TTL_MAX_SECONDS).contains(&ttl) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be from {TOKEN_TTL_MIN_SECONDS} to {TOKEN_TTL_MAX_SECONDS} seconds (got {ttl})"),
        ))
    }
}

/// Whether `value` matches `glob`: `*` matches any run of characters (`/` included), `?` exactly one; every
/// other character stands for itself. Linear in the inputs' product at worst, never exponential.
pub fn glob_matches(glob: &str, value: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut gi, mut vi) = (0, 0);
    // Where the last `*` was, and the value position it currently swallows up to.
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if gi < g.len() && (g[gi] == '?' || (g[gi] != '*' && g[gi] == v[vi])) {
            gi += 1;
            vi += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, vi));
            gi += 1;
        } else if let Some((sg, sv)) = star {
            gi = sg + 1;
            vi = sv + 1;
            star = Some((sg, sv + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TrustPolicy {
    /// `trp_…`
    pub id: TrustPolicyId,
    pub account_id: AccountId,
    pub name: String,
    pub issuer: String,
    pub audience: String,
    pub claims: BTreeMap<String, String>,
    pub token_ttl_seconds: u64,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/auth/oidc`: an identity token to exchange.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OidcExchange {
    /// The issuer-signed JWT (a GitHub Actions job's ID token).
    pub token: String,
}

/// A short-lived token of the account whose trust policy admitted the identity token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OidcToken {
    /// `wpt_…`: use it as `Authorization: Bearer`; refused like a revoked token after `expires_at`.
    pub token: String,
    pub account_id: AccountId,
    pub expires_at: DateTime<Utc>,
    /// The id of the trust policy that matched.
    pub policy: TrustPolicyId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        for (glob, value, want) in [
            ("octo-org/app", "octo-org/app", true),
            ("octo-org/app", "fork/app", false),
            ("octo-org/app", "octo-org/app2", false),
            ("refs/heads/*", "refs/heads/main", true),
            ("refs/heads/*", "refs/heads/feature/x", true),
            ("refs/heads/*", "refs/tags/v1", false),
            ("refs/heads/main", "refs/heads/main-evil", false),
            ("v?.*", "v1.2", true),
            ("v?.*", "v12.2", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("*main", "refs/heads/main", true),
        ] {
            assert_eq!(glob_matches(glob, value), want, "{glob} ~ {value}");
        }
    }

    #[test]
    fn a_pathological_glob_is_not_exponential() {
        let glob = "*a".repeat(100) + "b";
        let value = "a".repeat(1000);
        assert!(!glob_matches(&glob, &value));
    }

    #[test]
    fn validation_names_the_field() {
        let good = TrustPolicyCreate {
            name: "ci".into(),
            issuer: "https://token.actions.githubusercontent.com".into(),
            audience: "warmpool".into(),
            claims: [("repository".to_string(), "octo-org/app".to_string())].into(),
            token_ttl_seconds: None,
        };
        good.validate().unwrap();
        let field = |p: TrustPolicyCreate| p.validate().unwrap_err().field;
        assert_eq!(
            field(TrustPolicyCreate { issuer: "http://example.com".into(), ..good.clone() }),
            "issuer"
        );
        assert_eq!(field(TrustPolicyCreate { issuer: "ftp://x".into(), ..good.clone() }), "issuer");
        assert_eq!(field(TrustPolicyCreate { issuer: "https://".into(), ..good.clone() }), "issuer");
        assert_eq!(field(TrustPolicyCreate { audience: "".into(), ..good.clone() }), "audience");
        assert_eq!(field(TrustPolicyCreate { claims: BTreeMap::new(), ..good.clone() }), "claims");
        let claims = [("".to_string(), "x".to_string())].into();
        assert_eq!(field(TrustPolicyCreate { claims, ..good.clone() }), "claims");
        let claims = [("ref".to_string(), "".to_string())].into();
        assert_eq!(field(TrustPolicyCreate { claims, ..good.clone() }), "claims.ref");
        assert_eq!(
            field(TrustPolicyCreate { token_ttl_seconds: Some(59), ..good.clone() }),
            "token_ttl_seconds"
        );
        assert_eq!(
            field(TrustPolicyCreate { token_ttl_seconds: Some(21601), ..good.clone() }),
            "token_ttl_seconds"
        );
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
            "https://ghes.example/_services/token",
        ] {
            validate_issuer("issuer", ok).unwrap();
        }
    }
}
