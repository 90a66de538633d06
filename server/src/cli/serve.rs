//! `warmpool serve`: opens the store, starts the runtime, recovers sandboxes from an earlier run, starts the
//! reconciler and serves the API until SIGTERM/SIGINT. Sandboxes keep running across a restart and are re-adopted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::app::{App, AppConfig};
use crate::runtime::kubernetes::{self, KubernetesRuntime};
use crate::runtime::local::LocalRuntime;
use crate::runtime::Runtime;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address the HTTP API listens on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Directory for the database, the admin token, the secret key, builds and sandboxes.
    #[arg(long, env = "WARMPOOL_DATA_DIR", default_value = ".warmpool")]
    pub data_dir: PathBuf,
    /// `sqlite:PATH` (default: `<data-dir>/warmpool.db`), or `postgres://user@host:port/db` for several replicas
    /// sharing one state (on one host they share the data dir too).
    #[arg(long, env = "WARMPOOL_DATABASE")]
    pub database: Option<String>,
    /// Where sandboxes run: `local` runs each as an OCI container (runc) on this host, `kubernetes` as a pod.
    #[arg(long, default_value = "local", value_parser = ["local", "kubernetes"])]
    pub runtime: String,
    /// kubernetes: the namespace sandbox pods run in (default: the kubeconfig context's, or this pod's own).
    #[arg(long, env = "WARMPOOL_NAMESPACE")]
    pub namespace: Option<String>,
    /// kubernetes: a kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// kubernetes: the `warmpool` image, whose init containers put procd into every pod (and the image of
    /// templates without one).
    #[arg(long, env = "WARMPOOL_IMAGE", default_value = "ghcr.io/warmpool/warmpool:latest")]
    pub image: String,
    /// kubernetes: this server's URL as sandbox pods reach it, to download build artifacts (default: http://LISTEN).
    #[arg(long, env = "WARMPOOL_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// `off` runs no reconciler (pools report `controller_disabled`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub reconciler: String,
    /// The procd binary (default: next to this binary, then PATH).
    #[arg(long, env = "WARMPOOL_PROCD")]
    pub procd: Option<PathBuf>,
    /// Sandboxes this host runs at once (beyond it pools report `no_eligible_hosts`).
    #[arg(long, default_value_t = 256)]
    pub max_sandboxes: usize,
    /// Sandboxes started at once by the reconciler (most of a start is waiting for readiness).
    #[arg(long, default_value_t = 100)]
    pub max_parallel_starts: usize,
    /// local: the bound of each sandbox's log file and its rotation together, in bytes (procd's mirrored output;
    /// at least 64 KiB).
    #[arg(long, default_value_t = crate::runtime::local::logs::DEFAULT_LOG_BYTES,
        value_parser = clap::value_parser!(u64).range(64 * 1024..))]
    pub sandbox_log_bytes: u64,
}

fn find_procd(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("procd");
    if sibling.exists() {
        return Ok(sibling);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("procd")).find(|p| p.exists()))
        .context("cannot find the procd binary: build it (cargo build) or pass --procd")
}

/// Builds the app for these arguments (also used by the tests' in-process server).
pub async fn build_app(args: &ServeArgs) -> anyhow::Result<Arc<App>> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    // The data dir holds the database, the admin token and the secret key: the owner's only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", data_dir.display()))?;
    let secret_path = data_dir.join("secret.key");
    let secrets = Arc::new(
        crate::secrets::Secrets::load_or_create(&secret_path)
            .with_context(|| format!("reading {}", secret_path.display()))?,
    );
    let default_db = data_dir.join("warmpool.db");
    let store = crate::store::open(args.database.as_deref(), &default_db).with_context(|| {
        format!(
            "opening the database {}",
            args.database.as_deref().unwrap_or(&default_db.display().to_string())
        )
    })?;
    let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime: Arc<dyn Runtime> = match args.runtime.as_str() {
        "kubernetes" => {
            let options = kubernetes::Options {
                namespace: args.namespace.clone(),
                kubeconfig: args.kubeconfig.clone(),
                image: args.image.clone(),
                advertise_url: args
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}", args.listen)),
                data_dir: data_dir.clone(),
                max_sandboxes: args.max_sandboxes,
            };
            let (client, namespace) = kubernetes::connect(&options).await?;
            KubernetesRuntime::new(client, namespace, &options, exits_tx, secrets.clone()).await?
        }
        _ => LocalRuntime::new(
            data_dir.clone(),
            find_procd(args.procd.clone())?,
            args.max_sandboxes,
            args.sandbox_log_bytes,
            exits_tx,
            secrets.clone(),
        )?,
    };
    let config = AppConfig {
        data_dir,
        reconciler_enabled: args.reconciler == "on",
        max_parallel_starts: args.max_parallel_starts,
        max_parallel_builds: 2,
    };
    let app = App::new(store, runtime, secrets, config);
    let token_path = app.bootstrap_admin()?;
    tracing::info!(path = %token_path.display(), "Admin token");
    app.join_cluster()?;
    app.recover().await?;
    tokio::spawn(app.clone().balance());
    tokio::spawn(app.clone().watch_exits(exits_rx));
    tokio::spawn(app.clone().enforce_timeouts());
    if app.config.reconciler_enabled {
        tokio::spawn(app.clone().run_reconciler());
    }
    Ok(app)
}

pub async fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    // Pods download artifacts from the address actually bound (port 0 picks one) unless told otherwise.
    args.advertise_url.get_or_insert_with(|| format!("http://{}", listener.local_addr().expect("bound")));
    let app = build_app(&args).await?;
    eprintln!(
        "warmpool serving on http://{} (data dir {}, admin token in {})",
        listener.local_addr()?,
        app.config.data_dir.display(),
        app.config.data_dir.join("admin.token").display()
    );
    configure_cli(&app, listener.local_addr()?);
    tracing::info!(runtime = %app.runtime.details(), store = %app.store.describe(), "Serving");
    axum::serve(listener, crate::http::router(app))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("Shutting down; sandboxes keep running and are re-adopted on the next start");
        })
        .await?;
    Ok(())
}

/// On a machine whose CLI has no configuration yet, saves this server's endpoint and admin token for it, so the
/// CLI works from any directory (`warmpool login` replaces it).
fn configure_cli(app: &App, addr: SocketAddr) {
    if super::config::load().is_some() {
        return;
    }
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let endpoint = format!("http://{host}:{}", addr.port());
    let Ok(token) = std::fs::read_to_string(app.config.data_dir.join("admin.token")) else { return };
    let config = super::config::UserConfig { endpoint, token: token.trim().to_string() };
    match super::config::save(&config) {
        Ok(path) => eprintln!(
            "the CLI now uses {} with the admin token (saved in {})",
            config.endpoint,
            path.display()
        ),
        Err(e) => tracing::warn!(error = %e, "Cannot save the CLI configuration"),
    }
}
