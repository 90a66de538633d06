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
