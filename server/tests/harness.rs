//! `TestControlPlane`: the server on a temp dir and an ephemeral port, handing back a typed client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use warmpool_api::*;
use warmpool_client::Client;
use warmpool_server::cli::serve::{build_app, ServeArgs};

pub struct TestControlPlane {
    pub client: Client,
    pub url: String,
    pub dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

pub use warmpool_testkit::{
    kill_all_under, pool_spec, procd_pids, wait_no_procd, wait_until, KillOnDrop, ServerProcess,
};

pub fn procd_bin() -> PathBuf {
    warmpool_testkit::sibling_bin("procd")
}

/// `warmpool serve` arguments for a test server on `dir`: the flags' defaults (parsed by clap, so a new flag needs
/// no change here) but an ephemeral port and fewer parallel starts.
pub fn serve_args(dir: &Path) -> ServeArgs {
    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }
    let mut args = <Serve as clap::Parser>::parse_from(["serve", "--listen", "127.0.0.1:0"]).args;
    args.data_dir = dir.to_path_buf();
    args.procd = Some(procd_bin());
    args.max_parallel_starts = 16;
    args
}

impl TestControlPlane {
    pub async fn start() -> TestControlPlane {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServeArgs)) -> TestControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let mut args = serve_args(dir.path());
        f(&mut args);
        let (app, background) = build_app(&args).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = warmpool_server::http::router(app);
        let server = tokio::spawn(async move {
            let _background = background;
            axum::serve(listener, router).await.unwrap();
        });
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
        let client = Client::new(&url, Some(token)).unwrap();
        TestControlPlane { client, url, dir, server }
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
        self.client.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap()
    }

    pub async fn wait_status(
        &self,
        pool: &str,
        what: &str,
        cond: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        warmpool_testkit::wait_status(&self.client, pool, what, cond).await
    }

    /// procd processes running for this control plane's data dir.
    pub fn procd_count(&self) -> usize {
        procd_pids(self.dir.path()).len()
    }
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.server.abort();
        kill_all_under(self.dir.path());
    }
}

/// Runs `argv` in a sandbox through the API and returns its result.
pub async fn run(client: &Client, sandbox: &str, argv: &[&str]) -> ExecResult {
    let req = ExecRequest { command: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    client.exec(sandbox, &req).await.unwrap()
}

/// A cold create of `template`.
pub fn cold(template: &str) -> SandboxCreate {
    SandboxCreate { template: Some(template.into()), ..Default::default() }
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
