//! Attacks on path resolution: every way out of the root a sandbox could plant or a caller could ask for.

use super::*;
use std::os::unix::fs::{symlink, PermissionsExt};

fn sandbox() -> (tempfile::TempDir, Root) {
    let dir = tempfile::tempdir().unwrap();
    for d in ["config", "procd/bin", "run/warmpool", "workspace"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    std::fs::write(dir.path().join("config/token"), "secret").unwrap();
    let root = Root::open(dir.path()).unwrap();
    (dir, root)
}

fn read(root: &Root, path: &str) -> Result<Vec<u8>> {
    let (mut f, _) = root.get_file(path)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    Ok(out)
}

#[test]
fn files_round_trip_and_parents_are_created() {
    let (dir, root) = sandbox();
    let (path, size, mode) = root.put_file("/workspace/a/b/../c.txt", Some(0o600), &b"hello"[..]).unwrap();
    assert_eq!((path.as_path(), size, mode), (Path::new("/workspace/a/c.txt"), 5, 0o600));
    assert_eq!(read(&root, "/workspace/a/c.txt").unwrap(), b"hello");
    let meta = std::fs::metadata(dir.path().join("workspace/a/c.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let items = root.list("/workspace/a").unwrap();
    assert_eq!(items.len(), 1, "no temporary file is left: {items:?}");
    assert_eq!((items[0].name.as_str(), items[0].kind, items[0].size), ("c.txt", "file", 5));
    assert!(matches!(root.get_file("/workspace/a"), Err(FilesError::IsDir(_))));
    assert!(matches!(root.get_file("/workspace/nope"), Err(FilesError::NotFound(_))));
    assert!(matches!(root.delete("/workspace/a", false), Err(FilesError::NotEmpty(_))));
    root.delete("/workspace/a", true).unwrap();
    assert!(!dir.path().join("workspace/a").exists());
}

#[test]
fn dot_dot_and_absolute_symlinks_stay_inside_the_root() {
    let (dir, root) = sandbox();
    // A sandbox plants links at the host's root and far above its own.
    symlink("/", dir.path().join("workspace/up")).unwrap();
    symlink("../../../../../../../..", dir.path().join("workspace/far")).unwrap();
    root.put_file("/workspace/up/tmp/x", None, &b"1"[..]).unwrap();
    assert!(dir.path().join("tmp/x").exists(), "the link led to the sandbox's own root");
    root.put_file("/workspace/far/tmp/y", None, &b"2"[..]).unwrap();
    assert!(dir.path().join("tmp/y").exists());
    root.put_file("/../../../../tmp/z", None, &b"3"[..]).unwrap();
    assert!(dir.path().join("tmp/z").exists());
    // Reading through them never reaches the host's files.
    assert!(matches!(read(&root, "/workspace/up/etc/hostname"), Err(FilesError::NotFound(_))));
    assert!(matches!(read(&root, "/workspace/far/etc/passwd"), Err(FilesError::NotFound(_))));
}

#[test]
fn reserved_paths_are_refused_by_name_and_through_links() {
    let (dir, root) = sandbox();
    symlink("/config", dir.path().join("workspace/cfg")).unwrap();
    symlink("../run/warmpool", dir.path().join("workspace/rw")).unwrap();
    symlink("/config/token", dir.path().join("workspace/token")).unwrap();
    for path in ["/config/token", "/config/../config/token", "/workspace/cfg/token", "/workspace/token"] {
        assert!(matches!(read(&root, path), Err(FilesError::Reserved(_))), "{path}");
    }
    for path in ["/config/x", "/procd/bin/procd", "/run/warmpool/x", "/workspace/cfg/x", "/workspace/rw/x"] {
        assert!(matches!(root.put_file(path, None, &b"x"[..]), Err(FilesError::Reserved(_))), "{path}");
    }
    assert!(!dir.path().join("config/x").exists() && !dir.path().join("run/warmpool/x").exists());
    assert!(matches!(root.list("/workspace/cfg"), Err(FilesError::Reserved(_))));
    assert!(matches!(root.delete("/config/token", false), Err(FilesError::Reserved(_))));
    assert!(matches!(root.delete("/run", true), Err(FilesError::Refused { .. })));
    assert!(matches!(root.packer("/workspace/cfg"), Err(FilesError::Reserved(_))));
    // Deleting the link deletes the link, not what it points at.
    root.delete("/workspace/token", false).unwrap();
    assert!(dir.path().join("config/token").exists());
    // Writing over a link replaces the link.
    symlink("/config/token", dir.path().join("workspace/token")).unwrap();
    assert!(
        root.put_file("/workspace/token", None, &b"mine"[..])
            .is_err_and(|e| matches!(e, FilesError::Reserved(_)))
            || std::fs::read(dir.path().join("config/token")).unwrap() == b"secret"
    );
    assert_eq!(std::fs::read(dir.path().join("config/token")).unwrap(), b"secret");
}

#[test]
fn magic_links_are_not_followed() {
    // procd's real root is `/`, where /proc is the kernel's.
    let root = Root::open("/").unwrap();
    for path in ["/proc/self/root/etc/hostname", "/proc/1/root/etc/hostname", "/proc/self/cwd"] {
        let err = root.get_file(path).unwrap_err();
        assert!(matches!(err, FilesError::Refused { .. }), "{path}: {err:?}");
    }
    assert!(root.list("/proc/self/root").is_err());
}

#[test]
fn archives_round_trip_with_links_modes_empty_dirs_and_odd_names() {
    let (dir, root) = sandbox();
    let src = dir.path().join("workspace/src");
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("deep/er")).unwrap();
    std::fs::write(src.join("deep/er/run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("deep/er/run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let odd = OsStr::from_bytes(b"caf\xe9 \xff.txt");
    std::fs::write(src.join(odd), "bytes").unwrap();
    symlink("deep/er/run.sh", src.join("link")).unwrap();
    symlink("/", src.join("to-root")).unwrap();
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let mut tar = Vec::new();
        root.packer("/workspace/src").unwrap().pack(compression, &mut tar).unwrap();
        let done = root.unpack("/workspace/dst", compression, tar.as_slice()).unwrap();
        assert_eq!(done.files, 4, "{compression:?}");
        let dst = dir.path().join("workspace/dst");
        assert!(dst.join("empty").is_dir());
        assert_eq!(std::fs::read(dst.join(odd)).unwrap(), b"bytes");
        assert_eq!(
            std::fs::metadata(dst.join("deep/er/run.sh")).unwrap().permissions().mode() & 0o777,
            0o750
        );
        assert_eq!(std::fs::read_link(dst.join("link")).unwrap(), Path::new("deep/er/run.sh"));
        assert_eq!(
            std::fs::read_link(dst.join("to-root")).unwrap().as_os_str(),
            "/",
            "link targets stay as written"
        );
        std::fs::remove_dir_all(&dst).unwrap();
    }
    // A single file packs under its own name.
    let mut tar = Vec::new();
    root.packer("/workspace/src/deep/er/run.sh").unwrap().pack(Compression::None, &mut tar).unwrap();
    root.unpack("/workspace/one", Compression::None, tar.as_slice()).unwrap();
    assert!(dir.path().join("workspace/one/run.sh").is_file());
    // An archive of the root leaves the reserved paths out.
    let mut tar = Vec::new();
    root.packer("/").unwrap().pack(Compression::None, &mut tar).unwrap();
    let names: Vec<String> = tar::Archive::new(tar.as_slice())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("workspace/src")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("config") || n.starts_with("run/warmpool")), "{names:?}");
}

fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                // Bypass the builder's own checks: a hostile archive is written by hand.
                h.set_link_name_literal(data).unwrap();
                let name = h.as_old_mut();
                name.name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                let name = h.as_old_mut();
                name.name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_archives_cannot_leave_the_directory_or_reach_reserved_paths() {
    let (dir, root) = sandbox();
    let dotdot = tar_of(&[("../../etc/evil", tar::EntryType::Regular, "x")]);
    assert!(matches!(
        root.unpack("/workspace", Compression::None, dotdot.as_slice()),
        Err(FilesError::BadEntry(_))
    ));
    // A link to the reserved path, then a file through it.
    let through = tar_of(&[
        ("cfg", tar::EntryType::Symlink, "/config"),
        ("cfg/token", tar::EntryType::Regular, "pwned"),
    ]);
    let err = root.unpack("/workspace", Compression::None, through.as_slice()).unwrap_err();
    assert!(matches!(err, FilesError::Reserved(_)), "{err:?}");
    assert_eq!(std::fs::read(dir.path().join("config/token")).unwrap(), b"secret");
    // A link to the root, then a file through it: lands in the sandbox's root, never the host's.
    let up =
        tar_of(&[("up", tar::EntryType::Symlink, "/"), ("up/tmp/planted", tar::EntryType::Regular, "x")]);
    root.unpack("/workspace", Compression::None, up.as_slice()).unwrap();
    assert!(dir.path().join("tmp/planted").exists());
    // A hard link to a reserved file.
    let hard = tar_of(&[("tok", tar::EntryType::Link, "../config/token")]);
    assert!(root.unpack("/workspace", Compression::None, hard.as_slice()).is_err());
    let hard = tar_of(&[("x/../../config/token", tar::EntryType::Regular, "x")]);
    assert!(root.unpack("/workspace", Compression::None, hard.as_slice()).is_err());
    assert!(matches!(root.unpack("/config", Compression::None, up.as_slice()), Err(FilesError::Reserved(_))));
}

/// A body that is not a tar stream is the client's mistake (`invalid_request` naming `body`), not procd's.
#[test]
fn an_empty_or_malformed_body_is_a_bad_archive() {
    let (_dir, root) = sandbox();
    for body in [&b""[..], b"[0]", &[7u8; 700][..]] {
        let err = root.unpack("/workspace", Compression::None, body).unwrap_err();
        assert!(matches!(err, FilesError::BadArchive(_)), "{body:?}: {err:?}");
    }
    let err = root.unpack("/workspace", Compression::Gzip, &b"not gzip at all"[..]).unwrap_err();
    assert!(matches!(err, FilesError::BadArchive(_)), "{err:?}");
}

#[test]
fn a_tree_nested_too_deep_is_refused_and_a_deep_one_is_not() {
    let (dir, root) = sandbox();
    assert!(TOO_DEEP.contains(&TREE_DEPTH_MAX.to_string()));
    let deep = |levels: usize| vec!["d"; levels].join("/");
    std::fs::create_dir_all(dir.path().join("workspace/ok").join(deep(100))).unwrap();
    std::fs::create_dir_all(dir.path().join("workspace/deep").join(deep(TREE_DEPTH_MAX + 10))).unwrap();

    let err = root.packer("/workspace/deep").unwrap().pack(Compression::None, io::sink()).unwrap_err();
    assert!(err.to_string().contains(TOO_DEEP), "{err}");
    assert!(matches!(
        root.delete("/workspace/deep", true),
        Err(FilesError::Refused { reason: TOO_DEEP, .. })
    ));

    root.packer("/workspace/ok").unwrap().pack(Compression::None, io::sink()).unwrap();
    root.delete("/workspace/ok", true).unwrap();
    assert!(!dir.path().join("workspace/ok").exists());
}
