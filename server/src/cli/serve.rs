//! `warmpool serve`: opens the store, starts the runtime, recovers sandboxes from an earlier run, starts the
//! reconciler and serves the API until SIGTERM/SIGINT. Sandboxes keep running across a restart and are re-adopted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::app::{App, AppConfig, Background};
use crate::runtime::kubernetes::{self, KubernetesRuntime};
use crate::runtime::local::{self, oci::IdRange, LocalRuntime};
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
    /// Sandboxes this host runs at once, pool inventory and cold creates alike (beyond it pools report
    /// `no_eligible_hosts` and a cold create answers 503 `service_unavailable`).
    #[arg(long, default_value_t = 256)]
    pub max_sandboxes: usize,
    /// Quotas of every account created without them, as `max_sandboxes=N,max_warm_sandboxes=N` (a quota left
    /// out here is unlimited; `none` sets no default).
    #[arg(long, default_value = "max_sandboxes=50,max_warm_sandboxes=50", value_parser = parse_quotas)]
    pub default_quotas: warmpool_api::Quotas,
    /// Registries templates may pull `image` from, as comma-separated hosts (`ghcr.io,docker.io`,
    /// `registry.internal:5000`). Default none: only local OCI layouts under `--image-dir`. Loopback, link-local
    /// and private addresses are refused unless listed exactly.
    #[arg(long, env = "WARMPOOL_ALLOWED_REGISTRIES", value_delimiter = ',')]
    pub allowed_registries: Vec<String>,
    /// The directory local OCI image layouts must be under, after symlinks are resolved (default
    /// `<data-dir>/layouts`).
    #[arg(long, env = "WARMPOOL_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// kubernetes: run sandbox pods in a user namespace of their own (`hostUsers: false`; needs a cluster
    /// with user namespaces).
    #[arg(long)]
    pub pod_user_namespaces: bool,
    /// Sandboxes started at once by the reconciler (most of a start is waiting for readiness).
    #[arg(long, default_value_t = 100)]
    pub max_parallel_starts: usize,
    /// local: host uids and gids that ids 0.. inside every sandbox map to (`START:SIZE`); root inside a sandbox is
    /// START outside, which owns nothing of the host's.
    #[arg(long, default_value = "100000:65536", value_parser = IdRange::parse)]
    pub userns_range: IdRange,
    /// local: a private range (`a.b.c.d/n`) that `isolated` sandboxes may reach; repeatable. Without it they
    /// reach the internet only: no host address, no other sandbox, no link-local or private range.
    #[arg(long = "sandbox-allow-cidr", value_parser = local::parse_cidr)]
    pub sandbox_allow_cidrs: Vec<String>,
    /// local: start sandboxes even where `disk_mb` cannot be enforced (no btrfs-progs, no loop devices, too little
    /// free space). Without it such a host refuses to start sandboxes rather than let one fill the data dir.
    #[arg(long)]
    pub allow_unlimited_disk: bool,
    /// local: the bound of each sandbox's log file and its rotation together, in bytes (procd's mirrored output;
    /// at least 64 KiB).
    #[arg(long, default_value_t = crate::runtime::local::logs::DEFAULT_LOG_BYTES,
        value_parser = clap::value_parser!(u64).range(64 * 1024..))]
    pub sandbox_log_bytes: u64,
    /// The largest body the file, archive and stdin routes of a sandbox take, streamed (bytes; larger is 413).
    #[arg(long, default_value_t = warmpool_api::MAX_UPLOAD_BYTES_DEFAULT)]
    pub max_upload_bytes: u64,
    /// An OIDC issuer whose identity tokens trust policies may admit at `POST /v1/auth/oidc`
    /// (`https://token.actions.githubusercontent.com` for GitHub Actions); repeatable. https only (http on
    /// loopback, for tests). Its discovery document and keys are fetched when first needed.
    #[arg(long = "oidc-issuer", env = "WARMPOOL_OIDC_ISSUERS", value_delimiter = ',',
        value_parser = parse_issuer)]
    pub oidc_issuers: Vec<String>,
    /// The least time between two fetches of one issuer's keys (a token with an unknown `kid` triggers one).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub oidc_key_refresh_interval: std::time::Duration,
}

fn parse_issuer(text: &str) -> Result<String, String> {
    warmpool_api::validate_issuer("--oidc-issuer", text.trim()).map_err(|e| e.to_string())?;
    Ok(crate::oidc::normalize_issuer(text.trim()).to_string())
}

/// `max_sandboxes=N,max_warm_sandboxes=N` (either may be left out), or `none`.
fn parse_quotas(text: &str) -> Result<warmpool_api::Quotas, String> {
    let mut quotas = warmpool_api::Quotas::default();
    if text.trim() == "none" || text.trim().is_empty() {
        return Ok(quotas);
    }
    for item in text.split(',') {
        let (key, value) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected KEY=N"))?;
        let value: u64 = value.trim().parse().map_err(|e| format!("{item:?}: {e}"))?;
        match key.trim() {
            "max_sandboxes" => quotas.max_sandboxes = Some(value),
            "max_warm_sandboxes" => quotas.max_warm_sandboxes = Some(value),
            other => {
                return Err(format!("unknown quota {other:?}: expected max_sandboxes or max_warm_sandboxes"))
            }
        }
    }
    quotas.validate().map_err(|e| e.to_string())?;
    Ok(quotas)
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
/// The app `serve` runs, up and running: its background loops run until the returned [`Background`] is dropped.
pub async fn build_app(args: &ServeArgs) -> anyhow::Result<(Arc<App>, Background)> {
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
    let store = crate::store::open(args.database.as_deref(), &default_db).await.with_context(|| {
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
                user_namespaces: args.pod_user_namespaces,
            };
            let (client, namespace) = kubernetes::connect(&options).await?;
            KubernetesRuntime::new(client, namespace, &options, exits_tx, secrets.clone()).await?
        }
        _ => {
            let options = local::Options {
                data_dir: data_dir.clone(),
                procd_bin: find_procd(args.procd.clone())?,
                max_sandboxes: args.max_sandboxes,
                ids: args.userns_range,
                allow_cidrs: args.sandbox_allow_cidrs.clone(),
                allow_unlimited_disk: args.allow_unlimited_disk,
                log_bytes: args.sandbox_log_bytes,
            };
            LocalRuntime::new(options, exits_tx, secrets.clone()).await?
        }
    };
    let images = crate::images::ImagePolicy {
        allowed_registries: args
            .allowed_registries
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect(),
        image_dir: args.image_dir.clone().unwrap_or_else(|| data_dir.join("layouts")),
    };
    // The runtime checks again right before it pulls.
    crate::images::install(images.clone());
    let config = AppConfig {
        data_dir,
        reconciler_enabled: args.reconciler == "on",
        max_parallel_starts: args.max_parallel_starts,
        max_parallel_builds: 2,
        default_quotas: args.default_quotas.clone(),
        images,
        oidc: crate::oidc::OidcConfig {
            issuers: args.oidc_issuers.clone(),
            min_refresh: args.oidc_key_refresh_interval,
        },
        max_upload_bytes: args.max_upload_bytes,
    };
    let app = App::new(store, runtime, secrets, config);
    let token_path = app.bootstrap_admin().await?;
    tracing::info!(path = %token_path.display(), "Admin token");
    let background = app.start(exits_rx).await?;
    Ok((app, background))
}

pub async fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    // Pods download artifacts from the address actually bound (port 0 picks one) unless told otherwise.
    args.advertise_url.get_or_insert_with(|| format!("http://{}", listener.local_addr().expect("bound")));
    let (app, _background) = build_app(&args).await?;
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
