//! `TestControlPlane`: the server on a temp dir and an ephemeral port, handing back a typed client.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warmpool_api::*;
use warmpool_client::Client;
use warmpool_server::cli::serve::{build_app, ServeArgs};

pub struct TestControlPlane {
    pub client: Client,
    pub url: String,
    pub dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

/// The procd binary next to the test's `warmpool` binary, built if a narrow `cargo test` skipped it.
pub fn procd_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_warmpool")).with_file_name("procd");
    if !path.exists() {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-p", "warmpool-procd", "--bin", "procd"])
            .status()
            .expect("cargo build procd");
        assert!(status.success(), "building procd failed");
    }
    path
}

pub fn serve_args(dir: &Path) -> ServeArgs {
    ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        database: None,
        runtime: "local".into(),
        reconciler: "on".into(),
        procd: Some(procd_bin()),
        max_sandboxes: 256,
        max_parallel_starts: 16,
        no_isolation: false,
    }
}

impl TestControlPlane {
    pub async fn start() -> TestControlPlane {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServeArgs)) -> TestControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let mut args = serve_args(dir.path());
        f(&mut args);
        let app = build_app(&args).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = warmpool_server::http::router(app);
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let client = Client::new(&url, Some(token)).unwrap();
        TestControlPlane {
            client,
            url,
            dir,
            server,
        }
    }

    pub fn client_with(&self, token: Option<&str>) -> Client {
        Client::new(&self.url, token.map(str::to_string)).unwrap()
    }

    /// Creates the standard quick template (start_cmd writes a flag; readiness tests for it) and builds it,
    /// tagged `stable`.
    pub async fn ready_template(&self, name: &str) -> (Template, Build) {
        let t = self.client.create_template(&quick_template(name)).await.unwrap();
        let b = self.build(name, &["stable"]).await;
        assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
        (t, b)
    }

    pub async fn build(&self, name: &str, tags: &[&str]) -> Build {
        let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        let b = self.client.create_build(name, &tags).await.unwrap();
        self.client
            .wait_build(&b.id, Duration::from_secs(60), |_| {})
            .await
            .unwrap()
    }

    pub async fn wait_status(
        &self,
        pool: &str,
        what: &str,
        cond: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.client.pool_status(pool).await.unwrap();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "pool {pool} never reached {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// procd processes running for this control plane's data dir.
    pub fn procd_count(&self) -> usize {
        procs_mentioning(self.dir.path()).len()
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.server.abort();
        kill_all_under(self.dir.path());
    }
}

pub fn quick_template(name: &str) -> TemplateSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "build": {"steps": ["echo built > built.txt"], "env": {"ONLY_AT_BUILD": "1"}},
        "start_cmd": "touch ready.flag; exec sleep infinity",
        "readiness": {"exec": {"command": ["test", "-f", "ready.flag"]}, "timeout_ms": 10000},
        "env": {"MODE": "warm"}
    }))
    .unwrap()
}

/// Pids whose command line runs a procd config under `dir` (procd and its unshare wrapper).
pub fn procs_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'));
            !zombie
                && String::from_utf8_lossy(&cmd).contains(&needle)
                && String::from_utf8_lossy(&cmd).contains("procd.json")
        })
        .collect()
}

pub fn kill_all_under(dir: &Path) {
    for pid in procs_mentioning(dir) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    // Empty cgroups of sandboxes of this dir are removed by id.
    if let Ok(rd) = std::fs::read_dir(dir.join("sandboxes")) {
        for e in rd.flatten() {
            for c in ["memory", "cpu", "freezer"] {
                let _ = std::fs::remove_dir(
                    Path::new("/sys/fs/cgroup")
                        .join(c)
                        .join("warmpool")
                        .join(e.file_name()),
                );
            }
        }
    }
}

/// Waits until no procd runs under `dir`; on timeout names the ones left.
pub fn wait_no_procd(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !procs_mentioning(dir).is_empty() {
        if Instant::now() > deadline {
            let left: Vec<String> = procs_mentioning(dir)
                .iter()
                .map(|p| {
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                        .replace('\0', " ")
                })
                .collect();
            panic!("procd processes left: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every procd of a data dir when dropped (also when a test panics).
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
