//! The pods the Kubernetes runtime creates, as plain data (so a test reads them without a cluster).
//!
//! Every pod runs procd as PID 1 of its `sandbox` container, in the template's image: the `procd` init container (the
//! `warmpool` image) copies procd into an `emptyDir` at `/procd/bin` and writes its config and token into an
//! in-memory `emptyDir` at `/config`; the `artifact` init container (when the pod starts from a build) downloads the
//! build's artifact with a build-scoped token and unpacks it into the workspace, an `emptyDir` mounted at the
//! sandbox's working directory. procd listens on the pod IP (downward API), where the server reaches it.
//!
//! Every pod is locked down as the local runtime's containers are: no service account token, the container
//! runtime's default seccomp profile, no privilege escalation, runc's default capabilities only, and (with
//! `--pod-user-namespaces`) a user namespace of its own (`hostUsers: false`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use warmpool_api::{NetworkMode, Resources};

/// The port procd listens on inside every pod.
pub const PROCD_PORT: u16 = 7071;
/// The selector of every pod this runtime manages.
pub const MANAGED: (&str, &str) = ("app.kubernetes.io/managed-by", "warmpool");
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const SANDBOX_LABEL: &str = "warmpool.dev/sandbox";
pub const BUILD_LABEL: &str = "warmpool.dev/build";
pub const POOL_LABEL: &str = "warmpool.dev/pool";
pub const ACCOUNT_LABEL: &str = "warmpool.dev/account";
/// `isolated` or `none`; the NetworkPolicies in `deploy/kubernetes/` select on it.
pub const NETWORK_LABEL: &str = "warmpool.dev/network";
/// The container running procd (and, under it, the sandbox's processes).
pub const SANDBOX_CONTAINER: &str = "sandbox";

/// What one pod is made of.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The template's image (the sandbox container).
    pub image: String,
    /// The `warmpool` image (the init containers).
    pub warmpool_image: String,
    /// procd's config file (`warm_processes`, `token_file`), written to `/config/procd.json`.
    pub procd_config: serde_json::Value,
    pub procd_token: String,
    /// Where the artifact comes from and the token that fetches it; None for a build's first pod.
    pub artifact: Option<(String, String)>,
    /// The workspace `emptyDir`'s mount point (the sandbox's working directory).
    pub workdir: String,
    pub resources: Resources,
    pub network: NetworkMode,
    /// Run the pod in a user namespace of its own (`hostUsers: false`; the cluster must support it).
    pub user_namespaces: bool,
}

/// The capabilities a container keeps: runc's default set (`runc spec`), as the local runtime gives its
/// containers. Everything else is dropped.
pub const CAPABILITIES: [&str; 3] = ["AUDIT_WRITE", "KILL", "NET_BIND_SERVICE"];

/// Every container's security context: the runtime's default seccomp profile, no privilege escalation (setuid
/// binaries and file capabilities gain nothing), and runc's default capabilities only.
fn container_security() -> serde_json::Value {
    json!({
        "allowPrivilegeEscalation": false,
        "seccompProfile": {"type": "RuntimeDefault"},
        "capabilities": {"drop": ["ALL"], "add": CAPABILITIES},
    })
}

/// The pod name of a sandbox or build id (`sbx_…` → `sbx-…`: pod names are DNS labels).
pub fn pod_name(id: &str) -> String {
    id.replace('_', "-")
}

/// The common labels of a pod; `component` is `sandbox` or `build`.
pub fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED.0.into(), MANAGED.1.into()), (COMPONENT.into(), component.into())])
}

pub fn manifest(plan: &PodPlan) -> Pod {
    let mut labels = plan.labels.clone();
    let network = match plan.network {
        NetworkMode::None => "none",
        _ => "isolated",
    };
    labels.insert(NETWORK_LABEL.into(), network.into());
    let mut init = vec![json!({
        "name": "procd",
        "image": plan.warmpool_image,
        "command": ["procd", "install", "--bin-dir", "/procd/bin", "--config-dir", "/config"],
        "env": [
            {"name": "WARMPOOL_PROCD_CONFIG", "value": plan.procd_config.to_string()},
            {"name": "WARMPOOL_PROCD_TOKEN", "value": plan.procd_token},
        ],
        "volumeMounts": [
            {"name": "procd", "mountPath": "/procd/bin"},
            {"name": "config", "mountPath": "/config"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
    })];
    if let Some((url, token)) = &plan.artifact {
        init.push(json!({
            "name": "artifact",
            "image": plan.warmpool_image,
            "command": ["procd", "fetch-artifact", "--url", url, "--into", "/workspace"],
            "env": [{"name": "WARMPOOL_ARTIFACT_TOKEN", "value": token}],
            "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": container_security(),
        }));
    }
    let quantities = quantities(&plan.resources);
    let workspace = match plan.resources.disk_mb {
        Some(mb) => json!({"sizeLimit": format!("{mb}Mi")}),
        None => json!({}),
    };
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": plan.name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 10,
            "initContainers": init,
            "containers": [{
                "name": SANDBOX_CONTAINER,
                "image": plan.image,
                "command": [
                    "/procd/bin/procd", "--config", "/config/procd.json",
                    "--listen", format!("tcp://$(POD_IP):{PROCD_PORT}"),
                ],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "workingDir": plan.workdir,
                "ports": [{"name": "procd", "containerPort": PROCD_PORT}],
                "resources": {"requests": quantities, "limits": quantities},
                "volumeMounts": [
                    {"name": "procd", "mountPath": "/procd/bin", "readOnly": true},
                    {"name": "config", "mountPath": "/config", "readOnly": true},
                    {"name": "workspace", "mountPath": plan.workdir},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": container_security(),
            }],
            "volumes": [
                {"name": "procd", "emptyDir": {}},
                {"name": "config", "emptyDir": {"medium": "Memory"}},
                {"name": "workspace", "emptyDir": workspace},
            ],
        },
    });
    if plan.user_namespaces {
        pod["spec"]["hostUsers"] = false.into();
    }
    serde_json::from_value(pod).expect("the pod manifest matches the Pod schema")
}

/// A template's resources as Kubernetes quantities (requests = limits: a sandbox gets what its template says).
fn quantities(r: &Resources) -> serde_json::Value {
    let mut q = serde_json::Map::new();
    if let Some(cpu) = r.cpu {
        q.insert("cpu".into(), format!("{}m", (cpu * 1000.0).round() as u64).into());
    }
    if let Some(mb) = r.memory_mb {
        q.insert("memory".into(), format!("{mb}Mi").into());
    }
    if let Some(mb) = r.disk_mb {
        q.insert("ephemeral-storage".into(), format!("{mb}Mi").into());
    }
    q.into()
}
