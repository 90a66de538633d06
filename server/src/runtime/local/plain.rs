//! Plain containers of a sandbox's shape, for `warmpool bench fill`: the measuring stick a pool fill is held
//! against. Each one has exactly what `oci::config` gives a sandbox (its own user, pid, ipc, uts, mount and
//! network namespaces, the seccomp allowlist, the cgroup limits of a template's default resources, the host's
//! system directories bound read-only) and nothing the runtime adds around runc: no overlay (every container
//! shares one read-only base), no procd (the process is `sleep`), no network wiring (the namespace stays
//! unwired), no store, no readiness. What a pool fill costs above these is the control plane's own cost.

use std::path::{Path, PathBuf};

use serde_json::Value;
use warmpool_api::Resources;

use super::layers;
use super::oci::{self, ContainerSpec, IdRange, Network, CONFIG_DIR, PROCD_BIN};
use crate::runtime::RuntimeError;

/// The shared base of plain containers, under `dir`.
pub struct PlainBase {
    rootfs: PathBuf,
    host_dirs: Vec<String>,
    ids: IdRange,
}

impl PlainBase {
    /// Prepares the base layer in `dir/rootfs` (mount points, the host's merged-`/usr` symlinks), with a path the
    /// containers' root can walk (`dir`'s parents must be 0711 or wider, as `/run/warmpool` is).
    pub fn prepare(dir: &Path, ids: IdRange) -> Result<PlainBase, RuntimeError> {
        use std::os::unix::fs::PermissionsExt;
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(RuntimeError::io(format!("creating {}", rootfs.display())))?;
        // runc opens the root from inside the container's user namespace: walkable, and the root readable.
        for (d, mode) in [(dir, 0o711), (&rootfs, 0o755)] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                .map_err(RuntimeError::io(format!("opening {}", d.display())))?;
        }
        let host_dirs = layers::host_base(&rootfs, ids)?;
        Ok(PlainBase { rootfs, host_dirs, ids })
    }

    /// The `config.json` of plain container `id`: a sandbox's config with a read-only shared root, `args` as
    /// its process, and without procd's two bind mounts.
    pub fn config(&self, id: &str, args: &[&str]) -> Value {
        let resources = Resources::default();
        let mut config = oci::config(&ContainerSpec {
            id,
            rootfs: &self.rootfs,
            // Not mounted: the two procd mounts are taken out below.
            procd_bin: Path::new(PROCD_BIN),
            config_dir: Path::new(CONFIG_DIR),
            host_dirs: self.host_dirs.clone(),
            volumes: &[],
            network: Network::Own,
            ids: self.ids,
            resources: &resources,
            cwd: "/",
        });
        config["root"]["readonly"] = true.into();
        config["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        if let Some(mounts) = config["mounts"].as_array_mut() {
            mounts.retain(|m| m["destination"] != PROCD_BIN && m["destination"] != CONFIG_DIR);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_container_is_a_sandbox_without_procd() {
        let base = PlainBase {
            rootfs: "/run/warmpool/x/rootfs".into(),
            host_dirs: vec!["/usr".into()],
            ids: IdRange::DEFAULT,
        };
        let config = base.config("plain_1", &["/bin/sleep", "60"]);
        let sandbox = oci::config(&ContainerSpec {
            id: "plain_1",
            rootfs: Path::new("/run/warmpool/x/rootfs"),
            procd_bin: Path::new("/p"),
            config_dir: Path::new("/c"),
            host_dirs: vec!["/usr".into()],
            volumes: &[],
            network: Network::Own,
            ids: IdRange::DEFAULT,
            resources: &Resources::default(),
            cwd: "/",
        });
        for same in [&["linux"][..], &["process", "capabilities"], &["process", "noNewPrivileges"]] {
            let at = |v: &Value| same.iter().fold(v.clone(), |v, k| v[*k].clone());
            assert_eq!(at(&config), at(&sandbox), "{same:?}");
        }
        assert_eq!(config["process"]["args"], serde_json::json!(["/bin/sleep", "60"]));
        assert_eq!(config["root"]["readonly"], true);
        let mounts = config["mounts"].as_array().unwrap();
        assert_eq!(mounts.len() + 2, sandbox["mounts"].as_array().unwrap().len());
        assert!(mounts.iter().all(|m| m["destination"] != PROCD_BIN && m["destination"] != CONFIG_DIR));
    }
}
