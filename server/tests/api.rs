//! The HTTP contract: OpenAPI golden file, validation with field paths, auth, tenancy and quotas.

use warmpool_api::*;

use crate::harness::*;

async fn raw(
    url: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new().request(method, format!("{url}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn admin(cp: &TestControlPlane) -> String {
    std::fs::read_to_string(cp.dir.path().join("admin.token")).unwrap().trim().to_string()
}

#[tokio::test]
async fn openapi_matches_golden_file() {
    let cp = TestControlPlane::start().await;
    let (status, doc) = raw(&cp.url, reqwest::Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(status, 200);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/openapi.json");
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).expect("golden file (run with UPDATE_GOLDEN=1 to create it)");
    assert_eq!(text, golden, "the OpenAPI document changed; if intended, run with UPDATE_GOLDEN=1");
    for route in ["/v1/sandboxes", "/v1/template-warm-pools/{id}/leases/{key}", "/v1/templates/{id}/builds"] {
        assert!(doc["paths"][route].is_object(), "{route} missing");
    }
}

#[tokio::test]
async fn health_metrics_and_readyz_need_no_token() {
    let cp = TestControlPlane::start().await;
    assert_eq!(raw(&cp.url, reqwest::Method::GET, "/healthz", None, None).await.0, 200);
    let (status, ready) = raw(&cp.url, reqwest::Method::GET, "/readyz", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(ready["runtime"]["runtime"], "local");
    assert!(ready["runtime"]["isolation"].is_string(), "{ready}");
    let (status, _) = raw(&cp.url, reqwest::Method::GET, "/metrics", None, None).await;
    assert_eq!(status, 200);
    let (status, body) = raw(&cp.url, reqwest::Method::GET, "/v1/templates", None, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
}

/// Unknown routes, methods a route does not take and path segments that do not decode answer in the error
/// envelope, like every other error.
#[tokio::test]
async fn unknown_routes_methods_and_bad_paths_answer_in_the_envelope() {
    let cp = TestControlPlane::start().await;
    let token = admin(&cp);
    for (method, path, status, code) in [
        (reqwest::Method::GET, "/v1/nope", 404, "not_found"),
        (reqwest::Method::GET, "/nope", 404, "not_found"),
        (reqwest::Method::PATCH, "/healthz", 405, "invalid_request"),
        (reqwest::Method::PUT, "/v1/templates", 405, "invalid_request"),
        (reqwest::Method::GET, "/v1/sandboxes/%FF%FE", 400, "invalid_request"),
    ] {
        let (got, body) = raw(&cp.url, method.clone(), path, Some(&token), None).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{method} {path}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
}

#[tokio::test]
async fn bad_input_names_the_field_and_writes_nothing() {
    let cp = TestControlPlane::start().await;
    let token = admin(&cp);
    let post = |path: &'static str, body: &'static str| {
        let (url, token) = (cp.url.clone(), token.clone());
        async move { raw(&url, reqwest::Method::POST, path, Some(&token), Some(body.to_string())).await }
    };
    let cases = [
        ("/v1/templates", r#"{"name":"a","colour":"red"}"#, "colour"),
        ("/v1/templates", r#"{"name":"Bad Name"}"#, "name"),
        (
            "/v1/templates",
            r#"{"name":"a","start_cmd":"x","warm_processes":[{"type":"cmd","command":["x"]},{"type":"cmd","command":["y"],"cwd":"/config/x"}]}"#,
            "warm_processes[1].cwd",
        ),
        (
            "/v1/templates",
            r#"{"name":"a","start_cmd":"x","warm_processes":[{"type":"repl","language":"python","command":["python3"]}]}"#,
            "warm_processes[0].command",
        ),
        (
            "/v1/templates",
            r#"{"name":"a","start_cmd":"x","readiness":{"exec":{"command":["true"]},"tcp_socket":{"port":1}}}"#,
            "readiness",
        ),
        ("/v1/templates", r#"{"name":"a","resources":{"cpu":-1}}"#, "resources.cpu"),
        (
            "/v1/templates",
            r#"{"name":"a","start_cmd":"x","readiness":{"exec":{"command":["true"]},"timeout_ms":9223372036854775806}}"#,
            "readiness.timeout_ms",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"nope","min_ready":3,"max_ready":1}"#,
            "max_ready",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"nope","min_ready":1,"max_ready":1}"#,
            "template",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"x","version_policy":"track_tag","min_ready":1,"max_ready":1}"#,
            "track_tag",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"x","min_ready":1,"max_ready":1,"checkout_policy":"sometimes"}"#,
            "checkout_policy",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"x","min_ready":1,"max_ready":1,"idle_timeout_seconds":9223372036854775806}"#,
            "idle_timeout_seconds",
        ),
        (
            "/v1/template-warm-pools",
            r#"{"name":"p","template":"x","min_ready":1,"max_ready":1,"max_starts_per_second":1e-20}"#,
            "max_starts_per_second",
        ),
        (
            "/v1/sandboxes",
            r#"{"template":"x","volumes":[{"name":"v","mount_path":"/data/../../etc"}]}"#,
            "volumes[0].mount_path",
        ),
        ("/v1/sandboxes", r#"{"template":"x","cwd":"relative"}"#, "cwd"),
        ("/v1/sandboxes", r#"{}"#, "template"),
        ("/v1/sandboxes", r#"{"template":"x","warm_pool_mode":"require"}"#, "warm_pool_mode"),
        ("/v1/sandboxes", r#"{"template":"x","warm_pool_wait_ms":100}"#, "warm_pool_wait_ms"),
        (
            "/v1/sandboxes",
            r#"{"template":"x","timeout_policy":{"timeout_seconds":9223372036854775806}}"#,
            "timeout_policy.timeout_seconds",
        ),
    ];
    for (path, body, field) in cases {
        let (status, err) = post(path, body).await;
        assert_eq!(status, 400, "{path} {body}: {err}");
        assert_eq!(err["error"]["code"], "invalid_request");
        assert_eq!(err["error"]["details"]["field"], field, "{body}: {err}");
    }
    assert!(cp.client.list_templates().await.unwrap().is_empty(), "nothing half-written");
    assert!(cp.client.list_pools().await.unwrap().is_empty());
    assert!(cp.client.list_sandboxes().await.unwrap().is_empty());

    let big = format!(r#"{{"name":"a","start_cmd":"{}"}}"#, "x".repeat(1 << 20));
    let (status, err) = raw(&cp.url, reqwest::Method::POST, "/v1/templates", Some(&token), Some(big)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (413, Some("payload_too_large")));
}

#[tokio::test]
async fn accounts_are_isolated_and_quotas_apply() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("shared-name").await;
    let acc = cp
        .client
        .create_account(&AccountCreate {
            name: "tenant".into(),
            quotas: Quotas { max_sandboxes: Some(1), max_warm_sandboxes: None },
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(acc.id.starts_with("acc_"));
    let tok = cp
        .client
        .create_token(&TokenCreate { account_id: acc.id.clone(), name: Some("ci".into()) })
        .await
        .unwrap();
    let tenant = cp.client_with(Some(&tok.token));
    // Another account's template is not found; the tenant may reuse the name.
    let err = tenant.get_template("shared-name").await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    let admin_sandbox = cp.client.create_sandbox(&cold("shared-name")).await.unwrap();
    assert_eq!(tenant.get_sandbox(&admin_sandbox.id).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(tenant.delete_sandbox(&admin_sandbox.id).await.unwrap_err().code(), Some("not_found"));
    // Tenants cannot administer accounts.
    let err =
        tenant.create_account(&AccountCreate { name: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Some("forbidden"));
    assert!(matches!(err, warmpool_client::Error::Api { status: 403, .. }));

    tenant.create_template(&quick_template("shared-name")).await.unwrap();
    let b = tenant.create_build("shared-name", &["stable".into()]).await.unwrap();
    let b = tenant.wait_build(&b.id, std::time::Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(b.status, BuildStatus::Ready);
    let first = tenant.create_sandbox(&cold("shared-name:stable")).await.unwrap();
    let err = tenant.create_sandbox(&cold("shared-name:stable")).await.unwrap_err();
    assert_eq!(err.code(), Some("quota_exceeded"));
    assert!(matches!(err, warmpool_client::Error::Api { status: 429, .. }));
    tenant.delete_sandbox(&first.id).await.unwrap();
    // Revoked tokens stop working.
    cp.client.delete_token(&tok.id).await.unwrap();
    assert_eq!(tenant.list_templates().await.unwrap_err().code(), Some("unauthorized"));
    cp.client.delete_sandbox(&admin_sandbox.id).await.unwrap();
}
