//! `network.mode: isolated`: a network namespace per sandbox wired to a host bridge by the standard CNI plugins
//! (Debian's `containernetworking-plugins`: `bridge` with `host-local` addresses, plus `loopback`). The sandbox can
//! reach out through the bridge (NAT), and nothing bound to the host's loopback is reachable from it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::super::RuntimeError;
use super::run_tool;

const CNI_BIN: &str = "/usr/lib/cni";
const BRIDGE: &str = "warmpool0";
const SUBNET: &str = "10.88.0.0/16";

pub struct Cni {
    /// `host-local` address allocations.
    pub state_dir: PathBuf,
}

/// The named network namespace of a sandbox (`/var/run/netns/<name>`).
pub fn netns_name(id: &str) -> String {
    format!("wp-{}", id.trim_start_matches("sbx_").trim_start_matches("bld_"))
}

pub fn netns_path(id: &str) -> String {
    format!("/var/run/netns/{}", netns_name(id))
}

impl Cni {
    pub fn available() -> bool {
        Path::new(CNI_BIN).join("bridge").exists()
    }

    fn config(&self, plugin: &str) -> serde_json::Value {
        match plugin {
            "bridge" => serde_json::json!({
                "cniVersion": "1.0.0", "name": "warmpool", "type": "bridge", "bridge": BRIDGE,
                "isGateway": true, "ipMasq": true, "hairpinMode": false,
                "ipam": {"type": "host-local", "dataDir": self.state_dir, "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}]}
            }),
            _ => serde_json::json!({"cniVersion": "1.0.0", "name": "warmpool-lo", "type": "loopback"}),
        }
    }

    async fn plugin(&self, plugin: &str, command: &str, id: &str, ifname: &str) -> Result<(), RuntimeError> {
        let mut child = tokio::process::Command::new(Path::new(CNI_BIN).join(plugin))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns_path(id))
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", CNI_BIN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RuntimeError::io(format!("running the CNI {plugin} plugin")))?;
        let config = self.config(plugin).to_string();
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(config.as_bytes()).await;
        }
        let out = child.wait_with_output().await.map_err(RuntimeError::io("CNI plugin"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::Failed(format!(
                "CNI {plugin} {command} failed: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Creates the sandbox's namespace and wires it (loopback up, `eth0` on the bridge).
    pub async fn add(&self, id: &str) -> Result<String, RuntimeError> {
        let _ = std::fs::create_dir_all(&self.state_dir);
        run_tool("ip", &["netns", "add", &netns_name(id)]).await?;
        self.plugin("loopback", "ADD", id, "lo").await?;
        self.plugin("bridge", "ADD", id, "eth0").await?;
        Ok(netns_path(id))
    }

    /// Releases the address and removes the namespace (idempotent).
    pub async fn remove(&self, id: &str) {
        if Path::new(&netns_path(id)).exists() {
            let _ = self.plugin("bridge", "DEL", id, "eth0").await;
            let _ = run_tool("ip", &["netns", "delete", &netns_name(id)]).await;
        }
    }
}
