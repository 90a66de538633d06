//! Attacks of one tenant on the host and on the other tenants through the API: host networking, starving the
//! host, bad input that used to reach the store or the runtime, images from wherever, and lists of any length.
//! Almost every refusal comes before anything starts, so most of these tests run no container at all and check
//! that none was started.

use warmpool_api::*;
use warmpool_client::{Client, Error};
use warmpool_testkit::TempServer;

use crate::*;

/// An ordinary account and a client with its token.
async fn tenant(server: &ServerProcess, name: &str) -> (Account, Client) {
    let (acc, token) = super::account(server, name).await;
    (acc, Client::new(&server.url, Some(token)).unwrap())
}

/// Asserts `result` is the API error `code` with `details.field == field`.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Error>, status: u16, code: &str, field: &str) {
    match result {
        Err(Error::Api { status: s, code: c, details, message }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            assert_eq!(details["field"], field, "{message}: {details}");
        }
        other => panic!("expected {status} {code} naming {field}, got {other:?}"),
    }
}

/// Asserts nothing runs and nothing was laid out for a sandbox on this server.
#[track_caller]
fn nothing_started(server: &ServerProcess) {
    assert!(sandbox_dirs(&server.data_dir).is_empty(), "{:?}", sandbox_dirs(&server.data_dir));
    assert!(running_sandboxes(&server.data_dir).is_empty());
}

fn host_network(req: SandboxCreate) -> SandboxCreate {
    SandboxCreate { network: Some(NetworkPolicy { mode: NetworkMode::Host }), ..req }
}

/// `network: host` shares the host's network namespace: every service on the host's loopback (the database,
/// the control plane) is one connect away. Only accounts an admin allowed may ask for it, cold or with a pool, in
/// any mode; the default account is no exception.
#[tokio::test]
async fn host_networking_needs_an_account_an_admin_allowed() {
    let server = TempServer::start(&[]);
    let (acc, c) = tenant(&server, "tenant").await;
    assert!(!acc.allow_host_network, "host networking is off by default");
    c.create_template(&template("box", 0.0)).await.unwrap();
    let pool = c.create_pool(&pool_spec("p", "box", 0, 1)).await.unwrap();
    let mut attempts = vec![host_network(cold("box"))];
    for mode in [CheckoutMode::Prefer, CheckoutMode::Require, CheckoutMode::Bypass] {
        attempts.push(host_network(SandboxCreate {
            warm_pool: Some(pool.id.to_string()),
            warm_pool_mode: Some(mode),
            ..Default::default()
        }));
    }
    for req in &attempts {
        refused(c.create_sandbox(req).await, 403, "forbidden", "network.mode");
    }
    // The admin's own account is refused too until an admin sets it explicitly.
    server.client.create_template(&template("box", 0.0)).await.unwrap();
    refused(server.client.create_sandbox(&host_network(cold("box"))).await, 403, "forbidden", "network.mode");
    // A tenant cannot allow itself.
    let patch = AccountPatch { allow_host_network: Some(true), ..Default::default() };
    let err = c.update_account(&acc.id, &patch).await.unwrap_err();
    assert!(matches!(&err, Error::Api { status: 403, code, .. } if code == "forbidden"), "{err}");
    nothing_started(&server);

    // Once an admin allows it, the request gets past the check (to the next one: the template has no build).
    let updated = server.client.update_account(&acc.id, &patch).await.unwrap();
    assert!(updated.allow_host_network);
    let err = c.create_sandbox(&attempts[0]).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"), "{err}");
    // And taking it away refuses again.
    let patch = AccountPatch { allow_host_network: Some(false), ..Default::default() };
    assert!(!server.client.update_account(&acc.id, &patch).await.unwrap().allow_host_network);
    refused(c.create_sandbox(&attempts[0]).await, 403, "forbidden", "network.mode");
    nothing_started(&server);
}

/// A tenant that creates sandboxes cold as fast as it can neither exceeds its own quota (new accounts get the
/// server's `--default-quotas`) nor runs the host past `--max-sandboxes`: cold creates count against it as pool
/// inventory does, and a full host answers 503 `service_unavailable` before anything starts.
#[tokio::test]
async fn cold_creates_are_bounded_by_quotas_and_the_host() {
    let server = TempServer::start(&[
        "--max-sandboxes",
        "2",
        "--default-quotas",
        "max_sandboxes=1,max_warm_sandboxes=1",
    ]);
    let (a, ca) = tenant(&server, "greedy").await;
    assert_eq!(a.quotas, Quotas { max_sandboxes: Some(1), max_warm_sandboxes: Some(1) }, "default quotas");
    let b = server
        .client
        .create_account(&AccountCreate {
            name: "big".into(),
            quotas: Quotas { max_sandboxes: Some(10), max_warm_sandboxes: None },
            ..Default::default()
        })
        .await
        .unwrap();
    // Quotas given are kept; one left out takes the default.
    assert_eq!(b.quotas, Quotas { max_sandboxes: Some(10), max_warm_sandboxes: Some(1) });
    let tok = server.client.create_token(&TokenCreate { account_id: b.id, name: None }).await.unwrap();
    let cb = Client::new(&server.url, Some(tok.token)).unwrap();
    build(&ca, &template("box", 0.0)).await;
    build(&cb, &template("box", 0.0)).await;

    let first = ca.create_sandbox(&cold("box")).await.unwrap();
    let err = ca.create_sandbox(&cold("box")).await.unwrap_err();
    assert!(matches!(&err, Error::Api { status: 429, code, .. } if code == "quota_exceeded"), "{err}");
    let second = cb.create_sandbox(&cold("box")).await.unwrap();
    // The host is full (2 of 2): the next cold create is refused and starts nothing.
    let err = cb.create_sandbox(&cold("box")).await.unwrap_err();
    assert!(matches!(&err, Error::Api { status: 503, code, .. } if code == "service_unavailable"), "{err}");
    assert_eq!(running_sandboxes(&server.data_dir).len(), 2);
    assert_eq!(cb.list_sandboxes().await.unwrap().len(), 1, "the refused create left no row");
    // Room again once one goes.
    ca.delete_sandbox(&first.id).await.unwrap();
    let third = cb.create_sandbox(&cold("box")).await.unwrap();
    for s in [second, third] {
        cb.delete_sandbox(&s.id).await.unwrap();
    }
    wait_no_procd(&server.data_dir);
}

/// Sends `body` (JSON text) with `method` to `path` as `token`; returns the status and the error's field.
async fn send(
    server: &ServerProcess,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", server.url)).bearer_auth(token);
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, body["error"]["details"]["field"].as_str().unwrap_or_default().to_string())
}

/// A NUL character anywhere a tenant can put a string (body values and keys, path parameters, query values) is a
/// 400 naming the field, on PostgreSQL too (which cannot store one and used to answer 500).
#[tokio::test]
async fn nul_characters_are_refused_naming_the_field() {
    let pg = warmpool_testkit::postgres::Postgres::start();
    let server = TempServer::start(&["--database", &pg.database()]);
    let (_, c) = tenant(&server, "tenant").await;
    let token = c.token().unwrap().to_string();
    c.create_template(&template("box", 0.0)).await.unwrap();
    let pool = c.create_pool(&pool_spec("p", "box", 0, 1)).await.unwrap();
    let leases = format!("/v1/template-warm-pools/{}/leases", pool.id);
    let attacks: Vec<(&str, String, Option<String>, &str)> = vec![
        ("POST", "/v1/templates".into(), Some(r#"{"name":"a\u0000b"}"#.into()), "name"),
        (
            "POST",
            "/v1/templates".into(),
            Some(r#"{"name":"t","start_cmd":"sleep 1\u0000"}"#.into()),
            "start_cmd",
        ),
        ("POST", "/v1/templates".into(), Some(r#"{"name":"t","env":{"A\u0000":"1"}}"#.into()), "env.A\u{0}"),
        (
            "PATCH",
            "/v1/templates/box".into(),
            Some(r#"{"build":{"steps":["x\u0000"]}}"#.into()),
            "build.steps[0]",
        ),
        (
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"template":"box","labels":{"k":"v\u0000"}}"#.into()),
            "labels.k",
        ),
        (
            "POST",
            "/v1/template-warm-pools".into(),
            Some(
                r#"{"name":"p2","template":"box","min_ready":0,"max_ready":1,"labels":{"a":"\u0000"}}"#
                    .into(),
            ),
            "labels.a",
        ),
        ("PUT", format!("{leases}/run%00key"), Some(r#"{"count":1,"ttl_seconds":60}"#.into()), "key"),
        ("PUT", format!("{leases}/owner/repo/run%00"), Some(r#"{"count":1,"ttl_seconds":60}"#.into()), "key"),
        ("GET", "/v1/templates/box%00".into(), None, "id"),
        ("GET", "/v1/sandboxes/sbx_%00".into(), None, "id"),
        ("PUT", "/v1/templates/box/tags/st%00able".into(), Some(r#"{"build_id":"bld_1"}"#.into()), "tag"),
        ("DELETE", format!("{leases}/k?drain_if_last=%00"), None, "drain_if_last"),
    ];
    for (method, path, body, field) in &attacks {
        let (status, got) = send(&server, &token, method, path, body.as_deref()).await;
        assert_eq!((status, got.as_str()), (400, *field), "{method} {path} {body:?}");
    }
    // Nothing was written.
    assert_eq!(c.list_templates().await.unwrap().len(), 1);
    assert_eq!(c.list_pools().await.unwrap().len(), 1);
    assert!(c.list_leases(&pool.id).await.unwrap().is_empty());
    nothing_started(&server);
}

/// Resources a runtime would overflow on, and volumes mounted over the kernel's interfaces or procd's files, are
/// 400 naming the field before anything starts (they used to reach runc: an overflow, or a 409 after a start).
#[tokio::test]
async fn resources_and_mount_paths_are_checked_before_anything_starts() {
    let server = TempServer::start(&[]);
    let (_, c) = tenant(&server, "tenant").await;
    let token = c.token().unwrap().to_string();
    for (resources, field) in [
        (r#"{"memory_mb":9223372036854775807}"#, "resources.memory_mb"),
        (r#"{"memory_mb":1048577}"#, "resources.memory_mb"),
        (r#"{"memory_mb":0}"#, "resources.memory_mb"),
        (r#"{"disk_mb":9223372036854775807}"#, "resources.disk_mb"),
        (r#"{"cpu":1e300}"#, "resources.cpu"),
        (r#"{"cpu":0}"#, "resources.cpu"),
    ] {
        let body = format!(r#"{{"name":"big","resources":{resources}}}"#);
        let (status, got) = send(&server, &token, "POST", "/v1/templates", Some(&body)).await;
        assert_eq!((status, got.as_str()), (400, field), "{body}");
        let body = format!(
            r#"{{"name":"big","template":"box","min_ready":0,"max_ready":1,"resources":{resources}}}"#
        );
        let (status, got) = send(&server, &token, "POST", "/v1/template-warm-pools", Some(&body)).await;
        assert_eq!((status, got.as_str()), (400, field), "{body}");
    }
    // The bounds are in the schema, for clients and fuzzers to see.
    let doc: serde_json::Value =
        reqwest::get(format!("{}/v1/openapi.json", server.url)).await.unwrap().json().await.unwrap();
    let memory = &doc["components"]["schemas"]["Resources"]["properties"]["memory_mb"];
    assert_eq!(memory["maximum"], 1048576, "{memory}");

    build(&c, &template("box", 0.0)).await;
    for (i, path) in [
        "/proc",
        "/proc/sys",
        "/dev",
        "/dev/shm",
        "/sys",
        "/sys/fs/cgroup",
        "/run/warmpool",
        "/run/warmpool/x",
        "/",
        "/config",
        "/config/procd.json",
        "/procd/bin",
        "/procd/bin/procd",
        "/procd",
        "/run",
        "data",
        "/data/../proc",
        "/data/",
        "//proc",
        "/./proc",
    ]
    .into_iter()
    .enumerate()
    {
        let volumes = (0..=i.min(1))
            .map(|j| VolumeMount {
                name: format!("v{j}"),
                mount_path: if j == i.min(1) { path.into() } else { "/data".into() },
            })
            .collect();
        let req = SandboxCreate { volumes: Some(volumes), ..cold("box") };
        let field = format!("volumes[{}].mount_path", i.min(1));
        refused(c.create_sandbox(&req).await, 400, "invalid_request", &field);
    }
    nothing_started(&server);
}

/// A template's `image` is fetched by the server itself: a registry on the host's loopback (or any registry the
/// operator did not list) would make it connect there, and a path would make it read anything on the host. Both
/// are refused naming `image` when the template is written, and again right before the runtime fetches (a layout
/// that became a symlink out of `--image-dir` since).
#[tokio::test]
async fn images_come_only_from_listed_registries_and_the_image_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("ok")).unwrap();
    std::fs::create_dir_all(tmp.path().join("outside")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("outside"), images.join("escape")).unwrap();
    let server =
        TempServer::start(&["--image-dir", images.to_str().unwrap(), "--allowed-registries", "ghcr.io"]);
    let (_, c) = tenant(&server, "tenant").await;
    // A "registry" on the host's loopback, which must never see a connection.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let port = trap.local_addr().unwrap().port();
    let data = server.data_dir.canonicalize().unwrap();
    let spec = |image: &str| TemplateSpec { image: Some(image.into()), ..template("img", 0.0) };
    let attacks = [
        format!("127.0.0.1:{port}/x"),
        format!("localhost:{port}/x:latest"),
        format!("[::1]:{port}/x"),
        "169.254.169.254/latest/meta-data".to_string(),
        "10.0.0.1:5000/x".to_string(),
        "python:3.12-slim".to_string(),
        "quay.io/org/x".to_string(),
        "/".to_string(),
        "/etc".to_string(),
        data.display().to_string(),
        format!("{}:tag", data.join("sandboxes").display()),
        format!("{}/../outside", images.display()),
        images.join("escape").display().to_string(),
        images.display().to_string(),
    ];
    for image in &attacks {
        refused(c.create_template(&spec(image)).await, 400, "invalid_request", "image");
    }
    // A listed registry and a layout under the image dir are fine; patching to an attack is refused.
    c.create_template(&spec("ghcr.io/org/x:1")).await.unwrap();
    for image in &attacks {
        let patch = TemplatePatch { image: Some(image.clone()), ..Default::default() };
        refused(c.update_template("img", &patch).await, 400, "invalid_request", "image");
    }
    let ok = format!("{}:v1", images.join("ok").display());
    c.update_template("img", &TemplatePatch { image: Some(ok), ..Default::default() }).await.unwrap();
    // The layout is swapped for a symlink out of the image dir after the check: the build refuses to read it.
    std::fs::remove_dir(images.join("ok")).unwrap();
    std::os::unix::fs::symlink("/etc", images.join("ok")).unwrap();
    let b = c.create_build("img", &[]).await.unwrap();
    let b = c.wait_build(&b.id, std::time::Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(b.error.as_deref().unwrap_or("").contains("--image-dir"), "{:?}", b.error);
    assert!(trap.accept().is_err(), "the server connected to the loopback registry");
    nothing_started(&server);
}

/// A list is a page (default 100, at most 1000 items) with a cursor to the next, so thousands of resources never
/// make one answer; a bigger `limit` is a 400 naming it. The client follows cursors, so its callers see everything.
#[tokio::test]
async fn lists_are_pages_and_the_client_follows_them() {
    let server = TempServer::start(&[]);
    let (_, c) = tenant(&server, "tenant").await;
    let token = c.token().unwrap().to_string();
    for name in ["a", "b", "c"] {
        c.create_template(&template(name, 0.0)).await.unwrap();
    }
    for route in ["/v1/templates", "/v1/template-warm-pools", "/v1/sandboxes"] {
        for limit in ["1001", "0", "-1", "x"] {
            let (status, field) = send(&server, &token, "GET", &format!("{route}?limit={limit}"), None).await;
            assert_eq!((status, field.as_str()), (400, "limit"), "{route}?limit={limit}");
        }
    }
    let get = |path: String| {
        let token = token.clone();
        async move {
            let resp = reqwest::Client::new().get(path).bearer_auth(token).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>().await.unwrap()
        }
    };
    let first = get(format!("{}/v1/templates?limit=2", server.url)).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_str().expect("a next page").to_string();
    let second = get(format!("{}/v1/templates?limit=2&cursor={cursor}", server.url)).await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert!(second.get("next_cursor").is_none(), "{second}");
    let names: Vec<String> = c.list_templates().await.unwrap().into_iter().map(|t| t.name).collect();
    assert_eq!(names.len(), 3, "{names:?}");
}
