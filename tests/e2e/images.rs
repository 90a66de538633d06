//! A template `image` is the sandbox's base: a local OCI image layout, unpacked once with umoci. The test builds a
//! tiny image itself (busybox and the C libraries procd links against; no registry is reachable here).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::*;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Copies `file` (following symlinks) to the same path under `rootfs`.
fn copy_in(rootfs: &Path, file: &Path) {
    let target = rootfs.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap();
}

/// An OCI layout at `dir/layout` with the tag `tiny`: busybox as `/bin/sh` and friends, the libraries procd needs,
/// and an `/etc/os-release` to recognise it by.
fn tiny_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let (l, b) = (layout.to_str().unwrap(), bundle.to_str().unwrap());
    run("umoci", &["init", "--layout", l]);
    run("umoci", &["new", "--image", &format!("{l}:tiny")]);
    run("umoci", &["unpack", "--image", &format!("{l}:tiny"), b]);
    let rootfs = bundle.join("rootfs");
    let busybox = rootfs.join("bin/busybox");
    std::fs::create_dir_all(busybox.parent().unwrap()).unwrap();
    std::fs::copy("/bin/busybox", &busybox).unwrap();
    for applet in ["sh", "test", "touch", "sleep", "cat", "echo", "ls"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let ldd = Command::new("ldd").arg(warmpool_testkit::sibling_bin("procd")).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        copy_in(&rootfs, Path::new(lib));
    }
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/os-release"), "ID=warmpool-test-image\n").unwrap();
    run("umoci", &["repack", "--image", &format!("{l}:tiny"), b]);
    layout
}

#[tokio::test]
async fn a_template_image_is_the_sandbox_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let layout = tiny_image(&images);
    let server = ServerProcess::start(&data, &["--image-dir", images.to_str().unwrap()]);
    let c = server.client.clone();
    let mut spec = template("imaged", 0.0);
    spec.image = Some(format!("{}:tiny", layout.display()));
    spec.start_cmd = Some("touch ready-$WARMPOOL_SANDBOX_ID; exec sleep 100000".into());
    build(&c, &spec).await;
    let s = c.create_sandbox(&cold("imaged:stable")).await.unwrap();
    let r = sh(&c, &s.id, "cat /etc/os-release; cat built.txt").await;
    assert_eq!(r.stdout, "ID=warmpool-test-image\nbuilt\n", "{r:?}");
    let r = sh(&c, &s.id, "test -e /usr/bin/python3").await;
    assert_ne!(r.exit_code, 0, "the host's /usr is not part of an image's sandbox");
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&data);
}
