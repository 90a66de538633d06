//! A Kubernetes API server with the test as its kubelet, for the Kubernetes runtime's end-to-end suite (no cluster
//! can run here). The API keeps pods in memory and serves what the runtime calls: create, get, delete, list and
//! watch (by label selector, from a resource version) and a container's log. The kubelet runs each pod's containers
//! for real, one after the other as Kubernetes does: every container is a process in its own mount and pid
//! namespaces (`unshare`), chrooted into a root made of the host's system directories (read-only) and the pod's
//! `emptyDir` volumes at their mount paths; the `warmpool` image's binaries are the ones built by this workspace.
//! Every pod gets its own loopback address as its IP (the downward API's `status.podIP`), so procd listens on it.
//! Images other than `warmpool`'s run on the host's system directories.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The `warmpool` image the server is told to use.
pub const WARMPOOL_IMAGE: &str = "warmpool.test/warmpool:dev";

pub struct Cluster {
    pub kubeconfig: PathBuf,
    state: Arc<Mutex<Inner>>,
    root: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Inner {
    pods: BTreeMap<String, Value>,
    rv: u64,
    /// Every event so far (resource version, event), replayed to a watch that starts from an older version.
    history: Vec<(u64, Value)>,
    watches: Vec<Watch>,
    /// The running container process of each pod (`unshare`'s pid).
    processes: HashMap<String, u32>,
    next_ip: u32,
    /// (resource, verb) of every call the API answered, as RBAC names them.
    verbs: std::collections::BTreeSet<(String, String)>,
    root: PathBuf,
    bin_dir: PathBuf,
}

type Shared = Arc<Mutex<Inner>>;

/// An open watch: its label selector and where its event lines go.
type Watch = (BTreeMap<String, String>, mpsc::UnboundedSender<Vec<u8>>);

impl Cluster {
    pub async fn start() -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(Inner {
            root: root.path().to_path_buf(),
            bin_dir: warmpool_testkit::sibling_bin("procd").parent().unwrap().to_path_buf(),
            next_ip: 2,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/api/v1/namespaces/:ns/pods", get(list_or_watch).post(create))
            .route("/api/v1/namespaces/:ns/pods/:name", get(get_pod).delete(delete))
            .route("/api/v1/namespaces/:ns/pods/:name/log", get(log))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let kubeconfig = root.path().join("kubeconfig");
        std::fs::write(&kubeconfig, warmpool_testkit::kubeconfig(&url, Some("sandboxes"))).unwrap();
        Cluster { kubeconfig, state, root, server }
    }

    /// `warmpool serve` flags for this cluster.
    pub fn serve_args(&self) -> Vec<String> {
        let kubeconfig = self.kubeconfig.display().to_string();
        // The templates run `debian:12-slim` from Docker Hub.
        let flags = ["--allowed-registries", "docker.io"];
        [
            "--runtime",
            "kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--image",
            WARMPOOL_IMAGE,
            flags[0],
            flags[1],
        ]
        .map(String::from)
        .to_vec()
    }

    /// Pod names, with their phase.
    pub fn pods(&self) -> BTreeMap<String, String> {
        let inner = self.state.lock().unwrap();
        inner
            .pods
            .iter()
            .map(|(n, p)| (n.clone(), p["status"]["phase"].as_str().unwrap_or("").into()))
            .collect()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.state.lock().unwrap().pods.get(name).cloned()
    }

    /// Every (resource, verb) the server used, as RBAC names them (`pods`/`create`, `pods/log`/`get`, …).
    pub fn verbs_used(&self) -> std::collections::BTreeSet<(String, String)> {
        self.state.lock().unwrap().verbs.clone()
    }

    /// Container processes still running (after a test, none may be left).
    pub fn processes(&self) -> usize {
        self.state.lock().unwrap().processes.len()
    }

    /// Kills a pod's container, as an out-of-memory kill or a lost node would: the pod fails.
    pub fn kill(&self, name: &str) {
        let pid = self.state.lock().unwrap().processes.get(name).copied();
        kill(pid.expect("the pod runs"));
    }

    /// Creates a pod behind the server's back (as a leftover of an earlier install would be).
    pub fn create_pod(&self, pod: Value) {
        create_pod(&self.state, pod).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
        let pids: Vec<u32> = self.state.lock().unwrap().processes.drain().map(|(_, p)| p).collect();
        for pid in &pids {
            kill(*pid);
        }
        // The mounts live in the containers' own namespaces: gone with them. Wait for that before removing.
        warmpool_testkit::wait_until(
            "the pods' processes to end",
            std::time::Duration::from_secs(10),
            || pids.iter().all(|pid| !running(*pid)),
        );
        let _ = std::fs::remove_dir_all(self.root.path());
    }
}

/// Whether `pid` still runs (a zombie waits only for its reaper, and holds no mount).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

fn kill(pid: u32) {
    // SAFETY: kill(2) of a child this kubelet started; `unshare --kill-child` takes the container's namespace down.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "code": code, "message": message});
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

/// `a=b,c=d` (equality terms only, which is all the runtime uses).
fn selector(q: &HashMap<String, String>) -> BTreeMap<String, String> {
    q.get("labelSelector")
        .map(|s| s.split(',').filter_map(|t| t.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect())
        .unwrap_or_default()
}

fn matches(pod: &Value, selector: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| pod["metadata"]["labels"][k].as_str() == Some(v))
}

/// Records a change: a new resource version on the pod, the event kept and sent to the matching watches.
fn emit(inner: &mut Inner, kind: &str, mut pod: Value) -> Value {
    inner.rv += 1;
    pod["metadata"]["resourceVersion"] = inner.rv.to_string().into();
    let event = json!({"type": kind, "object": pod});
    let line = format!("{event}\n").into_bytes();
    inner.watches.retain(|(sel, tx)| !matches(&pod, sel) || tx.send(line.clone()).is_ok());
    inner.history.push((inner.rv, event));
    pod
}

async fn list_or_watch(State(state): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let sel = selector(&q);
    let mut inner = state.lock().unwrap();
    let watch = q.get("watch").map(String::as_str) == Some("true");
    inner.verbs.insert(("pods".into(), if watch { "watch" } else { "list" }.into()));
    if !watch {
        let items: Vec<&Value> = inner.pods.values().filter(|p| matches(p, &sel)).collect();
        let list = json!({"apiVersion": "v1", "kind": "PodList",
                          "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
        return Json(list).into_response();
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    for (_, event) in inner.history.iter().filter(|(rv, e)| *rv > from && matches(&e["object"], &sel)) {
        let _ = tx.send(format!("{event}\n").into_bytes());
    }
    inner.watches.push((sel, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    axum::body::Body::from_stream(stream).into_response()
}

async fn create(State(state): State<Shared>, Json(pod): Json<Value>) -> Response {
    state.lock().unwrap().verbs.insert(("pods".into(), "create".into()));
    match create_pod(&state, pod) {
        Ok(pod) => (StatusCode::CREATED, Json(pod)).into_response(),
        Err(r) => *r,
    }
}

fn create_pod(state: &Shared, mut pod: Value) -> Result<Value, Box<Response>> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let mut inner = state.lock().unwrap();
    if inner.pods.contains_key(&name) {
        return Err(Box::new(status(409, "AlreadyExists", format!("pods \"{name}\" already exists"))));
    }
    pod["metadata"]["namespace"] = "sandboxes".into();
    pod["metadata"]["uid"] = format!("uid-{name}-{}", inner.rv).into();
    pod["metadata"]["creationTimestamp"] = chrono_now().into();
    pod["status"] = json!({"phase": "Pending"});
    let pod = emit(&mut inner, "ADDED", pod);
    inner.pods.insert(name.clone(), pod.clone());
    let ip = format!("127.0.0.{}", inner.next_ip);
    inner.next_ip += 1;
    drop(inner);
    tokio::spawn(run_pod(state.clone(), name, pod.clone(), ip));
    Ok(pod)
}

async fn get_pod(State(state): State<Shared>, UrlPath((_, name)): UrlPath<(String, String)>) -> Response {
    let mut inner = state.lock().unwrap();
    inner.verbs.insert(("pods".into(), "get".into()));
    match inner.pods.get(&name) {
        Some(p) => Json(p.clone()).into_response(),
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

async fn delete(State(state): State<Shared>, UrlPath((_, name)): UrlPath<(String, String)>) -> Response {
    let mut inner = state.lock().unwrap();
    inner.verbs.insert(("pods".into(), "delete".into()));
    let Some(pod) = inner.pods.remove(&name) else {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    };
    if let Some(pid) = inner.processes.remove(&name) {
        kill(pid);
    }
    let pod = emit(&mut inner, "DELETED", pod);
    Json(pod).into_response()
}

async fn log(
    State(state): State<Shared>,
    UrlPath((_, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = state.lock().unwrap();
    inner.verbs.insert(("pods/log".into(), "get".into()));
    if !inner.pods.contains_key(&name) {
        return status(404, "NotFound", format!("pods \"{name}\" not found"));
    }
    let container = q.get("container").cloned().unwrap_or_else(|| "sandbox".into());
    let data = std::fs::read(inner.root.join(&name).join(format!("{container}.log"))).unwrap_or_default();
    let limit = q.get("limitBytes").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
    data[data.len().saturating_sub(limit)..].to_vec().into_response()
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // RFC 3339 from Unix seconds, without a date crate.
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The kubelet: runs the init containers one after the other, then the main container, and reports each step in
/// the pod's status. A pod deleted meanwhile stops where it is.
async fn run_pod(state: Shared, name: String, pod: Value, ip: String) {
    let dir = state.lock().unwrap().root.join(&name);
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        std::fs::create_dir_all(dir.join("volumes").join(v["name"].as_str().unwrap())).unwrap();
    }
    let inits = pod["spec"]["initContainers"].as_array().cloned().unwrap_or_default();
    let mut init_statuses = Vec::new();
    for c in &inits {
        let (code, message) = match run_container(&state, &name, &dir, c, &ip).await {
            Some(exit) => exit,
            None => return,
        };
        init_statuses.push(terminated(c, code, &message));
        if code != 0 {
            set_status(
                &state,
                &name,
                json!({"phase": "Failed", "podIP": ip, "initContainerStatuses": init_statuses}),
            );
            return;
        }
    }
    let main = &pod["spec"]["containers"][0];
    let running = json!({"name": main["name"], "image": main["image"], "imageID": "", "ready": true,
                         "restartCount": 0, "state": {"running": {"startedAt": chrono_now()}}});
    let status = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "initContainerStatuses": init_statuses, "containerStatuses": [running]});
    let Some((code, message)) = run_container_then(&state, &name, &dir, main, &ip, status).await else {
        return;
    };
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    set_status(
        &state,
        &name,
        json!({"phase": phase, "podIP": ip, "initContainerStatuses": init_statuses,
               "containerStatuses": [terminated(main, code, &message)]}),
    );
}

fn terminated(c: &Value, code: i32, message: &str) -> Value {
    let reason = if code == 0 { "Completed" } else { "Error" };
    json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0,
           "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}})
}

/// Updates a pod's status, unless it was deleted.
fn set_status(state: &Shared, name: &str, status: Value) -> bool {
    let mut inner = state.lock().unwrap();
    let Some(mut pod) = inner.pods.get(name).cloned() else { return false };
    pod["status"] = status;
    let pod = emit(&mut inner, "MODIFIED", pod);
    inner.pods.insert(name.to_string(), pod);
    true
}

async fn run_container(state: &Shared, pod: &str, dir: &Path, c: &Value, ip: &str) -> Option<(i32, String)> {
    run_container_then(state, pod, dir, c, ip, Value::Null).await
}

/// Runs one container to its end; `running` (when not null) is the pod status to report once it started. None when
/// the pod was deleted meanwhile.
async fn run_container_then(
    state: &Shared,
    pod: &str,
    dir: &Path,
    c: &Value,
    ip: &str,
    running: Value,
) -> Option<(i32, String)> {
    let name = c["name"].as_str().unwrap();
    let bin_dir = state.lock().unwrap().bin_dir.clone();
    // Environment, with the downward API's pod IP, then `$(VAR)` references expanded as the kubelet does.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("status.podIP") => ip.to_string(),
            _ => expand(e["value"].as_str().unwrap_or(""), &env),
        };
        env.insert(e["name"].as_str().unwrap().into(), value);
    }
    let command: Vec<String> =
        c["command"].as_array().unwrap().iter().map(|a| expand(a.as_str().unwrap(), &env)).collect();
    let root = dir.join(format!("root-{name}"));
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let mut script = String::from("set -e\n");
    for d in ["usr", "etc", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in ["bin", "sbin", "lib", "lib64"] {
        let host = Path::new("/").join(d);
        match std::fs::read_link(&host) {
            Ok(target) => {
                let _ = std::os::unix::fs::symlink(target, root.join(d));
            }
            Err(_) if host.is_dir() => {
                std::fs::create_dir_all(root.join(d)).unwrap();
                script += &format!(
                    "mount --rbind /{d} '{r}/{d}'; mount -o remount,bind,ro '{r}/{d}'\n",
                    r = root.display()
                );
            }
            Err(_) => {}
        }
    }
    for d in ["usr", "etc"] {
        script += &format!(
            "mount --rbind /{d} '{r}/{d}'; mount -o remount,bind,ro '{r}/{d}'\n",
            r = root.display()
        );
    }
    script += &format!(
        "mount --rbind /dev '{}/dev'\nmount -t proc proc '{}/proc'\n",
        root.display(),
        root.display()
    );
    let mut path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string();
    if c["image"] == WARMPOOL_IMAGE {
        std::fs::create_dir_all(root.join("warmpool")).unwrap();
        script += &format!("mount --bind '{}' '{}/warmpool'\n", bin_dir.display(), root.display());
        path = format!("/warmpool:{path}");
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let target = root.join(m["mountPath"].as_str().unwrap().trim_start_matches('/'));
        std::fs::create_dir_all(&target).unwrap();
        let source = dir.join("volumes").join(m["name"].as_str().unwrap());
        script += &format!("mount --bind '{}' '{}'\n", source.display(), target.display());
        if m["readOnly"] == true {
            script += &format!("mount -o remount,bind,ro '{}'\n", target.display());
        }
    }
    let workdir = c["workingDir"].as_str().unwrap_or("/");
    std::fs::create_dir_all(root.join(workdir.trim_start_matches('/'))).unwrap();
    script += &format!(
        "cd '{}'\nexec chroot '{}' /bin/sh -c 'cd \"$0\" && exec \"$@\"' '{workdir}' \"$@\"\n",
        root.display(),
        root.display()
    );
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
    let mut child = tokio::process::Command::new("unshare")
        .args(["--mount", "--pid", "--fork", "--kill-child", "--", "/bin/sh", "-c", &script, "sh"])
        .args(&command)
        .env_clear()
        .env("PATH", path)
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    {
        let mut inner = state.lock().unwrap();
        if !inner.pods.contains_key(pod) {
            let _ = child.start_kill();
            return None;
        }
        inner.processes.insert(pod.to_string(), child.id().unwrap());
    }
    if !running.is_null() && !set_status(state, pod, running) {
        let _ = child.start_kill();
    }
    let code = child.wait().await.map(|s| s.code().unwrap_or(137)).unwrap_or(137);
    let deleted = state.lock().unwrap().processes.remove(pod).is_none();
    if deleted {
        return None;
    }
    // terminationMessagePolicy FallbackToLogsOnError: the end of the output of a container that failed.
    let message =
        if code != 0 { warmpool_tail(&std::fs::read(&log_path).unwrap_or_default()) } else { String::new() };
    Some((code, message))
}

fn warmpool_tail(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[data.len().saturating_sub(2048)..]).into_owned()
}

/// `$(NAME)` references to earlier variables (unknown ones stay as written).
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}
