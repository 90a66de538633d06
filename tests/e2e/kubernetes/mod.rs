//! The Kubernetes runtime end to end: a real `warmpool serve --runtime kubernetes` against an in-test API server
//! whose kubelet runs every pod's containers for real (see `cluster`): builds as pods with their artifact served
//! back to the pods started from them, pools filled with pods, `require` checkouts, a rollout, a pod that dies, and
//! a server restart that re-adopts its pods and deletes the ones it does not know.

mod cluster;

use std::time::Duration;

use cluster::Cluster;
use warmpool_api::*;
use warmpool_client::Client;
use warmpool_testkit::ServerProcess;

use crate::*;

/// A template whose build writes `built.txt` with `version` (the artifact) and whose sandboxes are ready once their
/// own flag exists.
fn template(name: &str, version: &str) -> TemplateSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "image": "debian:12-slim",
        "build": {"steps": [format!("echo {version} > built.txt")]},
        "start_cmd": "sleep 0.2; touch ready-$WARMPOOL_SANDBOX_ID; exec sleep infinity",
        "readiness": {"exec": {"command": ["sh", "-c", "test -f ready-$WARMPOOL_SANDBOX_ID"]}, "timeout_ms": 30000},
        "resources": {"cpu": 0.5, "memory_mb": 128},
    }))
    .unwrap()
}

fn server(cluster: &Cluster, data: &std::path::Path) -> ServerProcess {
    let args = cluster.serve_args();
    ServerProcess::start(data, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The pods of a pool, by sandbox id, with their phase.
fn pool_pods(cluster: &Cluster, pool: &str) -> Vec<String> {
    cluster
        .pods()
        .keys()
        .filter(|name| {
            cluster.pod(name).is_some_and(|p| p["metadata"]["labels"]["warmpool.dev/pool"] == pool)
        })
        .cloned()
        .collect()
}

async fn build_tagged(c: &Client, template: &str) -> Build {
    let b = c.create_build(template, &["stable".into()]).await.unwrap();
    let b = c.wait_build(&b.id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(
        b.status,
        BuildStatus::Ready,
        "{:?}\n{}",
        b.error,
        c.build_logs(&b.id).await.unwrap_or_default()
    );
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_pools_checkouts_rollouts_and_pod_deaths_run_as_pods() {
    let cluster = Cluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let srv = server(&cluster, &tmp.path().join("data"));
    let c = &srv.client;
    let ready = c.readyz().await.unwrap();
    assert_eq!(ready["runtime"]["runtime"], "kubernetes", "{ready}");

    // A build runs its steps in a pod, packs the workspace, and checks the start contract in a pod started from it.
    c.create_template(&template("api", "v1")).await.unwrap();
    let v1 = build_tagged(c, "api").await;
    let log = c.build_logs(&v1.id).await.unwrap();
    assert!(log.contains("readiness passed"), "{log}");
    assert!(
        cluster.pods().keys().all(|p| !p.starts_with("bld-")),
        "build pods are gone: {:?}",
        cluster.pods()
    );

    // The artifact is served to its build's token and to the account, to nobody else.
    let artifact = format!("{}/v1/builds/{}/artifact", srv.url, v1.id);
    let http = reqwest::Client::new();
    assert_eq!(http.get(&artifact).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&artifact).bearer_auth("wpa_forged.1.00").send().await.unwrap().status(), 401);
    let ok = http.get(&artifact).bearer_auth(srv.token()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["content-type"], "application/zstd");

    // A pool fills with pods; readiness gates it.
    let spec = WarmPoolSpec {
        version_policy: Some(VersionPolicy::TrackTag),
        track_tag: Some("stable".into()),
        ..pool_spec("api", "api", 2, 2)
    };
    let pool = c.create_pool(&spec).await.unwrap();
    wait_status(c, &pool.id, "2 ready", |s| s.ready == 2).await;
    let pods = pool_pods(&cluster, &pool.id);
    assert_eq!(pods.len(), 2, "{:?}", cluster.pods());
    let pod = cluster.pod(&pods[0]).unwrap();
    assert_eq!(pod["spec"]["containers"][0]["image"], "debian:12-slim");
    assert_eq!(pod["spec"]["containers"][0]["resources"]["limits"]["memory"], "128Mi");

    // A require checkout hands out a ready pod, which has the build's artifact in its workspace.
    let sbx = c.create_sandbox(&require(&pool.id, 5000)).await.unwrap();
    let r = sh(c, &sbx.id, "cat built.txt; pwd").await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "v1\n/workspace\n"), "{}", r.stderr);
    wait_status(c, &pool.id, "refilled", |s| s.ready == 2 && s.claimed == 1).await;
    assert!(cluster.pod(&sbx.id.replace('_', "-")).is_some(), "the claimed pod keeps running");
    c.logs(&sbx.id).await.unwrap();

    // A rollout: the tag moves to a new build; the pool replaces its pods, the claimed one is left alone.
    let patch = TemplatePatch { build: template("api", "v2").build.into(), ..Default::default() };
    c.update_template("api", &patch).await.unwrap();
    let v2 = build_tagged(c, "api").await;
    // The tag moves when the build is ready; the reconciler may not have seen it yet, so wait for the new build.
    wait_status(c, &pool.id, "rolled out", |s| {
        s.resolved_build_id.as_deref() == Some(v2.id.as_str())
            && s.ready == 2
            && s.draining == 0
            && s.warming == 0
    })
    .await;
    let fresh = c.create_sandbox(&require(&pool.id, 5000)).await.unwrap();
    assert_eq!(sh(c, &fresh.id, "cat built.txt").await.stdout, "v2\n");
    assert_eq!(sh(c, &sbx.id, "cat built.txt").await.stdout, "v1\n", "claimed sandboxes are never touched");

    // A pod that dies (its node lost, an OOM kill) is seen by the watch: the sandbox fails, the pool refills.
    wait_status(c, &pool.id, "refilled", |s| s.ready == 2).await;
    let claimed = [sbx.id.replace('_', "-"), fresh.id.replace('_', "-")];
    let victim = pool_pods(&cluster, &pool.id).into_iter().find(|p| !claimed.contains(p)).unwrap();
    cluster.kill(&victim);
    wait_status(c, &pool.id, "replaced the dead pod", |s| s.failed >= 1 && s.ready == 2).await;
    assert!(
        cluster.pod(&victim).is_none() || cluster.pods()[&victim] == "Failed",
        "the dead pod is not counted: {:?}",
        cluster.pods()
    );

    // Deleting a sandbox deletes its pod; draining the pool deletes its pods.
    c.delete_sandbox(&sbx.id).await.unwrap();
    c.delete_sandbox(&fresh.id).await.unwrap();
    c.pool_action(&pool.id, "drain").await.unwrap();
    wait_status(c, &pool.id, "drained", |s| s.ready == 0 && s.warming == 0).await;
    wait_until("no pods left", Duration::from_secs(30), || {
        cluster.pods().values().all(|phase| phase == "Failed")
    });
    assert!(cluster.pod(&sbx.id.replace('_', "-")).is_none());
    // The Role shipped in deploy/kubernetes/ grants every call the server made.
    let granted = role_rules();
    for used in cluster.verbs_used() {
        assert!(granted.contains(&used), "deploy/kubernetes/role.yaml lacks {used:?} (grants {granted:?})");
    }
    drop(srv);
    wait_until("no container processes", Duration::from_secs(10), || {
        cluster.pods().values().all(|phase| phase == "Failed") && cluster.processes() == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_server_readopts_its_pods_and_deletes_unknown_ones() {
    let cluster = Cluster::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut srv = server(&cluster, &data);
    c_setup(&srv.client).await;
    let pool = srv.client.create_pool(&pool_spec("web", "web:stable", 2, 2)).await.unwrap();
    wait_status(&srv.client, &pool.id, "2 ready", |s| s.ready == 2).await;
    let before = pool_pods(&cluster, &pool.id);

    srv.kill9();
    let mut stray = cluster.pod(&before[0]).unwrap();
    stray["metadata"]["name"] = "sbx-0000000000000000".into();
    stray["metadata"]["labels"]["warmpool.dev/sandbox"] = "sbx_0000000000000000".into();
    cluster.create_pod(stray);

    let srv = server(&cluster, &data);
    let c = &srv.client;
    wait_until("the unknown pod is deleted", Duration::from_secs(30), || {
        cluster.pod("sbx-0000000000000000").is_none()
    });
    let status = c.pool_status(&pool.id).await.unwrap();
    assert_eq!(status.ready, 2, "{status:?}");
    assert_eq!(pool_pods(&cluster, &pool.id), before, "the same pods, re-adopted");
    let sbx = c.create_sandbox(&require(&pool.id, 5000)).await.unwrap();
    assert!(before.contains(&sbx.id.replace('_', "-")));
    assert_eq!(sh(c, &sbx.id, "cat built.txt").await.stdout, "v1\n");
    c.delete_sandbox(&sbx.id).await.unwrap();
    c.pool_action(&pool.id, "drain").await.unwrap();
    wait_until("no pods left", Duration::from_secs(30), || cluster.pods().is_empty());
}

/// (resource, verb) pairs of `deploy/kubernetes/role.yaml`'s rules (`resources: [..]` then `verbs: [..]`).
fn role_rules() -> std::collections::BTreeSet<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/role.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let list = |line: &str| -> Vec<String> {
        let inner = line.split_once('[').unwrap().1.trim_end().trim_end_matches(']');
        inner.split(',').map(|s| s.trim().to_string()).collect()
    };
    let mut rules = std::collections::BTreeSet::new();
    let mut resources = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("resources:") {
            resources = list(rest);
        } else if let Some(rest) = line.strip_prefix("verbs:") {
            assert!(!rest.contains('*'), "no wildcard verbs");
            for r in &resources {
                rules.extend(list(rest).into_iter().map(|v| (r.clone(), v)));
            }
        }
    }
    rules
}

async fn c_setup(c: &Client) {
    c.create_template(&template("web", "v1")).await.unwrap();
    build_tagged(c, "web").await;
}

#[test]
fn serve_without_a_reachable_cluster_exits_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(&kubeconfig, warmpool_testkit::kubeconfig("http://127.0.0.1:1", None)).unwrap();
    let out = std::process::Command::new(warmpool_testkit::sibling_bin("warmpool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--runtime", "kubernetes", "--data-dir"])
        .arg(tmp.path().join("data"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&kubeconfig.display().to_string()), "{stderr}");
    assert!(stderr.contains("cannot list pods"), "{stderr}");
}
