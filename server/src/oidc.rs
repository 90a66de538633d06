//! Verifies OIDC identity tokens (a CI job's ID token) against the issuers the operator trusts
//! (`--oidc-issuer`): discovery (`<issuer>/.well-known/openid-configuration` → `jwks_uri`), the issuer's signing
//! keys cached by `kid` and fetched again when an unknown `kid` arrives (at most once per `min_refresh` per
//! issuer, so a stream of bogus tokens cannot make us hammer the issuer), and signature, issuer and time checks.
//! The cryptography is `jsonwebtoken`'s. RS256 and ES256 only: `none`, HMAC (a public key used as a shared
//! secret) and everything else are refused before any key is looked at.
//!
//! What the token may be used for (audience, claims) is the trust policies' business (`app::trust`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECONDS: u64 = 60;
/// Keys older than this are fetched again before use, so a key the issuer withdrew stops working.
const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Issuer URLs, as tokens carry them in `iss`.
    pub issuers: Vec<String>,
    /// The least time between two key fetches of one issuer.
    pub min_refresh: Duration,
}

impl Default for OidcConfig {
    fn default() -> Self {
        OidcConfig { issuers: Vec::new(), min_refresh: Duration::from_secs(30) }
    }
}

/// Why a token was refused: `check` is the wire name of the failed check; `message` says more to the caller
/// without naming any policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub check: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(check: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { check, message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The issuer's discovery document or keys cannot be had now: nobody's fault the caller can fix.
    #[error("cannot fetch the signing keys of {issuer}")]
    KeysUnavailable {
        issuer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A token whose signature, issuer and validity window passed.
#[derive(Debug, Clone)]
pub struct Verified {
    pub issuer: String,
    pub claims: Map<String, Value>,
}

impl Verified {
    /// The audiences the token names (`aud` is a string or an array of strings).
    pub fn audiences(&self) -> Vec<&str> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// A claim as text for glob matching: strings as they are, numbers and booleans as JSON writes them;
    /// missing, null, arrays and objects are None (they match no glob).
    pub fn claim_text(&self, name: &str) -> Option<String> {
        match self.claims.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

struct IssuerKeys {
    /// `kid` → key and the one algorithm it is used with.
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not (the rate limit).
    attempted_at: Option<Instant>,
}

pub struct Verifier {
    config: OidcConfig,
    http: reqwest::Client,
    cache: HashMap<String, Arc<tokio::sync::Mutex<IssuerKeys>>>,
}

/// The form issuers are compared in: without a trailing slash.
pub fn normalize_issuer(issuer: &str) -> &str {
    issuer.trim_end_matches('/')
}

impl Verifier {
    pub fn new(config: OidcConfig) -> Verifier {
        let cache = config
            .issuers
            .iter()
            .map(|i| {
                let keys = IssuerKeys { keys: HashMap::new(), fetched_at: None, attempted_at: None };
                (normalize_issuer(i).to_string(), Arc::new(tokio::sync::Mutex::new(keys)))
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client with rustls builds");
        Verifier { config, http, cache }
    }

    /// Whether `issuer` is one the server trusts (`--oidc-issuer`).
    pub fn trusts(&self, issuer: &str) -> bool {
        self.cache.contains_key(normalize_issuer(issuer))
    }

    pub fn issuers(&self) -> &[String] {
        &self.config.issuers
    }

    /// Checks the token's algorithm, issuer, signature and validity window, in that order.
    pub async fn verify(&self, token: &str) -> Result<Verified, VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Refusal::new("signature", "not a signed JWT with an RS256 or ES256 header"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(
                Refusal::new("signature", format!("algorithm {:?} is not accepted", header.alg)).into()
            );
        }
        // The issuer decides which keys to check the signature with; nothing else is read before that check.
        let unverified = jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(token)
            .map_err(|_| Refusal::new("signature", "the token's claims do not parse"))?;
        let issuer = match unverified.claims.get("iss") {
            Some(Value::String(iss)) => normalize_issuer(iss).to_string(),
            _ => return Err(Refusal::new("issuer", "the token names no issuer (iss)").into()),
        };
        let Some(entry) = self.cache.get(&issuer) else {
            return Err(
                Refusal::new("issuer", format!("issuer {issuer:?} is not trusted by this server")).into()
            );
        };
        let kid = header.kid.ok_or_else(|| Refusal::new("signature", "the token names no key (kid)"))?;
        let (key, alg) = self.key(&issuer, entry, &kid).await?;
        if alg != header.alg {
            return Err(
                Refusal::new("signature", format!("key {kid:?} is not used with {:?}", header.alg)).into()
            );
        }
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss"]);
        // The raw `iss` as the token spells it (a trailing slash included).
        let raw_iss = unverified.claims.get("iss").and_then(Value::as_str).unwrap_or_default();
        validation.set_issuer(&[raw_iss]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::new("expired", "the token has expired (exp)"),
                ErrorKind::ImmatureSignature => Refusal::new("expired", "the token is not valid yet (nbf)"),
                ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                    Refusal::new("expired", format!("the token has no valid {c} claim"))
                }
                ErrorKind::InvalidIssuer => Refusal::new("issuer", "the token's issuer does not match"),
                _ => Refusal::new("signature", "the signature does not verify"),
            }
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(iat) = data.claims.get("iat") {
            match iat.as_u64() {
                Some(iat) if iat <= now + LEEWAY_SECONDS => {}
                Some(_) => return Err(Refusal::new("expired", "the token is not valid yet (iat)").into()),
                None => return Err(Refusal::new("expired", "the token has no valid iat claim").into()),
            }
        }
        Ok(Verified { issuer, claims: data.claims })
    }

    /// The key `kid` of `issuer`, fetching the issuer's keys when the cache lacks it or is old.
    async fn key(
        &self,
        issuer: &str,
        entry: &tokio::sync::Mutex<IssuerKeys>,
        kid: &str,
    ) -> Result<(DecodingKey, Algorithm), VerifyError> {
        let mut cached = entry.lock().await;
        let stale = cached.fetched_at.is_none_or(|t| t.elapsed() > KEYS_MAX_AGE);
        if stale || !cached.keys.contains_key(kid) {
            let may_fetch = cached.attempted_at.is_none_or(|t| t.elapsed() >= self.config.min_refresh);
            if may_fetch {
                cached.attempted_at = Some(Instant::now());
                match self.fetch_keys(issuer).await {
                    Ok(keys) => {
                        tracing::info!(issuer, keys = keys.len(), "Fetched the issuer's signing keys");
                        cached.keys = keys;
                        cached.fetched_at = Some(Instant::now());
                    }
                    Err(source) => {
                        tracing::warn!(
                            issuer,
                            error = &*source as &dyn std::error::Error,
                            "Cannot fetch keys"
                        );
                        if cached.fetched_at.is_none() {
                            return Err(VerifyError::KeysUnavailable { issuer: issuer.to_string(), source });
                        }
                        // Keep serving with the keys we have until the issuer answers again.
                    }
                }
            }
        }
        cached.keys.get(kid).cloned().ok_or_else(|| {
            Refusal::new("signature", format!("key {kid:?} is not one of the issuer's signing keys")).into()
        })
    }

    async fn fetch_keys(
        &self,
        issuer: &str,
    ) -> Result<HashMap<String, (DecodingKey, Algorithm)>, Box<dyn std::error::Error + Send + Sync>> {
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!("{issuer}/.well-known/openid-configuration");
        let discovery: Discovery = self.http.get(&url).send().await?.error_for_status()?.json().await?;
        if normalize_issuer(&discovery.issuer) != issuer {
            return Err(format!("{url} names issuer {:?}", discovery.issuer).into());
        }
        warmpool_api::validate_issuer("jwks_uri", &discovery.jwks_uri)?;
        let set: JwkSet = self.http.get(&discovery.jwks_uri).send().await?.error_for_status()?.json().await?;
        Ok(set.keys.iter().filter_map(usable_key).collect())
    }
}

/// A signing key we accept: an RSA key (RS256) or a P-256 key (ES256), with a `kid`, meant for signatures.
fn usable_key(jwk: &Jwk) -> Option<(String, (DecodingKey, Algorithm))> {
    let kid = jwk.common.key_id.clone()?;
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return None,
    };
    if let Some(declared) = jwk.common.key_algorithm {
        if declared.to_string() != format!("{alg:?}") {
            return None;
        }
    }
    Some((kid, (DecodingKey::from_jwk(jwk).ok()?, alg)))
}
