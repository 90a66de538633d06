//! What an `isolated` sandbox reaches: the internet (here: the host's DNS resolvers), and nothing else — not
//! another sandbox of its own or another account, not any address of the host (the bridge gateway included), not
//! link-local (the cloud metadata address) or private ranges. Addresses are allocated per host, and nothing is
//! left behind when sandboxes stop, even while they are still starting.

use std::net::TcpListener;
use std::time::Duration;

use warmpool_api::*;

use super::*;

/// Exits 0 when `host:port` accepts a TCP connection within 2 s.
fn connect(host: &str, port: u16) -> String {
    format!("python3 -c \"import socket; socket.create_connection(('{host}', {port}), 2)\"")
}

fn address_of(r: &ExecResult) -> String {
    r.stdout.trim().to_string()
}

const MY_ADDRESS: &str = "ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1";

/// The host's first non-loopback IPv4 address outside the sandbox subnet.
fn host_address() -> Option<String> {
    let out = std::process::Command::new("ip").args(["-4", "-o", "addr", "show"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
        .find(|a| !a.starts_with("127.") && !a.starts_with("10.88."))
}

#[tokio::test]
async fn an_isolated_sandbox_reaches_no_other_sandbox_and_nothing_of_the_host() {
    let server = TempServer::start(&[]);
    let alice = tenant(&server, "alice").await;
    let bob = tenant(&server, "bob").await;
    let a = alice.create_sandbox(&boxed(NetworkMode::Isolated)).await.unwrap();
    let a2 = alice.create_sandbox(&boxed(NetworkMode::Isolated)).await.unwrap();
    let b = bob.create_sandbox(&boxed(NetworkMode::Isolated)).await.unwrap();
    let addr = address_of(&sh(&alice, &a.id, MY_ADDRESS).await);
    assert!(addr.starts_with("10.88."), "{addr:?}");
    sh(&alice, &a.id, "nohup python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 &").await;
    // The server listens (a refusal below is not a server that never started).
    let wait = "for i in $(seq 50); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8080), 1)\" \
                && exit 0; sleep 0.1; done; exit 1";
    assert_eq!(sh(&alice, &a.id, wait).await.exit_code, 0, "the file server did not start");
    assert_eq!(sh(&alice, &a2.id, &connect(&addr, 8080)).await.exit_code, 1, "a sandbox reached its sibling");
    assert_eq!(
        sh(&bob, &b.id, &connect(&addr, 8080)).await.exit_code,
        1,
        "another account's sandbox reached a"
    );

    // A service on every host address, and the control plane on loopback: none is reachable.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let api_port: u16 = server.url.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let mut targets =
        vec![(GATEWAY.to_string(), port), (GATEWAY.to_string(), api_port), ("127.0.0.1".into(), api_port)];
    if let Some(host) = host_address() {
        assert!(
            std::net::TcpStream::connect_timeout(
                &format!("{host}:{port}").parse().unwrap(),
                Duration::from_secs(2)
            )
            .is_ok(),
            "the host's own service does not answer on {host}"
        );
        targets.push((host, port));
    }
    // Link-local (the cloud metadata address) and private ranges.
    targets.push(("169.254.169.254".into(), 80));
    targets.push(("192.168.1.1".into(), 80));
    targets.push(("172.17.0.1".into(), 80));
    for (host, port) in &targets {
        let r = sh(&bob, &b.id, &connect(host, *port)).await;
        assert_ne!(r.exit_code, 0, "a sandbox reached {host}:{port}");
    }
    // The internet is what is left: names resolve through the host's resolvers.
    let r =
        sh(&bob, &b.id, "python3 -c \"import socket; print(socket.gethostbyname('deb.debian.org'))\"").await;
    assert_eq!(r.exit_code, 0, "DNS does not work from a sandbox: {}", r.stderr);
    for s in [&a, &a2] {
        alice.delete_sandbox(&s.id).await.unwrap();
    }
    bob.delete_sandbox(&b.id).await.unwrap();
    assert!(addresses_of(&[a.id, a2.id, b.id]).is_empty(), "addresses were not released");
}

#[tokio::test]
async fn none_has_loopback_only() {
    let server = TempServer::start(&[]);
    let c = tenant(&server, "tenant").await;
    let n = c.create_sandbox(&boxed(NetworkMode::None)).await.unwrap();
    let r = sh(&c, &n.id, "ls /sys/class/net; ip -o link show lo").await;
    assert_eq!(r.stdout.lines().next(), Some("lo"), "{}", r.stdout);
    assert!(r.stdout.contains("UP"), "{}", r.stdout);
    assert_ne!(sh(&c, &n.id, &connect(GATEWAY, 80)).await.exit_code, 0);
    // Its root binds low ports in its own namespace.
    let r = sh(&c, &n.id, "python3 -c \"import socket; socket.socket().bind(('127.0.0.1', 80))\"").await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    c.delete_sandbox(&n.id).await.unwrap();
}

#[tokio::test]
async fn two_servers_on_one_host_never_share_an_address() {
    let one = TempServer::start(&[]);
    let two = TempServer::start(&[]);
    let mut seen = std::collections::BTreeMap::new();
    for server in [&one, &two] {
        build(&server.client, &template("box", 0.0)).await;
        for _ in 0..3 {
            let s = server.client.create_sandbox(&cold("box:stable")).await.unwrap();
            let addr = address_of(&sh(&server.client, &s.id, MY_ADDRESS).await);
            assert!(addr.starts_with("10.88."), "{addr:?}");
            if let Some(other) = seen.insert(addr.clone(), s.id.clone()) {
                panic!("{addr} was handed to {other} and {}", s.id);
            }
        }
    }
}

#[tokio::test]
async fn stopping_sandboxes_that_are_still_starting_leaves_nothing_behind() {
    let server = TempServer::start(&[]);
    build(&server.client, &template("slow", 1.0)).await;
    let pool = server.client.create_pool(&pool_spec("burst", "slow:stable", 12, 12)).await.unwrap();
    // Drain as soon as the first sandboxes exist: most are between `runc create` and ready.
    wait_until_async("the pool to start filling", || async {
        server.client.pool_status(&pool.id).await.unwrap().warming > 0
    })
    .await;
    let started = sandbox_dirs(&server.data_dir);
    server.client.pool_action(&pool.id, "drain").await.unwrap();
    wait_status(&server.client, &pool.id, "drained", |s| s.ready + s.warming + s.draining == 0).await;
    wait_no_procd(&server.data_dir);
    let mut ids = started;
    ids.extend(sandbox_dirs(&server.data_dir));
    assert!(addresses_of(&ids).is_empty(), "addresses left: {:?}", addresses_of(&ids));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<_> =
        ids.iter().filter(|id| mounts.contains(&format!("/run/warmpool/rootfs/{id} "))).collect();
    assert!(left.is_empty(), "root filesystems still mounted: {left:?}");
}

async fn wait_until_async<F: std::future::Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(std::time::Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
