//! Disk limits: every container's writable layer (its overlay `upper/` and `work/`) lives on a filesystem of its
//! own, so a sandbox that writes without end fails with a quota error while other sandboxes, the database and the
//! API keep writing to the data dir.
//!
//! That filesystem is `<data-dir>/layers.img`, a sparse btrfs image created once (sized to the data dir's free space
//! minus a reserve of a twentieth of its filesystem, between 1 and 4 GiB), loop-mounted at `<data-dir>/layers` (mounted
//! again after a restart) with quotas on. Every sandbox's and build's layer is a btrfs subvolume,
//! `layers/{sandboxes,builds}/<id>` holding `upper/` and `work/`, whose qgroup is limited to the template's
//! `disk_mb` (default 10240): the sandbox's writes then fail with `EDQUOT` ("Disk quota exceeded"); the image as a
//! whole can never take the data dir's reserve. A build's subvolume is renamed to `layers/artifacts/<id>` when it is
//! sealed (a subvolume moves within its filesystem; an artifact is a lower layer and must share the filesystem of
//! the build that wrote it). Creating a subvolume and setting its limit are two ioctls and no copying, whatever the
//! artifact's size; removing one drops it and its data (its qgroup id is never reused).
//!
//! Why btrfs and not XFS project quotas (Docker's overlay2 `size=`): they need `CONFIG_XFS_QUOTA`, and ext4's
//! project quotas `CONFIG_QFMT_V2`; kernels built without them (the development hosts', a Firecracker guest
//! build) refuse to mount with quotas, while btrfs qgroups are part of btrfs itself. The one visible difference
//! is the error: `EDQUOT` where XFS answers `ENOSPC`.
//!
//! A host that cannot do this (no `mkfs.btrfs`, no loop devices, too little free space) refuses to start sandboxes
//! and builds, saying why and how to fix it, unless the server runs with `--allow-unlimited-disk`: then layers are
//! plain directories under `<data-dir>/layers` and `disk_mb` is not enforced.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use warmpool_api::BuildId;

use super::super::RuntimeError;

/// What is left of the data dir's filesystem for the database and the API whatever sandboxes write: a twentieth
/// of it, between these bounds (a big disk's tenth would be more than a database needs and would leave no room for
/// layers on a disk that is mostly full of something else).
const MIN_RESERVE: u64 = 1 << 30;
const MAX_RESERVE: u64 = 4 << 30;
/// An image smaller than this is not worth making.
const MIN_IMAGE: u64 = 1 << 30;

/// Where writable layers live and how they are bounded.
pub struct Disk {
    root: PathBuf,
    limits: Limits,
}

enum Limits {
    /// `root` is the mounted btrfs image, quotas on.
    Enforced,
    /// `--allow-unlimited-disk` on a host that cannot enforce: plain directories.
    Off,
    /// Layers are refused, with this reason (and its fix).
    Unavailable(String),
}

/// A container's writable layer.
pub struct Layer {
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl Disk {
    /// Mounts (creating it the first time) the layers filesystem of `data_dir`. Never fails: a host that cannot
    /// enforce limits gets a `Disk` that refuses layers (or, with `allow_unlimited`, does not bound them).
    pub fn open(data_dir: &Path, allow_unlimited: bool) -> Disk {
        let root = data_dir.join("layers");
        let limits = match mount_image(data_dir, &root) {
            Ok(()) => {
                tracing::info!(layers = %root.display(), "Disk limits on (btrfs qgroups)");
                Limits::Enforced
            }
            Err(reason) if allow_unlimited => {
                tracing::warn!(%reason, "Disk limits off (--allow-unlimited-disk): disk_mb is not enforced");
                Limits::Off
            }
            Err(reason) => {
                tracing::error!(
                    %reason,
                    "Disk limits unavailable: sandboxes and builds will be refused (pass --allow-unlimited-disk \
                     to run them without)"
                );
                Limits::Unavailable(reason)
            }
        };
        Disk { root, limits }
    }

    /// For `details()` (served without authentication, so without the reason, which the log has):
    /// `btrfs-qgroups`, `off` or `unavailable`.
    pub fn describe(&self) -> &'static str {
        match &self.limits {
            Limits::Enforced => "btrfs-qgroups",
            Limits::Off => "off",
            Limits::Unavailable(_) => "unavailable",
        }
    }

    /// The layer directory of a sandbox or build (by its id's prefix).
    fn dir(&self, id: &str) -> PathBuf {
        let kind = if BuildId::is(id) { "builds" } else { "sandboxes" };
        self.root.join(kind).join(id)
    }

    /// A build's artifact: the upper layer its build container wrote, a lower layer of its sandboxes.
    pub fn artifact(&self, build_id: &str) -> PathBuf {
        self.root.join("artifacts").join(build_id).join("upper")
    }

    /// The ids of sandboxes that have a layer (one may outlive its bundle after a crash mid-removal).
    pub fn sandbox_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("sandboxes"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// The writable layer of `id`, bounded to `disk_mb`: created, or the one it already has (a build's steps and
    /// then its start contract run in one layer, one container after the other).
    pub async fn create(&self, id: &str, disk_mb: u64) -> Result<Layer, RuntimeError> {
        let dir = self.dir(id);
        let layer = Layer { upper: dir.join("upper"), work: dir.join("work") };
        if layer.upper.is_dir() && layer.work.is_dir() {
            return Ok(layer);
        }
        self.remove(id).await;
        let parent = dir.parent().expect("a layer has a parent");
        std::fs::create_dir_all(parent)
            .map_err(RuntimeError::io(format!("creating {}", parent.display())))?;
        match &self.limits {
            Limits::Unavailable(why) => {
                tracing::error!(%id, reason = %why, "Refusing to start without a disk limit");
                // The reason names host paths and tools' output: the log has it, not the message.
                return Err(RuntimeError::Failed(
                    "refusing to start without a disk limit: this host cannot enforce disk_mb (the server log \
                     says why; install btrfs-progs, see scripts/host-deps.sh, or run the server with \
                     --allow-unlimited-disk)"
                        .into(),
                ));
            }
            Limits::Off => {
                std::fs::create_dir(&dir).map_err(RuntimeError::io(format!("creating {}", dir.display())))?
            }
            Limits::Enforced => {
                btrfs::create_subvolume(&dir)
                    .map_err(RuntimeError::io(format!("creating the subvolume {}", dir.display())))?;
                btrfs::limit(&dir, disk_mb * 1024 * 1024)
                    .map_err(RuntimeError::io(format!("limiting the subvolume {}", dir.display())))?;
            }
        }
        for d in [&layer.upper, &layer.work] {
            std::fs::create_dir(d).map_err(RuntimeError::io(format!("creating {}", d.display())))?;
        }
        Ok(layer)
    }

    /// Removes the writable layer of `id` and everything in it (after its overlay is unmounted). Idempotent.
    pub async fn remove(&self, id: &str) {
        remove_layer(&self.dir(id)).await;
    }

    /// Makes the upper layer of build `build_id` its artifact (a rename: no copying).
    pub async fn seal(&self, build_id: &str) -> Result<(), RuntimeError> {
        let layer = self.dir(build_id);
        let artifact = self.root.join("artifacts").join(build_id);
        std::fs::create_dir_all(self.root.join("artifacts")).map_err(RuntimeError::io("artifacts dir"))?;
        remove_layer(&artifact).await;
        std::fs::rename(&layer, &artifact).map_err(RuntimeError::io("sealing the artifact"))?;
        let _ = std::fs::remove_dir_all(artifact.join("work"));
        Ok(())
    }

    /// Removes build `build_id`'s artifact. Idempotent.
    pub async fn remove_artifact(&self, build_id: &str) {
        remove_layer(&self.root.join("artifacts").join(build_id)).await;
    }
}

/// The three btrfs ioctls a layer needs (`linux/btrfs.h`), called directly: `btrfs subvolume create` and `btrfs
/// qgroup limit` as processes cost ≈ 7 ms of a 2-core host's CPU per sandbox, and a pool of 100 starts at once.
mod btrfs {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// `struct btrfs_ioctl_vol_args`.
    #[repr(C)]
    struct VolArgs {
        fd: i64,
        name: [u8; 4088],
    }

    /// `struct btrfs_ioctl_qgroup_limit_args`.
    #[repr(C)]
    struct QgroupLimitArgs {
        qgroupid: u64,
        flags: u64,
        max_rfer: u64,
        max_excl: u64,
        rsv_rfer: u64,
        rsv_excl: u64,
    }

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0x94 << 8) | nr
    }
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;
    const SUBVOL_CREATE: u64 = ioc(IOC_WRITE, 14, std::mem::size_of::<VolArgs>());
    const SNAP_DESTROY: u64 = ioc(IOC_WRITE, 15, std::mem::size_of::<VolArgs>());
    const QGROUP_LIMIT: u64 = ioc(IOC_READ, 43, std::mem::size_of::<QgroupLimitArgs>());
    const LIMIT_MAX_RFER: u64 = 1;

    /// Runs a vol-args ioctl (`request`) for `path`'s last component on its parent directory.
    fn on_parent(path: &Path, request: u64) -> std::io::Result<()> {
        let parent = File::open(path.parent().unwrap_or(Path::new("/")))?;
        let name = path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
        let mut args = VolArgs { fd: 0, name: [0; 4088] };
        if name.is_empty() || name.len() >= args.name.len() || CString::new(name).is_err() {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        args.name[..name.len()].copy_from_slice(name);
        // SAFETY: `args` is the struct this request reads, alive for the call; the descriptor is open.
        if unsafe { libc::ioctl(parent.as_raw_fd(), request as _, &mut args) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn create_subvolume(path: &Path) -> std::io::Result<()> {
        on_parent(path, SUBVOL_CREATE)
    }

    /// Deletes a subvolume and everything in it (its data is freed in the background).
    pub fn delete_subvolume(path: &Path) -> std::io::Result<()> {
        on_parent(path, SNAP_DESTROY)
    }

    /// Limits what the subvolume at `path` references (its qgroup, 0/<its id>) to `bytes`.
    pub fn limit(path: &Path, bytes: u64) -> std::io::Result<()> {
        let subvolume = File::open(path)?;
        let mut args = QgroupLimitArgs {
            qgroupid: 0, // the subvolume the descriptor is in
            flags: LIMIT_MAX_RFER,
            max_rfer: bytes,
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        };
        // SAFETY: `args` is the struct this request reads, alive for the call; the descriptor is open.
        if unsafe { libc::ioctl(subvolume.as_raw_fd(), QGROUP_LIMIT as _, &mut args) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        /// The request numbers of `linux/btrfs.h`.
        #[test]
        fn request_numbers_match_the_kernel_header() {
            assert_eq!(super::SUBVOL_CREATE, 0x5000_940e);
            assert_eq!(super::SNAP_DESTROY, 0x5000_940f);
            assert_eq!(super::QGROUP_LIMIT, 0x8030_942b);
        }
    }
}

/// Deletes a layer: a subvolume with `btrfs subvolume delete` (its data goes with it), a plain directory (limits
/// off, or a half-made layer) recursively.
async fn remove_layer(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return };
    // The root directory of a btrfs subvolume is always inode 256.
    if meta.ino() == 256 {
        match btrfs::delete_subvolume(dir) {
            Ok(()) => return,
            Err(err) => tracing::warn!(
                layer = %dir.display(), error = &err as &dyn std::error::Error, "Deleting a layer subvolume"
            ),
        }
    }
    if let Err(err) = std::fs::remove_dir_all(dir) {
        tracing::warn!(layer = %dir.display(), error = &err as &dyn std::error::Error, "Removing a layer");
    }
}

/// Mounts `<data_dir>/layers.img` at `root` with quotas on, creating the image the first time. Serialized across
/// servers sharing the data dir by a lock file.
fn mount_image(data_dir: &Path, root: &Path) -> Result<(), String> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("layers.lock"))
        .map_err(|e| format!("opening the layers lock: {e}"))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(format!("locking the layers lock: {}", std::io::Error::last_os_error()));
    }
    std::fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    if !is_mount_point(root) {
        let image = data_dir.join("layers.img");
        if !image.exists() {
            make_image(data_dir, &image)?;
        }
        let image_path = image.display().to_string();
        let root_path = root.display().to_string();
        let options = "loop,noatime,nosuid,nodev,discard=async";
        tool("mount", &["-t", "btrfs", "-o", options, &image_path, &root_path])?;
    }
    let root = root.display().to_string();
    tool("btrfs", &["quota", "enable", &root])?;
    // A deleted subvolume leaves its qgroup behind, empty and limiting nothing (ids are never reused): tidy up.
    if let Err(reason) = tool("btrfs", &["qgroup", "clear-stale", &root]) {
        tracing::warn!(%reason, "Clearing stale qgroups");
    }
    Ok(())
}

/// A sparse btrfs image as large as the data dir's free space minus the reserve.
fn make_image(data_dir: &Path, image: &Path) -> Result<(), String> {
    let (free, total) = free_space(data_dir).map_err(|e| format!("reading the free space: {e}"))?;
    let reserve = (total / 20).clamp(MIN_RESERVE, MAX_RESERVE);
    let size = free.saturating_sub(reserve) & !((1 << 20) - 1);
    if size < MIN_IMAGE {
        return Err(format!(
            "{} has {} MiB free, too little for sandbox layers beside a reserve of {} MiB",
            data_dir.display(),
            free >> 20,
            reserve >> 20
        ));
    }
    let staging = image.with_extension("img.new");
    let made = (|| {
        let file =
            std::fs::File::create(&staging).map_err(|e| format!("creating {}: {e}", staging.display()))?;
        file.set_len(size).map_err(|e| format!("sizing {}: {e}", staging.display()))?;
        tool("mkfs.btrfs", &["-q", "-f", &staging.display().to_string()])?;
        std::fs::rename(&staging, image).map_err(|e| format!("renaming {}: {e}", staging.display()))
    })();
    match &made {
        Ok(()) => {
            tracing::info!(image = %image.display(), size_mb = size >> 20, "Created the sandbox layers image")
        }
        Err(_) => {
            let _ = std::fs::remove_file(&staging);
        }
    }
    made
}

/// `(available, total)` bytes of the filesystem holding `dir`.
fn free_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes into a zeroed struct we own; `path` is NUL-terminated and outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Something is mounted at `path` (as `/proc/self/mountinfo` spells it: octal escapes for spaces).
fn is_mount_point(path: &Path) -> bool {
    let wanted = path.display().to_string().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Runs a setup tool (before the async runtime's work starts); an error names the tool and its stderr.
fn tool(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
}
