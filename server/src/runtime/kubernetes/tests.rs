//! The Kubernetes runtime against a verifier of the API server's calls (tower-test): each test states the calls
//! it expects, in order, with their method, path and body, and what the API server answers. The pod watch is
//! served from a list of pods and a script of watch events.

use std::collections::VecDeque;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;
use warmpool_api::{BuildId, Resources, SandboxId};
use warmpool_testkit::typed;

use super::*;

const NS: &str = "sandboxes";

/// One call the API server expects: method, path, a check of the request body, and the answer.
struct Call {
    method: &'static str,
    path: String,
    check: Box<dyn Fn(&Value) + Send>,
    status: u16,
    answer: Value,
}

fn call(method: &'static str, path: &str, status: u16, answer: Value) -> Call {
    Call { method, path: path.to_string(), check: Box::new(|_| {}), status, answer }
}

fn not_found(name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("pods \"{name}\" not found")})
}

fn pod_json(name: &str, id: &str, phase: &str, ip: Option<&str>) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "2",
                     "labels": {MANAGED.0: MANAGED.1, SANDBOX_LABEL: id}},
        "status": {"phase": phase, "podIP": ip},
    })
}

struct Harness {
    runtime: Arc<KubernetesRuntime>,
    exits: mpsc::UnboundedReceiver<String>,
    verifier: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

/// A runtime whose API server holds `pods`, sends `events` on the first watch, and expects `calls`.
async fn harness(pods: Vec<Value>, events: Vec<Value>, calls: Vec<Call>) -> Harness {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let verifier = tokio::spawn(async move {
        let mut calls: VecDeque<Call> = calls.into();
        let mut events = Some(events);
        let mut pending_watches = Vec::new();
        while !calls.is_empty() || events.is_some() {
            let Some((request, send)) = handle.next_request().await else { break };
            let query = request.uri().query().unwrap_or("").to_string();
            let path = request.uri().path().to_string();
            let selects_managed = query.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dwarmpool");
            if request.method() == "GET" && path == format!("/api/v1/namespaces/{NS}/pods") && selects_managed
            {
                if query.contains("watch=true") {
                    match events.take() {
                        Some(events) => {
                            let lines: String = events.iter().map(|e| format!("{e}\n")).collect();
                            send.send_response(
                                Response::builder().body(Body::from(lines.into_bytes())).unwrap(),
                            );
                        }
                        // Later watches stay open: nothing more happens.
                        None => pending_watches.push(send),
                    }
                } else {
                    let list = json!({"apiVersion": "v1", "kind": "PodList",
                                      "metadata": {"resourceVersion": "1"}, "items": pods});
                    send.send_response(
                        Response::builder().body(Body::from(list.to_string().into_bytes())).unwrap(),
                    );
                }
                continue;
            }
            let expected = calls
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected call {} {path}?{query}", request.method()));
            assert_eq!(
                (request.method().as_str(), path.as_str()),
                (expected.method, expected.path.as_str()),
                "query {query}"
            );
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            (expected.check)(&body);
            let text = match &expected.answer {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            send.send_response(
                Response::builder().status(expected.status).body(Body::from(text.into_bytes())).unwrap(),
            );
        }
        drop(pending_watches);
    });
    let data = tempfile::tempdir().unwrap();
    let options = Options {
        namespace: Some(NS.into()),
        kubeconfig: None,
        image: "registry.example/warmpool:1".into(),
        advertise_url: "http://warmpool.sandboxes.svc:7070/".into(),
        data_dir: data.path().to_path_buf(),
        max_sandboxes: 10,
        user_namespaces: false,
    };
    let (tx, exits) = mpsc::unbounded_channel();
    let client = kube::Client::new(service, NS);
    let secrets = Arc::new(Secrets::from_key(b"test"));
    let runtime = KubernetesRuntime::new(client, NS.into(), &options, tx, secrets).await.unwrap();
    Harness { runtime, exits, verifier, _data: data }
}

impl Harness {
    /// Every expected call was made.
    async fn verified(self) {
        tokio::time::timeout(Duration::from_secs(5), self.verifier)
            .await
            .expect("expected calls not made")
            .unwrap();
    }
}

/// The start of sandbox `sbx_…` of build `bld_1`, or of build `bld_…`'s start-contract check.
fn start_spec(id: &str) -> StartSpec {
    let spec: TemplateSpec = serde_json::from_value(json!({
        "name": "api",
        "image": "python:3.12-slim",
        "start_cmd": "python -m http.server 8080",
        "readiness": {"tcp_socket": {"port": 8080}},
        "resources": {"cpu": 0.5, "memory_mb": 256, "disk_mb": 1024},
        "env": {"MODE": "warm", "SANDBOX0_PROCESS_LOGS": "false"},
    }))
    .unwrap();
    StartSpec {
        subject: match BuildId::parse("id", id) {
            Ok(build) => Subject::Build(build),
            Err(_) => Subject::Sandbox {
                id: SandboxId::parse("id", id).unwrap(),
                build_id: BuildId::parse("build_id", "bld_1").unwrap(),
            },
        },
        account_id: Some(typed("acc_1")),
        pool_id: Some(typed("twp_1")),
        spec,
        envs: Default::default(),
        cwd: None,
        volumes: Vec::new(),
        network: NetworkMode::None,
    }
}

fn handle(id: &str) -> RuntimeHandle {
    RuntimeHandle { id: id.into(), dir: pod::pod_name(id), has_warm_processes: true, ..Default::default() }
}

#[tokio::test]
async fn a_sandbox_pod_runs_procd_from_the_init_container_in_the_template_image() {
    let h = harness(vec![], vec![], vec![]).await;
    let plan = h.runtime.plan("sbx-1".into(), &start_spec("sbx_1"), Some("bld_1"), true);
    let pod = serde_json::to_value(pod::manifest(&plan)).unwrap();
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels[SANDBOX_LABEL], "sbx_1");
    assert_eq!(labels[pod::POOL_LABEL], "twp_1");
    assert_eq!(labels[pod::ACCOUNT_LABEL], "acc_1");
    assert_eq!(labels[BUILD_LABEL], "bld_1");
    assert_eq!(labels[pod::NETWORK_LABEL], "none");
    assert_eq!(labels[MANAGED.0], MANAGED.1);
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    let init = spec["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["image"], "registry.example/warmpool:1");
    assert_eq!(
        init[0]["command"],
        json!(["procd", "install", "--bin-dir", "/procd/bin", "--config-dir", "/config"])
    );
    let config: Value = serde_json::from_str(init[0]["env"][0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(config["warm_processes"][0]["command"][2], "python -m http.server 8080");
    assert_eq!(config["warm_processes"][0]["cwd"], "/workspace");
    // The template's log-mirror settings reach procd itself; its other variables only its processes.
    assert_eq!(config["env"], json!({"SANDBOX0_PROCESS_LOGS": "false"}));
    assert_eq!(init[0]["env"][1]["value"], h.runtime.procd.token("sbx_1"));
    // The artifact comes from the server with a token for this build only.
    assert_eq!(init[1]["command"][3], "http://warmpool.sandboxes.svc:7070/v1/builds/bld_1/artifact");
    let token = init[1]["env"][0]["value"].as_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(h.runtime.secrets.check_artifact_token(token, "bld_1", now));
    assert!(!h.runtime.secrets.check_artifact_token(token, "bld_2", now));
    let main = &spec["containers"][0];
    assert_eq!(main["image"], "python:3.12-slim");
    assert_eq!(main["command"][0], "/procd/bin/procd");
    assert_eq!(main["command"][4], "tcp://$(POD_IP):7071");
    assert_eq!(main["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let limits = json!({"cpu": "500m", "memory": "256Mi", "ephemeral-storage": "1024Mi"});
    assert_eq!(main["resources"], json!({"requests": limits, "limits": limits}));
    let mounts: Vec<&str> =
        main["volumeMounts"].as_array().unwrap().iter().map(|m| m["mountPath"].as_str().unwrap()).collect();
    assert_eq!(mounts, ["/procd/bin", "/config", "/workspace"]);
    assert_eq!(spec["volumes"][2]["emptyDir"]["sizeLimit"], "1024Mi");
    h.verified().await;
}

/// A tenant's code runs in the sandbox container: it gets no service account token to call the cluster's API
/// with, the runtime's seccomp profile, no way to gain privileges, and runc's default capabilities only; every
/// init container likewise. `--pod-user-namespaces` adds a user namespace of its own.
#[tokio::test]
async fn every_pod_is_locked_down() {
    let h = harness(vec![], vec![], vec![]).await;
    let mut plan = h.runtime.plan("sbx-1".into(), &start_spec("sbx_1"), Some("bld_1"), true);
    let pod = serde_json::to_value(pod::manifest(&plan)).unwrap();
    let spec = &pod["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(spec.get("hostUsers").is_none(), "left to the cluster without --pod-user-namespaces");
    let containers: Vec<&Value> = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(spec["containers"].as_array().unwrap())
        .collect();
    assert_eq!(containers.len(), 3);
    for c in containers {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{}", c["name"]);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{}", c["name"]);
        assert_eq!(
            sc["capabilities"]["add"],
            json!(["AUDIT_WRITE", "KILL", "NET_BIND_SERVICE"]),
            "{}",
            c["name"]
        );
        assert!(sc.get("privileged").is_none_or(|p| p == false));
    }
    plan.user_namespaces = true;
    let pod = serde_json::to_value(pod::manifest(&plan)).unwrap();
    assert_eq!(pod["spec"]["hostUsers"], false);
    h.verified().await;
}

#[tokio::test]
async fn a_template_without_an_image_runs_in_the_warmpool_image_and_a_steps_pod_fetches_nothing() {
    let h = harness(vec![], vec![], vec![]).await;
    let mut spec = start_spec("bld_9");
    spec.spec.image = None;
    spec.spec.resources = Resources::default();
    let plan = h.runtime.plan("bld-9-steps".into(), &spec, None, false);
    let pod = serde_json::to_value(pod::manifest(&plan)).unwrap();
    assert_eq!(pod["metadata"]["labels"][pod::COMPONENT], "build");
    assert_eq!(pod["spec"]["containers"][0]["image"], "registry.example/warmpool:1");
    assert_eq!(pod["spec"]["initContainers"].as_array().unwrap().len(), 1, "no artifact to fetch");
    let config: Value =
        serde_json::from_str(pod["spec"]["initContainers"][0]["env"][0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(config["warm_processes"], json!([]));
    assert_eq!(pod["spec"]["containers"][0]["resources"], json!({"requests": {}, "limits": {}}));
    h.verified().await;
}

#[tokio::test]
async fn start_creates_the_pod_and_answers_with_its_handle() {
    let created = pod_json("sbx-2", "sbx_2", "Pending", None);
    let mut create = call("POST", &format!("/api/v1/namespaces/{NS}/pods"), 201, created);
    create.check = Box::new(|body| {
        assert_eq!(body["metadata"]["name"], "sbx-2");
        assert_eq!(body["metadata"]["labels"][SANDBOX_LABEL], "sbx_2");
        assert_eq!(body["spec"]["containers"][0]["name"], SANDBOX_CONTAINER);
    });
    let h = harness(vec![], vec![], vec![create]).await;
    let handle = h.runtime.start(start_spec("sbx_2")).await.unwrap();
    assert_eq!(
        (handle.id.as_str(), handle.dir.as_str(), handle.has_warm_processes),
        ("sbx_2", "sbx-2", true)
    );
    h.verified().await;
}

#[tokio::test]
async fn start_refuses_volumes_and_host_networking_without_calling_the_api() {
    let h = harness(vec![], vec![], vec![]).await;
    let mut spec = start_spec("sbx_3");
    spec.network = NetworkMode::Host;
    let e = h.runtime.start(spec).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Invalid { field: "network.mode", .. }), "{e}");
    let mut spec = start_spec("sbx_3");
    spec.volumes = vec![super::super::Volume {
        account_id: typed("acc_1"),
        name: "cache".into(),
        mount_path: "/c".into(),
    }];
    let e = h.runtime.start(spec).await.unwrap_err();
    assert!(matches!(e, RuntimeError::Invalid { field: "volumes", .. }), "{e}");
    h.verified().await;
}

#[tokio::test]
async fn destroy_deletes_the_pod_and_a_pod_already_gone_is_fine() {
    let path = format!("/api/v1/namespaces/{NS}/pods/sbx-4");
    let calls = vec![
        call("DELETE", &path, 200, pod_json("sbx-4", "sbx_4", "Running", Some("10.0.0.4"))),
        call("DELETE", &path, 404, not_found("sbx-4")),
    ];
    let h = harness(vec![], vec![], calls).await;
    h.runtime.destroy("sbx_4", None).await.unwrap();
    h.runtime.destroy("sbx_4", None).await.unwrap();
    h.verified().await;
}

#[tokio::test]
async fn a_failed_pod_is_reported_once_watched_and_its_wait_says_why() {
    let mut failed = pod_json("sbx-5", "sbx_5", "Failed", Some("10.0.0.5"));
    failed["metadata"]["resourceVersion"] = "3".into();
    failed["status"]["containerStatuses"] = json!([{
        "name": SANDBOX_CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "start_cmd exited with 1"}},
    }]);
    let pods = vec![pod_json("sbx-5", "sbx_5", "Running", Some("10.0.0.5"))];
    let mut h = harness(pods, vec![json!({"type": "MODIFIED", "object": failed})], vec![]).await;
    let id = tokio::time::timeout(Duration::from_secs(5), h.exits.recv()).await.unwrap().unwrap();
    assert_eq!(id, "sbx_5");
    assert!(!h.runtime.is_alive(&handle("sbx_5")));
    let e = h.runtime.wait_ready(&handle("sbx_5"), Duration::from_secs(5)).await.unwrap_err();
    assert!(e.to_string().contains("start_cmd exited with 1"), "{e}");
    h.verified().await;
}

#[tokio::test]
async fn a_deleted_pod_is_reported() {
    let pod = pod_json("sbx-6", "sbx_6", "Running", Some("10.0.0.6"));
    let mut h = harness(vec![pod.clone()], vec![json!({"type": "DELETED", "object": pod})], vec![]).await;
    let id = tokio::time::timeout(Duration::from_secs(5), h.exits.recv()).await.unwrap().unwrap();
    assert_eq!(id, "sbx_6");
    assert!(!h.runtime.is_alive(&handle("sbx_6")));
    h.verified().await;
}

#[tokio::test]
async fn after_a_restart_live_pods_are_found_by_their_labels() {
    let pods = vec![
        pod_json("sbx-7", "sbx_7", "Running", Some("10.0.0.7")),
        pod_json("sbx-8", "sbx_8", "Pending", None),
        pod_json("bld-1", "bld_1", "Running", Some("10.0.0.9")),
    ];
    let h = harness(pods, vec![], vec![]).await;
    let mut ids = h.runtime.list_sandboxes();
    ids.sort();
    assert_eq!(ids, ["sbx_7", "sbx_8"], "build pods are not sandboxes");
    assert!(h.runtime.adopt("sbx_7", &handle("sbx_7")));
    assert!(h.runtime.adopt("sbx_8", &handle("sbx_8")), "a pod still starting is adopted");
    assert!(!h.runtime.adopt("sbx_9", &handle("sbx_9")), "no pod");
    match h.runtime.at(&handle("sbx_7")).unwrap() {
        Listen::Tcp(a) => assert_eq!(a.to_string(), "10.0.0.7:7071"),
        other => panic!("{other}"),
    }
    assert!(h.runtime.at(&handle("sbx_8")).is_err(), "no IP yet");
    h.verified().await;
}

#[tokio::test]
async fn logs_are_the_sandbox_containers_log() {
    let line =
        json!({"ts": "2026-12-01T00:00:00Z", "process": "start", "pid": 7, "stream": "stdout", "data": "hi"});
    let text = format!("{{\"level\":\"INFO\",\"message\":\"procd started\"}}\n{line}\n");
    let calls =
        vec![call("GET", &format!("/api/v1/namespaces/{NS}/pods/sbx-10/log"), 200, Value::String(text))];
    let h = harness(vec![], vec![], calls).await;
    let lines: Vec<_> = h.runtime.logs(&handle("sbx_10"), 10).await.collect().await;
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].process.as_str(), lines[0].data.as_str()), ("start", "hi"));
    h.verified().await;
}

#[tokio::test]
async fn removing_a_build_deletes_both_of_its_pods_and_its_artifact() {
    let calls = vec![
        call("DELETE", &format!("/api/v1/namespaces/{NS}/pods/bld-2-steps"), 404, not_found("bld-2-steps")),
        call("DELETE", &format!("/api/v1/namespaces/{NS}/pods/bld-2"), 404, not_found("bld-2")),
    ];
    let h = harness(vec![], vec![], calls).await;
    std::fs::write(h.runtime.artifact_path("bld_2"), b"x").unwrap();
    assert!(h.runtime.artifact_file("bld_2").is_some());
    h.runtime.seal_artifact(&typed("bld_2")).await.unwrap();
    h.runtime.remove_artifact(&typed("bld_2")).await;
    assert!(h.runtime.artifact_file("bld_2").is_none());
    assert!(h.runtime.seal_artifact(&typed("bld_2")).await.is_err());
    h.verified().await;
}

#[tokio::test]
async fn an_unreachable_cluster_is_one_error_naming_the_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, warmpool_testkit::kubeconfig("http://127.0.0.1:1", None)).unwrap();
    let options = Options {
        namespace: None,
        kubeconfig: Some(path.clone()),
        image: "i".into(),
        advertise_url: "http://x".into(),
        data_dir: dir.path().into(),
        max_sandboxes: 1,
        user_namespaces: false,
    };
    let e = connect(&options).await.err().expect("no cluster there");
    let text = e.to_string();
    assert!(text.contains(&path.display().to_string()) && text.contains("namespace default"), "{text}");
    let missing = Options { kubeconfig: Some(dir.path().join("nope")), ..options };
    let e = connect(&missing).await.err().unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[tokio::test]
async fn a_build_retried_waits_for_its_old_pod_to_go_before_creating_it_again() {
    let path = format!("/api/v1/namespaces/{NS}/pods/bld-3");
    let terminating = pod_json("bld-3", "bld_3", "Running", Some("10.0.0.3"));
    let mut create = call(
        "POST",
        &format!("/api/v1/namespaces/{NS}/pods"),
        201,
        pod_json("bld-3", "bld_3", "Pending", None),
    );
    create.check = Box::new(|body| assert_eq!(body["metadata"]["labels"][pod::COMPONENT], "build"));
    let calls = vec![
        call("DELETE", &path, 200, terminating.clone()),
        call("GET", &path, 200, terminating),
        call("GET", &path, 404, not_found("bld-3")),
        create,
    ];
    let h = harness(vec![], vec![], calls).await;
    let handle = h.runtime.start(start_spec("bld_3")).await.unwrap();
    assert_eq!(handle.dir, "bld-3");
    h.verified().await;
}
