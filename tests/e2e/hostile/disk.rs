//! Resource exhaustion on the local runtime: a sandbox that writes without end hits its own `disk_mb` while other
//! sandboxes and the control plane keep writing; a template that names no memory limit gets the default one.

use std::path::Path;

use warmpool_api::*;
use warmpool_testkit::TempServer;

use crate::*;

/// A template like `template(name, 0)` with `disk_mb` (none: the default).
fn with_disk(name: &str, disk_mb: Option<u64>) -> TemplateSpec {
    let mut spec = template(name, 0.0);
    spec.resources.disk_mb = disk_mb;
    spec
}

#[tokio::test]
async fn a_sandbox_that_fills_its_disk_stops_at_its_limit_and_nobody_else_notices() {
    let server = TempServer::start(&[]);
    let c = &server.client;
    build(c, &with_disk("small", Some(64))).await;
    build(c, &with_disk("roomy", None)).await;
    let hog = c.create_sandbox(&cold("small:stable")).await.unwrap();
    let other = c.create_sandbox(&cold("roomy:stable")).await.unwrap();
    // The build's artifact is the sandbox's lower layer, on the same filesystem as its limited upper layer.
    assert_eq!(sh(c, &hog.id, "cat /workspace/built.txt").await.stdout.trim(), "built");

    let r = sh(c, &hog.id, "dd if=/dev/zero of=/workspace/fill bs=1M count=200 conv=fsync 2>&1").await;
    assert_ne!(r.exit_code, 0, "200 MB fit in a 64 MB sandbox: {}", r.stdout);
    // btrfs qgroups answer EDQUOT where XFS project quotas answer ENOSPC (see runtime/local/disk.rs).
    assert!(
        r.stdout.contains("Disk quota exceeded") || r.stdout.contains("No space left"),
        "dd did not fail for lack of space: {}",
        r.stdout
    );
    let written: u64 = sh(c, &hog.id, "du -m /workspace/fill | cut -f1").await.stdout.trim().parse().unwrap();
    assert!(written <= 64, "the sandbox wrote {written} MB past its 64 MB limit");
    // Still full: a new file cannot grow either.
    let r = sh(c, &hog.id, "dd if=/dev/zero of=/workspace/more bs=1M count=8 conv=fsync 2>&1").await;
    assert_ne!(r.exit_code, 0, "a full sandbox wrote 8 MB more: {}", r.stdout);

    // Another sandbox writes more than the first one could.
    let r = sh(c, &other.id, "dd if=/dev/zero of=/workspace/data bs=1M count=100 conv=fsync 2>&1").await;
    assert_eq!(r.exit_code, 0, "the other sandbox cannot write: {}", r.stdout);
    // The control plane writes to its database and starts new sandboxes.
    build(c, &with_disk("after", None)).await;
    let fresh = c.create_sandbox(&cold("after:stable")).await.unwrap();
    assert_eq!(sh(c, &fresh.id, "echo hi > /workspace/x && cat /workspace/x").await.stdout.trim(), "hi");

    // Deleting the hog gives its space back: its layer is gone with its limit.
    let layer = server.data_dir.canonicalize().unwrap().join("layers/sandboxes").join(&hog.id);
    assert!(layer.exists(), "{} is not where layers live", layer.display());
    c.delete_sandbox(&hog.id).await.unwrap();
    assert!(!layer.exists(), "the deleted sandbox's layer is left");
    for s in [other, fresh] {
        c.delete_sandbox(&s.id).await.unwrap();
    }
    wait_no_procd(&server.data_dir);
}

#[tokio::test]
async fn a_template_without_memory_mb_gets_the_default_memory_limit() {
    let server = TempServer::start(&[]);
    let c = &server.client;
    build(c, &template("plain", 0.0)).await;
    let s = c.create_sandbox(&cold("plain:stable")).await.unwrap();
    let limit = Path::new("/sys/fs/cgroup/memory/warmpool").join(&s.id).join("memory.limit_in_bytes");
    let limit = std::fs::read_to_string(&limit).unwrap();
    assert_eq!(limit.trim(), (Resources::DEFAULT_MEMORY_MB << 20).to_string());
    assert_eq!(Resources::DEFAULT_MEMORY_MB, 1024);
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&server.data_dir);
}
