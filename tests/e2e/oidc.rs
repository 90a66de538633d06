//! The OIDC exchange through the real `warmpool serve --oidc-issuer` with an issuer made by the test: a job's
//! identity token becomes a token of the policy's account, which sees that account only and is refused from
//! its `expires_at` on, like a revoked token.

use std::collections::BTreeMap;
use std::time::Duration;

use warmpool_api::*;
use warmpool_testkit::oidc::TestIssuer;

use crate::TempServer;

#[tokio::test]
async fn an_exchanged_token_sees_its_account_only_and_expires_on_time() {
    let issuer = TestIssuer::start().await;
    let server = TempServer::start(&["--oidc-issuer", &issuer.url]);
    let admin = &server.client;
    let team =
        admin.create_account(&AccountCreate { name: "team".into(), ..Default::default() }).await.unwrap();
    let policy = TrustPolicyCreate {
        name: "main".into(),
        issuer: issuer.url.clone(),
        audience: "warmpool".into(),
        claims: BTreeMap::from([
            ("repository".into(), "octo-org/*".into()),
            ("ref".into(), "refs/heads/main".into()),
        ]),
        token_ttl_seconds: Some(TOKEN_TTL_MIN_SECONDS),
    };
    admin.create_trust_policy(&team.id, &policy).await.unwrap();
    // The admin's own account has a template the CI token must not see.
    let spec: TemplateSpec =
        serde_json::from_value(serde_json::json!({"name": "admin-only", "start_cmd": "sleep infinity"}))
            .unwrap();
    admin.create_template(&spec).await.unwrap();

    let anonymous = warmpool_client::Client::new(&server.url, None).unwrap();
    let id_token = issuer.token(&issuer.claims("warmpool", "octo-org/app", "refs/heads/main"));
    let got = anonymous.exchange_oidc(&id_token).await.unwrap();
    assert_eq!(got.account_id, team.id);
    let ci = warmpool_client::Client::new(&server.url, Some(got.token.clone())).unwrap();
    assert!(ci.list_templates().await.unwrap().is_empty(), "the admin's template is another account's");
    assert_eq!(ci.get_template("admin-only").await.unwrap_err().code(), Some("not_found"));
    let spec: TemplateSpec =
        serde_json::from_value(serde_json::json!({"name": "ci-tpl", "start_cmd": "sleep infinity"})).unwrap();
    ci.create_template(&spec).await.unwrap();
    assert_eq!(admin.get_template("ci-tpl").await.unwrap_err().code(), Some("not_found"), "it is the team's");

    // Refused from expires_at on (polled, with a deadline), and never before.
    let deadline = std::time::Instant::now() + Duration::from_secs(TOKEN_TTL_MIN_SECONDS + 15);
    let refused_at = loop {
        match ci.list_templates().await {
            Ok(_) => assert!(chrono::Utc::now() < got.expires_at, "still accepted after {}", got.expires_at),
            Err(e) => {
                assert_eq!(e.code(), Some("unauthorized"), "{e}");
                break chrono::Utc::now();
            }
        }
        assert!(std::time::Instant::now() < deadline, "the token outlived its lifetime");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(refused_at >= got.expires_at, "refused at {refused_at}, before {}", got.expires_at);
    assert!(refused_at - got.expires_at < chrono::Duration::seconds(2), "refused late, at {refused_at}");
    // A new job token still gets a new token.
    anonymous
        .exchange_oidc(&issuer.token(&issuer.claims("warmpool", "octo-org/app", "refs/heads/main")))
        .await
        .unwrap();
}
