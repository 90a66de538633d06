//! Hostile-tenant suite: every attack a tenant could try, asserted refused. Each test runs the attack from inside
//! a sandbox (or through the API with an ordinary account's token) against a real server and real containers, and
//! checks both that the attack fails and, where a refusal could be a false positive, that the same thing done
//! legitimately works.

mod disk;
mod kernel;
mod network;
mod procd;
mod tenancy;

use warmpool_api::*;
use warmpool_client::Client;

use crate::*;

/// An ordinary account (nothing an admin allowed beyond the defaults) and a token of it.
pub async fn account(server: &ServerProcess, name: &str) -> (Account, String) {
    let acc = server
        .client
        .create_account(&AccountCreate { name: name.into(), ..Default::default() })
        .await
        .unwrap();
    let tok =
        server.client.create_token(&TokenCreate { account_id: acc.id.clone(), name: None }).await.unwrap();
    (acc, tok.token)
}

/// An ordinary account's client, with a built template `box`.
pub async fn tenant(server: &ServerProcess, name: &str) -> Client {
    let c = Client::new(&server.url, Some(account(server, name).await.1)).unwrap();
    build(&c, &template("box", 0.0)).await;
    c
}

/// A cold create of the tenant's `box` with a network mode.
pub fn boxed(network: NetworkMode) -> SandboxCreate {
    SandboxCreate {
        template: Some("box:stable".into()),
        network: Some(NetworkPolicy { mode: network }),
        ..Default::default()
    }
}

/// Host addresses held by the sandboxes (and builds) `ids` in the host-wide address directory.
pub fn addresses_of(ids: &[impl AsRef<str>]) -> Vec<String> {
    std::fs::read_dir("/run/warmpool/ipam/warmpool")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            owner.lines().next().is_some_and(|o| ids.iter().any(|id| id.as_ref() == o.trim()))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}
