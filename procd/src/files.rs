//! Files and archives on behalf of the API, read and written by procd inside the sandbox: procd is the sandbox's
//! PID 1, so its own `/` is the sandbox's root, and every path is resolved from a descriptor of that root with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: `..` and symlinks (absolute ones too) stay inside the root,
//! and magic links (`/proc/1/root`, `/proc/self/fd/N`) are refused. Each operation then works on a directory
//! descriptor and one name (`*at` calls that follow nothing), so a sandbox swapping a directory for a symlink in
//! the meantime cannot redirect it. The directory a descriptor really is, read back from `/proc/self/fd`, decides
//! whether it is one of the reserved paths (`/config`, `/procd/bin`, `/run/warmpool`), which are refused, also when
//! a symlink leads there.
//!
//! This is the one place where paths are resolved on behalf of a sandbox's user; its tests attack it.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

/// Paths the API never reads or writes: procd's config and token, its binary, and the runtime's own directory.
pub const RESERVED: [&str; 3] = ["/config", "/procd/bin", "/run/warmpool"];

/// Kernel filesystems an archive of `/` leaves out.
const PSEUDO: [&str; 3] = ["/proc", "/sys", "/dev"];

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{0:?} must be absolute inside the sandbox")]
    NotAbsolute(String),
    #[error("{0:?} is reserved by the sandbox's runtime and cannot be read or written")]
    Reserved(String),
    #[error("{path:?} is refused: {reason}")]
    Refused { path: String, reason: &'static str },
    #[error("{0:?} does not exist in the sandbox")]
    NotFound(String),
    #[error("{0:?} is a directory")]
    IsDir(String),
    #[error("{0:?} is not a directory")]
    NotDir(String),
    #[error("directory {0:?} is not empty (delete it with recursive=true)")]
    NotEmpty(String),
    #[error("archive entry {0:?} would leave the directory it is unpacked under")]
    BadEntry(String),
    /// The body is not a tar stream (in the compression it names): the client's, not the sandbox's, fault.
    #[error("the body is not a readable tar stream: {0}")]
    BadArchive(String),
    #[error("no space left on the sandbox's disk")]
    NoSpace,
    #[error("{context} {path:?}")]
    Io {
        context: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FilesError {
    fn io<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FilesError + 'a {
        move |source| {
            let shown = path.to_string_lossy().into_owned();
            match source.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => FilesError::NoSpace,
                Some(libc::ENOENT) => FilesError::NotFound(shown),
                Some(libc::EISDIR) => FilesError::IsDir(shown),
                Some(libc::ENOTDIR) => FilesError::NotDir(shown),
                Some(libc::ENOTEMPTY) => FilesError::NotEmpty(shown),
                Some(libc::ELOOP) => FilesError::Refused {
                    path: shown,
                    reason: "it goes through a link procd does not follow",
                },
                Some(libc::EACCES | libc::EPERM) => {
                    FilesError::Refused { path: shown, reason: "permission denied" }
                }
                Some(libc::EROFS) => {
                    FilesError::Refused { path: shown, reason: "it is on a read-only filesystem" }
                }
                Some(libc::EXDEV) => {
                    FilesError::Refused { path: shown, reason: "it leaves the sandbox's root" }
                }
                _ => FilesError::Io { context, path: shown, source },
            }
        }
    }
}

type Result<T> = std::result::Result<T, FilesError>;

/// How a tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: &'static str,
    pub size: u64,
    pub mode: u32,
    pub modified_at_ms: i64,
}

/// What an unpacked archive wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// The sandbox's root, as procd sees it.
pub struct Root {
    fd: OwnedFd,
    /// The root's path in procd's own view (`/` in a sandbox; a directory in tests).
    prefix: PathBuf,
}

/// Makes `path` absolute and normal: `.` and empty components dropped, `..` applied lexically (never above `/`).
pub fn normalize(path: &str) -> Result<PathBuf> {
    if !path.starts_with('/') {
        return Err(FilesError::NotAbsolute(path.into()));
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

/// Whether `path` (absolute, normal) is a reserved path or below one.
pub fn is_reserved(path: &Path) -> bool {
    RESERVED.iter().any(|r| path.starts_with(r))
}

fn split(path: &Path) -> Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => {
            Err(FilesError::Refused { path: path.to_string_lossy().into(), reason: "it is the root itself" })
        }
    }
}

fn shown(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Root {
    /// The root at `prefix` (`/` for procd in a sandbox).
    pub fn open(prefix: impl Into<PathBuf>) -> io::Result<Root> {
        let prefix = prefix.into();
        let fd =
            rustix::fs::open(&prefix, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let prefix = std::fs::canonicalize(&prefix)?;
        Ok(Root { fd, prefix })
    }

    /// Opens `path` (absolute, normal) from the root, following symlinks inside it.
    fn open_at(&self, path: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(&self.fd, rel, flags | OFlags::CLOEXEC, mode, RESOLVE) {
                // The kernel asks for a retry when a rename raced with the resolution.
                Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Where a descriptor really is, as an absolute path inside the sandbox.
    fn real_path(&self, fd: &impl AsFd, asked: &Path) -> Result<PathBuf> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
            .map_err(FilesError::io("resolving", asked))?;
        let rel = link.strip_prefix(&self.prefix).map_err(|_| FilesError::Refused {
            path: shown(asked),
            reason: "it leaves the sandbox's root",
        })?;
        Ok(Path::new("/").join(rel))
    }

    /// Refuses a descriptor that is (below) a reserved path; answers its real path.
    fn check(&self, fd: &impl AsFd, asked: &Path) -> Result<PathBuf> {
        let real = self.real_path(fd, asked)?;
        if is_reserved(&real) {
            return Err(FilesError::Reserved(shown(asked)));
        }
        Ok(real)
    }

    /// The directory at `path`, created with its parents when `create` (each checked before anything is made in it).
    fn dir(&self, path: &Path, create: bool) -> Result<OwnedFd> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        match self.open_at(path, flags, Mode::empty()) {
            Ok(fd) => {
                self.check(&fd, path)?;
                return Ok(fd);
            }
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FilesError::io("opening", path)(e)),
        }
        let mut current = PathBuf::from("/");
        let mut fd = self.open_at(&current, flags, Mode::empty()).map_err(FilesError::io("opening", path))?;
        for c in path.components().skip(1) {
            let next = current.join(c);
            fd = match self.open_at(&next, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.check(&fd, path)?;
                    match rustix::fs::mkdirat(&fd, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(FilesError::io("creating", &next)(e.into())),
                    }
                    self.open_at(&next, flags, Mode::empty()).map_err(FilesError::io("opening", &next))?
                }
                Err(e) => return Err(FilesError::io("opening", &next)(e)),
            };
            current = next;
        }
        self.check(&fd, path)?;
        Ok(fd)
    }

    /// Refuses reserved paths by name, before anything is opened (a clear error for the obvious case).
    fn named(&self, path: &str) -> Result<PathBuf> {
        let path = normalize(path)?;
        if is_reserved(&path) {
            return Err(FilesError::Reserved(shown(&path)));
        }
        Ok(path)
    }

    /// Writes `data` to `path` (parents created), whole or not at all; answers its size and mode.
    pub fn put_file(&self, path: &str, mode: Option<u32>, data: impl Read) -> Result<(PathBuf, u64, u32)> {
        let path = self.named(path)?;
        let (parent, name) = split(&path)?;
        let dir = self.dir(parent, true)?;
        let mode = mode.unwrap_or(0o644) & 0o1777;
        let size = write_new(&dir, name, mode, None, data, &path)?;
        Ok((path, size, mode))
    }

    /// An open regular file at `path` (symlinks followed inside the root) and its size.
    pub fn get_file(&self, path: &str) -> Result<(File, u64)> {
        let path = self.named(path)?;
        let fd =
            self.open_at(&path, OFlags::RDONLY, Mode::empty()).map_err(FilesError::io("opening", &path))?;
        self.check(&fd, &path)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FilesError::io("reading", &path)(e.into()))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok((File::from(fd), st.st_size as u64)),
            FileType::Directory => Err(FilesError::IsDir(shown(&path))),
            _ => Err(FilesError::Refused { path: shown(&path), reason: "it is not a regular file" }),
        }
    }

    /// A directory's entries (or the one entry of a file), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        let path = self.named(path)?;
        let fd =
            self.open_at(&path, OFlags::RDONLY, Mode::empty()).map_err(FilesError::io("opening", &path))?;
        self.check(&fd, &path)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FilesError::io("reading", &path)(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            return Ok(vec![entry(name, &st)]);
        }
        let mut items = Vec::new();
        let dir = rustix::fs::Dir::read_from(&fd).map_err(|e| FilesError::io("listing", &path)(e.into()))?;
        for item in dir {
            let item = item.map_err(|e| FilesError::io("listing", &path)(e.into()))?;
            let name = item.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&fd, item.file_name(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            items.push(entry(String::from_utf8_lossy(name).into_owned(), &st));
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(items)
    }

    /// Deletes a file, a symlink, an empty directory, or with `recursive` a whole tree.
    pub fn delete(&self, path: &str, recursive: bool) -> Result<()> {
        let path = self.named(path)?;
        if RESERVED.iter().any(|r| Path::new(r).starts_with(&path)) {
            return Err(FilesError::Refused { path: shown(&path), reason: "it holds a reserved path" });
        }
        let (parent, name) = split(&path)?;
        let dir = self.dir(parent, false)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| FilesError::io("deleting", &path)(e.into()))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            if recursive {
                let real = self.check(&dir, parent)?.join(name);
                remove_tree(&dir, name, &real, &path, 0)?;
            } else {
                rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)
                    .map_err(|e| FilesError::io("deleting", &path)(e.into()))?;
            }
        } else {
            rustix::fs::unlinkat(&dir, name, AtFlags::empty())
                .map_err(|e| FilesError::io("deleting", &path)(e.into()))?;
        }
        Ok(())
    }

    /// Checks that `path` can be packed and opens it; [`Packer::pack`] then writes the tar.
    pub fn packer(&self, path: &str) -> Result<Packer> {
        let path = self.named(path)?;
        let fd =
            self.open_at(&path, OFlags::RDONLY, Mode::empty()).map_err(FilesError::io("opening", &path))?;
        let real = self.check(&fd, &path)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| FilesError::io("reading", &path)(e.into()))?;
        Ok(Packer { fd, st, real, path })
    }

    /// Unpacks a tar stream under `dir` (created if missing). Entries may not leave `dir`; regular files are
    /// written whole or not at all; setuid and setgid bits are dropped; ownership is procd's.
    pub fn unpack(&self, dir: &str, compression: Compression, input: impl Read) -> Result<Unpacked> {
        let base = self.named(dir)?;
        // An empty body is a client's mistake, not an empty archive (which is 1 KiB of end-of-archive blocks).
        let mut input = std::io::BufReader::new(input);
        if std::io::BufRead::fill_buf(&mut input)
            .map_err(FilesError::io("reading the archive for", &base))?
            .is_empty()
        {
            return Err(FilesError::BadArchive("the body is empty".into()));
        }
        self.dir(&base, true)?;
        let input: Box<dyn Read> = match compression {
            Compression::None => Box::new(input),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
            Compression::Zstd => Box::new(zstd::Decoder::new(input).map_err(|e| FilesError::Io {
                context: "reading the archive",
                path: shown(&base),
                source: e,
            })?),
        };
        // An error without an errno is the stream's own (truncated, not tar, bad compression).
        let archive_err = |source: io::Error| match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => FilesError::NoSpace,
            None => FilesError::BadArchive(source.to_string()),
            _ => FilesError::Io { context: "reading the archive for", path: shown(&base), source },
        };
        let mut archive = tar::Archive::new(input);
        let mut done = Unpacked::default();
        // The directory of the previous entry: archives list a directory's files together.
        let mut last: Option<(PathBuf, OwnedFd)> = None;
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            let raw = entry.path_bytes().into_owned();
            let rel = entry_path(&raw)?;
            if rel.as_os_str().is_empty() {
                continue;
            }
            let target = base.join(&rel);
            if is_reserved(&target) {
                return Err(FilesError::Reserved(shown(&target)));
            }
            let (parent, name) = split(&target)?;
            let dir = match last.take() {
                Some((p, fd)) if p == parent => fd,
                _ => self.dir(parent, true)?,
            };
            let header = entry.header();
            let mode = header.mode().unwrap_or(0o644) & 0o1777;
            let mtime = header.mtime().ok();
            match header.entry_type() {
                tar::EntryType::Directory => {
                    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode | 0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(FilesError::io("creating", &target)(e.into())),
                    }
                    let sub = rustix::fs::openat(
                        &dir,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| FilesError::io("opening", &target)(e.into()))?;
                    let _ = rustix::fs::fchmod(&sub, Mode::from_raw_mode(mode));
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.header().size().unwrap_or(0);
                    done.bytes += write_entry(&dir, name, mode, mtime, size, &mut entry, &target)?;
                    done.files += 1;
                }
                tar::EntryType::Symlink => {
                    let link = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                    remove_existing(&dir, name, &target)?;
                    rustix::fs::symlinkat(OsStr::from_bytes(&link), &dir, name)
                        .map_err(|e| FilesError::io("linking", &target)(e.into()))?;
                    done.files += 1;
                }
                tar::EntryType::Link => {
                    let link = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                    let source = base.join(entry_path(&link)?);
                    let (source_parent, source_name) = split(&source)?;
                    let source_dir = self.dir(source_parent, false)?;
                    remove_existing(&dir, name, &target)?;
                    rustix::fs::linkat(&source_dir, source_name, &dir, name, AtFlags::empty())
                        .map_err(|e| FilesError::io("linking", &target)(e.into()))?;
                    done.files += 1;
                }
                // Devices, fifos and the like are not made on behalf of the API.
                _ => {}
            }
            last = Some((parent.to_path_buf(), dir));
        }
        Ok(done)
    }
}

/// An archive entry's path, relative and without `..` (a leading `/` or `./` is dropped, as tar does).
fn entry_path(raw: &[u8]) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(name) => rel.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(FilesError::BadEntry(String::from_utf8_lossy(raw).into_owned()))
            }
        }
    }
    Ok(rel)
}

fn entry(name: String, st: &rustix::fs::Stat) -> Entry {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        _ => "other",
    };
    Entry {
        name,
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        modified_at_ms: st.st_mtime.saturating_mul(1000).saturating_add(st.st_mtime_nsec as i64 / 1_000_000),
    }
}

/// Removes whatever is at `name` in `dir` (a file or a symlink; an empty directory), so a link can take its place.
fn remove_existing(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR) => rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
            .map_err(|e| FilesError::io("replacing", path)(e.into())),
        Err(e) => Err(FilesError::io("replacing", path)(e.into())),
    }
}

/// Writes `data` to a new file beside `name` in `dir`, then renames it over `name`: readers see the old file or
/// the whole new one, and a failed write leaves nothing behind.
fn write_new(
    dir: &OwnedFd,
    name: &OsStr,
    mode: u32,
    mtime: Option<u64>,
    mut data: impl Read,
    path: &Path,
) -> Result<u64> {
    use rand::Rng;
    let mut tmp = b".".to_vec();
    tmp.extend_from_slice(&name.as_bytes()[..name.len().min(200)]);
    tmp.extend_from_slice(format!(".warmpool-{:08x}", rand::thread_rng().gen::<u32>()).as_bytes());
    let tmp = OsStr::from_bytes(&tmp);
    let fd = rustix::fs::openat(
        dir,
        tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| FilesError::io("creating", path)(e.into()))?;
    let mut file = File::from(fd);
    let written = (|| -> Result<u64> {
        let size = copy(&mut data, &mut file).map_err(FilesError::io("writing", path))?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
            .map_err(|e| FilesError::io("writing", path)(e.into()))?;
        if let Some(mtime) = mtime {
            let t = Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
            let _ = rustix::fs::futimens(&file, &Timestamps { last_access: t, last_modification: t });
        }
        match rustix::fs::renameat(dir, tmp, dir, name) {
            Ok(()) => Ok(size),
            Err(rustix::io::Errno::ISDIR | rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
                Err(FilesError::IsDir(shown(path)))
            }
            Err(e) => Err(FilesError::io("writing", path)(e.into())),
        }
    })();
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
    }
    written
}

/// An archive entry's file, written in place as `tar x` does (an archive is not atomic as a whole): whatever was
/// at `name` is removed first, and the new file is created exclusively, never through a link.
fn write_entry(
    dir: &OwnedFd,
    name: &OsStr,
    mode: u32,
    mtime: Option<u64>,
    size: u64,
    data: &mut impl Read,
    path: &Path,
) -> Result<u64> {
    remove_existing(dir, name, path)?;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| FilesError::io("creating", path)(e.into()))?;
    let mut file = File::from(fd);
    let written = (|| -> Result<u64> {
        let n = copy_with(data, &mut file, size as usize).map_err(FilesError::io("writing", path))?;
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))
            .map_err(|e| FilesError::io("writing", path)(e.into()))?;
        if let Some(mtime) = mtime {
            let t = Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
            let _ = rustix::fs::futimens(&file, &Timestamps { last_access: t, last_modification: t });
        }
        Ok(n)
    })();
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    written
}

/// `io::copy` that keeps the error of the side that failed (a reader's error is the client's stream ending).
fn copy(from: &mut impl Read, to: &mut File) -> io::Result<u64> {
    copy_with(from, to, 256 * 1024)
}

/// [`copy`] through a buffer of `size` bytes (small files need no large, zeroed buffer each).
fn copy_with(from: &mut impl Read, to: &mut File, size: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; size.clamp(1, 256 * 1024)];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// How deep a recursive delete or an archive goes, at most: each level holds a descriptor and a stack frame, and a
/// sandbox can nest directories far deeper than any path names them.
const TREE_DEPTH_MAX: usize = 512;
const TOO_DEEP: &str = "holds directories nested more than 512 deep";

/// Removes the directory `name` in `dir` and everything below it, never following a symlink, never into a
/// reserved path (`real` is where it is inside the sandbox).
fn remove_tree(dir: &OwnedFd, name: &OsStr, real: &Path, path: &Path, depth: usize) -> Result<()> {
    if is_reserved(real) {
        return Err(FilesError::Reserved(shown(path)));
    }
    if depth > TREE_DEPTH_MAX {
        return Err(FilesError::Refused { path: shown(path), reason: TOO_DEEP });
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FilesError::io("deleting", path)(e.into()))?;
    let items = rustix::fs::Dir::read_from(&sub).map_err(|e| FilesError::io("listing", path)(e.into()))?;
    let mut names = Vec::new();
    for item in items {
        let item = item.map_err(|e| FilesError::io("listing", path)(e.into()))?;
        let n = item.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push((n.to_vec(), item.file_type() == FileType::Directory));
        }
    }
    for (n, is_dir) in names {
        let child = OsStr::from_bytes(&n);
        if is_dir {
            remove_tree(&sub, child, &real.join(child), &path.join(child), depth + 1)?;
        } else {
            rustix::fs::unlinkat(&sub, child, AtFlags::empty())
                .map_err(|e| FilesError::io("deleting", &path.join(child))(e.into()))?;
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        .map_err(|e| FilesError::io("deleting", path)(e.into()))
}

/// A checked, opened path to pack as a tar stream.
pub struct Packer {
    fd: OwnedFd,
    st: rustix::fs::Stat,
    real: PathBuf,
    path: PathBuf,
}

impl Packer {
    /// Writes the tar: a directory's contents (entries relative to it, like `tar -C DIR .`), or one file under its
    /// own name. Symlinks are kept as links; reserved paths and `/proc`, `/sys`, `/dev` are left out.
    pub fn pack(self, compression: Compression, out: impl Write) -> io::Result<()> {
        match compression {
            Compression::None => self.pack_to(out).and_then(|mut w| w.flush()),
            Compression::Gzip => self
                .pack_to(flate2::write::GzEncoder::new(out, flate2::Compression::fast()))?
                .finish()?
                .flush(),
            Compression::Zstd => self.pack_to(zstd::Encoder::new(out, 3)?)?.finish()?.flush(),
        }
    }

    fn pack_to<W: Write>(self, out: W) -> io::Result<W> {
        let mut tar = tar::Builder::new(out);
        if FileType::from_raw_mode(self.st.st_mode) == FileType::Directory {
            walk(&mut tar, &self.fd, Path::new(""), &self.real, 0)?;
        } else {
            let name = self.path.file_name().unwrap_or(OsStr::new("file")).to_owned();
            let mut header = header(&self.st, tar::EntryType::Regular);
            tar.append_data(&mut header, Path::new(&name), File::from(self.fd))?;
        }
        tar.into_inner()
    }
}

fn header(st: &rustix::fs::Stat, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_uid(st.st_uid.into());
    h.set_gid(st.st_gid.into());
    h.set_size(if kind == tar::EntryType::Regular { st.st_size as u64 } else { 0 });
    h
}

fn walk<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &OwnedFd,
    rel: &Path,
    real: &Path,
    depth: usize,
) -> io::Result<()> {
    if depth > TREE_DEPTH_MAX {
        return Err(io::Error::other(format!("{} {TOO_DEEP}", real.display())));
    }
    let mut names = Vec::new();
    for item in rustix::fs::Dir::read_from(dir)? {
        let n = item?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    names.sort();
    for n in names {
        let name = OsStr::from_bytes(&n);
        let child_real = real.join(name);
        if is_reserved(&child_real) || PSEUDO.iter().any(|p| child_real == Path::new(p)) {
            continue;
        }
        let child = rel.join(name);
        // Gone since it was listed: nothing to pack.
        let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else { continue };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let sub = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                tar.append_data(&mut header(&st, tar::EntryType::Directory), &child, io::empty())?;
                walk(tar, &sub, &child, &child_real, depth + 1)?;
            }
            FileType::RegularFile => {
                let fd = rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                // The size the header announces is what is sent, even if the file changes meanwhile.
                let file = File::from(fd).take(st.st_size as u64);
                let mut h = header(&st, tar::EntryType::Regular);
                tar.append_data(&mut h, &child, Padded { inner: file, left: st.st_size as u64 })?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
                let mut h = header(&st, tar::EntryType::Symlink);
                let target = target.as_bytes();
                if target.len() <= 100 {
                    // As written: the tar crate's own setter rewrites some targets (`/` becomes `//`).
                    h.set_link_name_literal(target)?;
                    tar.append_data(&mut h, &child, io::empty())?;
                } else {
                    tar.append_link(&mut h, &child, Path::new(OsStr::from_bytes(target)))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A reader of exactly `left` bytes: zeros after the end of a file that shrank while it was packed.
struct Padded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Padded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let n = match self.inner.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// A `Read` of the chunks an async task receives (a client stream), for the blocking thread that writes them.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        ChannelReader { rx, buf: Vec::new(), at: 0 }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.buf = chunk;
                    self.at = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
