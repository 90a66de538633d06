//! Attacks of one tenant on the host and on the other tenants through the API: host networking, starving the
//! host, bad input that used to reach the store or the runtime, images from wherever, and lists of any length.
//! Almost every refusal comes before anything starts, so most of these tests run no container at all and check
//! that none was started.

use warmpool_api::*;
use warmpool_client::{Client, Error};
use warmpool_testkit::TempServer;

use crate::*;

/// An ordinary account (nothing an admin allowed beyond the defaults) and a client with its token.
async fn tenant(server: &ServerProcess, name: &str) -> (Account, Client) {
    let acc = server
        .client
        .create_account(&AccountCreate { name: name.into(), ..Default::default() })
        .await
        .unwrap();
    let tok =
        server.client.create_token(&TokenCreate { account_id: acc.id.clone(), name: None }).await.unwrap();
    (acc, Client::new(&server.url, Some(tok.token)).unwrap())
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
            warm_pool: Some(pool.id.clone()),
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
