//! The domain on the simulated runtime: checkouts, pools, rollouts, leases, the breaker, recovery and races,
//! through the real HTTP API and a real SQLite file, with sandboxes that start in milliseconds. No root, no runc:
//! these run anywhere, in seconds.

mod autoscale;
mod checkouts;
mod pools;
mod recovery;

use std::sync::Arc;
use std::time::Duration;

use warmpool_api::*;
use warmpool_client::Client;
use warmpool_server::app::{App, AppConfig, Background};
use warmpool_server::runtime::sim::{Script, SimRuntime};
use warmpool_server::store::Store;

/// A control plane on the simulated runtime: the API on an ephemeral port, over a store of its own.
pub struct SimPlane {
    pub client: Client,
    pub sim: Arc<SimRuntime>,
    pub store: Arc<dyn Store>,
    pub dir: Arc<tempfile::TempDir>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for SimPlane {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SimPlane {
    pub async fn start() -> SimPlane {
        Self::start_with_capacity(1000).await
    }

    /// A control plane whose host takes at most `capacity` sandboxes.
    pub async fn start_with_capacity(capacity: usize) -> SimPlane {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let store = warmpool_server::store::open(None, &dir.path().join("warmpool.db")).await.unwrap();
        let (exits_tx, exits) = tokio::sync::mpsc::unbounded_channel();
        let sim = SimRuntime::new(capacity, exits_tx);
        Self::serve(dir, store, sim, exits).await
    }

    /// Another control plane over the same data dir and store (a restart), with `sim` carried over when the
    /// sandboxes outlived the old process (they do on the real runtimes) or a new, empty runtime otherwise.
    pub async fn restart(self, keep_sandboxes: bool) -> SimPlane {
        let (dir, store) = (self.dir.clone(), self.store.clone());
        let sim = keep_sandboxes.then(|| self.sim.clone());
        drop(self);
        Self::start_on(dir, store, sim).await
    }

    pub async fn start_on(
        dir: Arc<tempfile::TempDir>,
        store: Arc<dyn Store>,
        sim: Option<Arc<SimRuntime>>,
    ) -> SimPlane {
        let (exits_tx, exits) = tokio::sync::mpsc::unbounded_channel();
        let sim = match sim {
            Some(sim) => {
                sim.report_exits_to(exits_tx);
                sim
            }
            None => SimRuntime::new(1000, exits_tx),
        };
        Self::serve(dir, store, sim, exits).await
    }

    async fn serve(
        dir: Arc<tempfile::TempDir>,
        store: Arc<dyn Store>,
        sim: Arc<SimRuntime>,
        exits: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> SimPlane {
        let secrets = Arc::new(
            warmpool_server::secrets::Secrets::load_or_create(&dir.path().join("secret.key")).unwrap(),
        );
        let config = AppConfig {
            data_dir: dir.path().to_path_buf(),
            reconciler_enabled: true,
            max_parallel_starts: 16,
            max_parallel_builds: 2,
            default_quotas: Quotas { max_sandboxes: Some(1000), max_warm_sandboxes: Some(1000) },
            images: warmpool_server::images::ImagePolicy {
                allowed_registries: Vec::new(),
                image_dir: dir.path().join("layouts"),
            },
            oidc: Default::default(),
            max_upload_bytes: warmpool_api::MAX_UPLOAD_BYTES_DEFAULT,
        };
        let app = App::new(store.clone(), sim.clone(), secrets, config);
        app.bootstrap_admin().await.unwrap();
        let background: Background = app.start(exits).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = warmpool_server::http::router(app.clone());
        let server = tokio::spawn(async move {
            let _background = background;
            axum::serve(listener, router).await.unwrap();
        });
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
        let client = Client::new(&url, Some(token)).unwrap();
        SimPlane { client, sim, store, dir, server }
    }

    /// A template named `name` (its sandboxes follow `script`), built and tagged `stable`.
    pub async fn template(&self, name: &str, script: Script) -> Build {
        self.sim.script(name, script);
        let spec = TemplateSpec { name: name.into(), start_cmd: Some("serve".into()), ..Default::default() };
        self.client.create_template(&spec).await.unwrap();
        self.build(name).await
    }

    pub async fn build(&self, name: &str) -> Build {
        let b = self.client.create_build(name, &["stable".to_string()]).await.unwrap();
        let b = self.client.wait_build(&b.id, Duration::from_secs(10), |_| {}).await.unwrap();
        assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
        b
    }

    pub async fn pool(&self, name: &str, template: &str, min: u32, max: u32) -> WarmPool {
        let spec = WarmPoolSpec {
            name: name.into(),
            template: template.into(),
            min_ready: min,
            max_ready: max,
            ..Default::default()
        };
        self.client.create_pool(&spec).await.unwrap()
    }

    pub async fn wait_status(
        &self,
        pool: &str,
        what: &str,
        cond: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        warmpool_testkit::wait_status(&self.client, pool, what, cond).await
    }

    /// The pool's sandboxes that are ready to be checked out (from the store, as the claim sees them).
    pub async fn ready_ids(&self, pool: &str) -> Vec<String> {
        self.store
            .list_pool_sandboxes(pool)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.lifecycle == warmpool_server::store::Lifecycle::Ready)
            .map(|r| r.sandbox.id.into())
            .collect()
    }
}

pub fn checkout(pool: &str, mode: CheckoutMode, wait_ms: u64) -> SandboxCreate {
    SandboxCreate {
        warm_pool: Some(pool.into()),
        warm_pool_mode: Some(mode),
        warm_pool_wait_ms: Some(wait_ms),
        ..Default::default()
    }
}

/// A script whose sandboxes are ready `ms` milliseconds after they start.
pub fn ready_after(ms: u64) -> Script {
    Script { ready_after: Some(Duration::from_millis(ms)), ..Default::default() }
}

/// The API error's status, code and details.
pub fn api_error(err: warmpool_client::Error) -> (u16, String, serde_json::Value) {
    match err {
        warmpool_client::Error::Api { status, code, details, .. } => (status, code, details),
        other => panic!("not an API error: {other}"),
    }
}
