//! Root filesystems as overlays: the lower layers (the build's artifact, then the base) are shared read-only, the
//! upper layer is the container's own, so starting a sandbox costs the same for a 1 KB and a 1 GB artifact and a
//! sandbox's disk use is what it writes.
//!
//! Containers run in a user namespace, so what the container's root must write (its upper layer, the workspace
//! and home mount points of the base, an image's files) is owned by the mapped root on the host (`give`); the
//! host's own system directories stay owned by the host's root and read-only.

use std::path::{Path, PathBuf};

use super::super::RuntimeError;
use super::oci::{IdRange, CONFIG_DIR, HOST_SYSTEM_DIRS, PROCD_BIN, RUN_DIR};
use super::run_tool;

/// Makes `path` (not what is below it) owned by the containers' root.
pub fn give(path: &Path, ids: IdRange) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(ids.root()), Some(ids.root()))
}

/// Empty mount points for procd's files and the workspace (the layer laid over an image).
pub fn mount_points(dir: &Path, ids: IdRange) -> Result<(), RuntimeError> {
    let io = |what: &str| RuntimeError::io(format!("preparing the base layer ({what})"));
    let procd_dir = PROCD_BIN.rsplit_once('/').map(|(d, _)| d).unwrap_or("/procd");
    for d in ["/workspace", procd_dir, CONFIG_DIR, RUN_DIR] {
        std::fs::create_dir_all(dir.join(d.trim_start_matches('/'))).map_err(io(d))?;
    }
    // The sandbox's root owns what an image's root would: the workspace, and /run (a warm process may keep its
    // pid files and sockets there; procd's channel is not there).
    for d in ["workspace", "run", RUN_DIR.trim_start_matches('/')] {
        give(&dir.join(d), ids).map_err(io(d))?;
    }
    std::fs::write(dir.join(PROCD_BIN.trim_start_matches('/')), b"").map_err(io("procd mount point"))
}

/// The base layer used without an image: the mount points, empty directories for the host's system directories
/// and the host's merged-`/usr` symlinks (`/bin -> usr/bin`). Returns the host directories to bind read-only.
pub fn host_base(dir: &Path, ids: IdRange) -> Result<Vec<String>, RuntimeError> {
    let io = |what: &str| RuntimeError::io(format!("preparing the base layer ({what})"));
    mount_points(dir, ids)?;
    for d in ["proc", "dev", "sys", "tmp", "root"] {
        std::fs::create_dir_all(dir.join(d)).map_err(io(d))?;
    }
    give(&dir.join("root"), ids).map_err(io("/root"))?;
    let mut binds = Vec::new();
    for host in HOST_SYSTEM_DIRS {
        let inside = dir.join(host.trim_start_matches('/'));
        match std::fs::read_link(host) {
            Ok(target) => {
                if std::fs::read_link(&inside).ok() != Some(target.clone()) {
                    let _ = std::fs::remove_file(&inside);
                    std::os::unix::fs::symlink(&target, &inside).map_err(io(host))?;
                }
            }
            Err(_) if Path::new(host).is_dir() => {
                std::fs::create_dir_all(&inside).map_err(io(host))?;
                binds.push(host.to_string());
            }
            Err(_) => {}
        }
    }
    Ok(binds)
}

/// An overlay mount: `lower` (top first) under `upper`, at `target`.
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
}

impl Overlay {
    /// Mounts it; the upper layer's top directory (the container's `/`) belongs to the containers' root.
    pub fn mount(&self, ids: IdRange) -> Result<(), RuntimeError> {
        for d in [&self.upper, &self.work, &self.target] {
            std::fs::create_dir_all(d).map_err(RuntimeError::io(format!("creating {}", d.display())))?;
        }
        give(&self.upper, ids).map_err(RuntimeError::io("handing over the upper layer"))?;
        let lower = self.lower.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        let options =
            format!("lowerdir={lower},upperdir={},workdir={}", self.upper.display(), self.work.display());
        mount_overlay(&self.target, &options)
            .map_err(RuntimeError::io(format!("mounting the overlay at {}", self.target.display())))
    }
}

fn mount_overlay(target: &Path, options: &str) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &[u8]| CString::new(s).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
    let (source, fstype) = (c(b"overlay")?, c(b"overlay")?);
    let (target, data) = (c(target.as_os_str().as_bytes())?, c(options.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    // nosuid and nodev: the mount point is walkable by every host user, and the layers hold setuid files and
    // device nodes owned by the sandboxes' ids (inside, runc's device rules and no_new_privs stop them anyway).
    let flags = libc::MS_NOSUID | libc::MS_NODEV;
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts `target` if something is mounted there (lazily if it is busy).
pub fn unmount(target: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_bytes()) else { return };
    // SAFETY: a NUL-terminated path that outlives the call.
    unsafe {
        if libc::umount2(path.as_ptr(), 0) != 0 {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Where an image is unpacked: a local OCI image layout (`/path/to/layout` or `/path/to/layout:tag`, default tag
/// `latest`), or a registry reference (`python:3.12-slim`, `ghcr.io/org/img:tag`) copied once with `skopeo`. Both
/// are unpacked with `umoci`, its files owned by the mapped ids (uid 0 in the image is `ids.start` here), into
/// `<cache>/<sha256 of the reference and the mapping>/rootfs` and reused by every later build and sandbox.
/// Returns the unpacked root filesystem.
pub async fn image_rootfs(cache: &Path, image: &str, ids: IdRange) -> Result<PathBuf, RuntimeError> {
    let image = &crate::images::before_pull(image)?;
    use sha2::Digest;
    let map = format!("0:{}:{}", ids.start, ids.size);
    let key = hex::encode(sha2::Sha256::digest(format!("{image}\n{map}").as_bytes()));
    let dir = cache.join(&key);
    let rootfs = dir.join("rootfs");
    if rootfs.is_dir() {
        return Ok(rootfs);
    }
    let staging = cache.join(format!("{key}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(RuntimeError::io("creating the image cache"))?;
    let layout = if image.starts_with('/') {
        // A local layout: `path` or `path:tag` (a tag never contains '/').
        match image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
            Some((path, tag)) => format!("{path}:{tag}"),
            None => format!("{image}:latest"),
        }
    } else {
        let copied = staging.join("layout");
        run_tool(
            "skopeo",
            &["copy", &format!("docker://{image}"), &format!("oci:{}:image", copied.display())],
        )
        .await?;
        format!("{}:image", copied.display())
    };
    let bundle = staging.join("bundle");
    run_tool(
        "umoci",
        &["unpack", "--uid-map", &map, "--gid-map", &map, "--image", &layout, &bundle.display().to_string()],
    )
    .await?;
    std::fs::create_dir_all(&dir).map_err(RuntimeError::io("creating the image cache"))?;
    std::fs::rename(bundle.join("rootfs"), &rootfs).map_err(RuntimeError::io("caching the image"))?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(rootfs)
}
