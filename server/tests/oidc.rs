//! Trust policies and `POST /v1/auth/oidc` against a real issuer made by the test (its own keys, discovery and
//! JWKS on loopback): what is admitted, what is refused and with which check, key rotation and the refetch limit.

use std::collections::BTreeMap;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::json;
use warmpool_api::*;
use warmpool_client::Error;
use warmpool_testkit::oidc::{hmac_token, now, unsigned_token, SigningKey, TestIssuer};

use crate::harness::TestControlPlane;

const REPO: &str = "octo-org/app";
const MAIN: &str = "refs/heads/main";

async fn control_plane(issuer: &TestIssuer, refresh: Duration) -> TestControlPlane {
    let url = issuer.url.clone();
    TestControlPlane::start_with(move |a| {
        a.oidc_issuers = vec![url];
        a.oidc_key_refresh_interval = refresh;
    })
    .await
}

fn policy(issuer: &str) -> TrustPolicyCreate {
    TrustPolicyCreate {
        name: "ci".into(),
        issuer: issuer.into(),
        audience: "warmpool".into(),
        claims: BTreeMap::from([("repository".into(), REPO.into()), ("ref".into(), MAIN.into())]),
        token_ttl_seconds: Some(600),
    }
}

async fn account(cp: &TestControlPlane, name: &str) -> Account {
    cp.client.create_account(&AccountCreate { name: name.into(), ..Default::default() }).await.unwrap()
}

/// The refusal's `(status, code, details.reason)`.
fn refusal(err: Error) -> (u16, String, String) {
    match err {
        Error::Api { status, code, details, .. } => {
            (status, code, details["reason"].as_str().unwrap_or_default().to_string())
        }
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn an_exchanged_token_acts_as_its_account_and_nothing_more() {
    let issuer = TestIssuer::start().await;
    let cp = control_plane(&issuer, Duration::from_secs(30)).await;
    let team = account(&cp, "team").await;
    let other = account(&cp, "other").await;
    let p = cp.client.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap();
    assert!(p.id.starts_with("trp_"), "{p:?}");
    assert_eq!((p.token_ttl_seconds, p.account_id.as_str()), (600, team.id.as_str()));
    assert_eq!(cp.client.list_trust_policies(&team.id).await.unwrap(), vec![p.clone()]);
    assert_eq!(cp.client.get_trust_policy(&team.id, &p.id).await.unwrap(), p);
    assert!(cp.client.list_trust_policies(&other.id).await.unwrap().is_empty());
    // Another account's id does not reach the policy.
    let err = cp.client.get_trust_policy(&other.id, &p.id).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));

    // Each account gets a template through a token of its own.
    for (acc, name) in [(&team, "team-tpl"), (&other, "other-tpl")] {
        let t =
            cp.client.create_token(&TokenCreate { account_id: acc.id.clone(), name: None }).await.unwrap();
        let spec: TemplateSpec =
            serde_json::from_value(json!({"name": name, "start_cmd": "sleep infinity"})).unwrap();
        cp.client_with(Some(&t.token)).create_template(&spec).await.unwrap();
    }

    let anonymous = cp.client_with(None);
    let before = now();
    let got = anonymous.exchange_oidc(&issuer.token(&issuer.claims("warmpool", REPO, MAIN))).await.unwrap();
    assert!(got.token.starts_with("wpt_"), "{got:?}");
    assert_eq!((got.account_id.as_str(), got.policy.as_str()), (team.id.as_str(), p.id.as_str()));
    let ttl = got.expires_at.timestamp() as u64 - before;
    assert!((599..=601).contains(&ttl), "expires in {ttl} s");

    let ci = cp.client_with(Some(&got.token));
    let names: Vec<String> = ci.list_templates().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["team-tpl".to_string()], "the exchanged token sees its account only");
    assert_eq!(ci.get_template("other-tpl").await.unwrap_err().code(), Some("not_found"));
    assert_eq!(ci.list_accounts().await.unwrap_err().code(), Some("forbidden"), "never an admin");
    let err = ci.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap_err();
    assert_eq!(err.code(), Some("forbidden"), "an exchanged token cannot widen its own trust");
}

#[tokio::test]
async fn refusals_name_the_failed_check_and_never_the_policy() {
    let issuer = TestIssuer::start().await;
    issuer.publish(SigningKey::generate("ec1", Algorithm::ES256));
    let cp = control_plane(&issuer, Duration::from_secs(30)).await;
    let team = account(&cp, "team").await;
    cp.client.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap();
    let anonymous = cp.client_with(None);
    let good = issuer.claims("warmpool", REPO, MAIN);
    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // Both accepted algorithms work, each with its own key.
    anonymous.exchange_oidc(&issuer.token(&good)).await.unwrap();
    anonymous.exchange_oidc(&issuer.key("ec1").sign(&good)).await.unwrap();

    let stranger = SigningKey::generate("k1", Algorithm::RS256); // the issuer's kid, another key
    let unknown = SigningKey::generate("k-unknown", Algorithm::RS256);
    let public_key = issuer.key("k1").jwk.to_string();
    let t = now();
    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong signature", stranger.sign(&good), "signature"),
        ("unknown kid", unknown.sign(&good), "signature"),
        ("alg none", unsigned_token("k1", &good), "signature"),
        ("HS256 with the public key", hmac_token("k1", public_key.as_bytes(), &good), "signature"),
        ("not a JWT", "not.a.jwt".into(), "signature"),
        ("wrong issuer", issuer.token(&with(json!({"iss": "https://evil.example"}))), "issuer"),
        ("no issuer", issuer.token(&with(json!({"iss": null}))), "issuer"),
        ("wrong audience", issuer.token(&with(json!({"aud": "someone-else"}))), "audience"),
        ("expired", issuer.token(&with(json!({"exp": t - 120, "iat": t - 600, "nbf": t - 600}))), "expired"),
        ("not yet valid", issuer.token(&with(json!({"nbf": t + 600, "exp": t + 900}))), "expired"),
        ("issued in the future", issuer.token(&with(json!({"iat": t + 600}))), "expired"),
        ("exp as a string", issuer.token(&with(json!({"exp": "never"}))), "expired"),
        ("no exp", issuer.token(&with(json!({"exp": null}))), "expired"),
        ("a fork", issuer.token(&issuer.claims("warmpool", "fork/app", MAIN)), "no_matching_policy"),
        (
            "another branch",
            issuer.token(&issuer.claims("warmpool", REPO, "refs/heads/dev")),
            "no_matching_policy",
        ),
        (
            "a look-alike repo",
            issuer.token(&issuer.claims("warmpool", "octo-org/app2", MAIN)),
            "no_matching_policy",
        ),
    ];
    for (what, token, reason) in cases {
        let err = anonymous.exchange_oidc(&token).await.unwrap_err();
        let message = err.to_string();
        assert_eq!(refusal(err), (401, "unauthorized".into(), reason.into()), "{what}: {message}");
        assert!(!message.contains(REPO) && !message.contains("trp_"), "{what} names the policy: {message}");
    }
    // The clock leeway is 60 s: a token that expired 30 s ago still passes.
    anonymous.exchange_oidc(&issuer.token(&with(json!({"exp": t - 30})))).await.unwrap();
}

#[tokio::test]
async fn keys_are_refetched_for_a_new_kid_at_most_once_per_interval() {
    let issuer = TestIssuer::start().await;
    let cp = control_plane(&issuer, Duration::from_secs(3600)).await;
    let team = account(&cp, "team").await;
    cp.client.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap();
    let anonymous = cp.client_with(None);
    let good = issuer.claims("warmpool", REPO, MAIN);
    anonymous.exchange_oidc(&issuer.token(&good)).await.unwrap();
    anonymous.exchange_oidc(&issuer.token(&good)).await.unwrap();
    assert_eq!(issuer.jwks_fetches(), 1, "keys are cached");
    // A flood of unknown kids does not turn into a flood of fetches.
    let unknown = SigningKey::generate("k-unknown", Algorithm::RS256);
    for _ in 0..5 {
        let err = anonymous.exchange_oidc(&unknown.sign(&good)).await.unwrap_err();
        assert_eq!(refusal(err).2, "signature");
    }
    assert_eq!(issuer.jwks_fetches(), 1, "rate-limited");
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_and_a_deleted_policy_admits_nothing() {
    let issuer = TestIssuer::start().await;
    let cp = control_plane(&issuer, Duration::ZERO).await;
    let team = account(&cp, "team").await;
    let p = cp.client.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap();
    let anonymous = cp.client_with(None);
    let good = issuer.claims("warmpool", REPO, MAIN);
    anonymous.exchange_oidc(&issuer.token(&good)).await.unwrap();

    // The issuer rotates: a new key, the old one withdrawn.
    let k2 = SigningKey::generate("k2", Algorithm::RS256);
    issuer.publish(k2.clone());
    issuer.withdraw("k1");
    let fetches = issuer.jwks_fetches();
    let got = anonymous.exchange_oidc(&k2.sign(&good)).await.unwrap();
    assert_eq!(got.account_id, team.id);
    assert_eq!(issuer.jwks_fetches(), fetches + 1, "the new kid made the server fetch the keys again");

    // A token issued before the policy went keeps working; no new exchange succeeds.
    cp.client.delete_trust_policy(&team.id, &p.id).await.unwrap();
    let err = anonymous.exchange_oidc(&k2.sign(&good)).await.unwrap_err();
    assert_eq!(refusal(err), (401, "unauthorized".into(), "no_matching_policy".into()));
    cp.client_with(Some(&got.token)).list_templates().await.unwrap();
    let err = cp.client.delete_trust_policy(&team.id, &p.id).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
}

#[tokio::test]
async fn policies_are_validated_naming_the_field() {
    let issuer = TestIssuer::start().await;
    let cp = control_plane(&issuer, Duration::from_secs(30)).await;
    let team = account(&cp, "team").await;
    let good = policy(&issuer.url);
    let cases: Vec<(TrustPolicyCreate, &str)> = vec![
        (
            TrustPolicyCreate {
                issuer: "https://token.actions.githubusercontent.com".into(),
                ..good.clone()
            },
            "issuer",
        ),
        (TrustPolicyCreate { issuer: "http://issuer.example".into(), ..good.clone() }, "issuer"),
        (TrustPolicyCreate { audience: " ".into(), ..good.clone() }, "audience"),
        (TrustPolicyCreate { claims: BTreeMap::new(), ..good.clone() }, "claims"),
        (TrustPolicyCreate { claims: BTreeMap::from([("".into(), "x".into())]), ..good.clone() }, "claims"),
        (
            TrustPolicyCreate { claims: BTreeMap::from([("ref".into(), "".into())]), ..good.clone() },
            "claims.ref",
        ),
        (TrustPolicyCreate { token_ttl_seconds: Some(59), ..good.clone() }, "token_ttl_seconds"),
        (TrustPolicyCreate { token_ttl_seconds: Some(21601), ..good.clone() }, "token_ttl_seconds"),
        (TrustPolicyCreate { name: "Bad Name".into(), ..good.clone() }, "name"),
    ];
    for (req, field) in cases {
        match cp.client.create_trust_policy(&team.id, &req).await.unwrap_err() {
            Error::Api { status: 400, details, .. } => assert_eq!(details["field"], field, "{req:?}"),
            other => panic!("{req:?}: {other}"),
        }
    }
    assert!(cp.client.list_trust_policies(&team.id).await.unwrap().is_empty(), "nothing was written");
    let err = cp.client.create_trust_policy("acc_missing", &good).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    let defaulted = TrustPolicyCreate { token_ttl_seconds: None, ..good.clone() };
    let p = cp.client.create_trust_policy(&team.id, &defaulted).await.unwrap();
    assert_eq!(p.token_ttl_seconds, 3600, "the default lifetime");
    let err = cp.client.create_trust_policy(&team.id, &good).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"), "names are unique within the account");
    let tenant =
        cp.client.create_token(&TokenCreate { account_id: team.id.clone(), name: None }).await.unwrap();
    let err = cp.client_with(Some(&tenant.token)).list_trust_policies(&team.id).await.unwrap_err();
    assert_eq!(err.code(), Some("forbidden"), "admin routes");
}

/// Without `--oidc-issuer` nothing is trusted, and exchanges are refused naming the issuer.
#[tokio::test]
async fn a_server_without_issuers_trusts_none() {
    let issuer = TestIssuer::start().await;
    let cp = TestControlPlane::start().await;
    let team = account(&cp, "team").await;
    let err = cp.client.create_trust_policy(&team.id, &policy(&issuer.url)).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"));
    let token = issuer.token(&issuer.claims("warmpool", REPO, MAIN));
    let err = cp.client_with(None).exchange_oidc(&token).await.unwrap_err();
    assert_eq!(refusal(err), (401, "unauthorized".into(), "issuer".into()));
    assert_eq!(issuer.jwks_fetches(), 0, "an untrusted issuer is never contacted");
}
