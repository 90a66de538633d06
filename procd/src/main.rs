use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warmpool_procd::config::{self, Inputs};

/// procd: PID 1 of a Warmpool sandbox.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// JSON config: {"listen", "token_file"?, "warm_processes": [...]}.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// unix:///path/procd.sock, tcp://host:port, or fd://N (a listening Unix socket inherited as descriptor N).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// File holding the sandbox token.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the aggregated result of a probe as JSON; exits 0 when it passed.
    Probe {
        #[arg(long, default_value = "readiness")]
        kind: String,
    },
    /// Init container step (Kubernetes): copies this binary to `--bin-dir` and writes procd's config and token
    /// from the environment (`WARMPOOL_PROCD_CONFIG`, `WARMPOOL_PROCD_TOKEN`) into `--config-dir`.
    Install {
        #[arg(long, default_value = "/procd/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/config")]
        config_dir: PathBuf,
    },
    /// Init container step (Kubernetes): downloads a build's artifact (a zstd tar) with the build-scoped token in
    /// `WARMPOOL_ARTIFACT_TOKEN` and unpacks it into `--into`.
    FetchArtifact {
        /// The server's `/v1/builds/{id}/artifact` URL.
        #[arg(long)]
        url: String,
        #[arg(long, default_value = "/workspace")]
        into: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROCD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let code = match cli.command {
        Some(Command::Probe { kind }) => runtime.block_on(probe(cli.listen, cli.token_file, kind))?,
        Some(Command::Install { bin_dir, config_dir }) => install(&bin_dir, &config_dir).map(|()| 0)?,
        Some(Command::FetchArtifact { url, into }) => {
            runtime.block_on(fetch_artifact(&url, &into)).map(|()| 0)?
        }
        None => {
            // The sandbox's own processes run with procd's credentials: as a dumpable process, procd's memory and
            // descriptors (its log, its listener) would be theirs through /proc/1. Its children become dumpable
            // again when they exec.
            // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers and changes only this process's flag.
            if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "Cannot make procd non-dumpable");
            }
            let inputs = Inputs {
                config: cli.config,
                listen: cli.listen,
                token_file: cli.token_file,
                warm_processes_env: std::env::var("WARMPOOL_WARM_PROCESSES").ok(),
                token_env: std::env::var("WARMPOOL_PROCD_TOKEN").ok(),
            };
            let settings = match config::load(inputs, |k| std::env::var(k).ok()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("procd: invalid configuration: {e}");
                    std::process::exit(warmpool_procd::EXIT_INVALID_CONFIG);
                }
            };
            if let Ok(name) = std::env::var("WARMPOOL_HOSTNAME") {
                if let Err(e) = warmpool_procd::set_hostname(&name) {
                    tracing::warn!(error = %e, hostname = %name, "Cannot set the hostname");
                }
            }
            runtime.block_on(warmpool_procd::run(settings))?
        }
    };
    std::process::exit(code);
}

async fn probe(listen: Option<String>, token_file: Option<PathBuf>, kind: String) -> anyhow::Result<i32> {
    let listen = listen.context("--listen is required")?;
    let listen = config::parse_listen("--listen", &listen)?;
    let token = match token_file {
        Some(p) => Some(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?),
        None => std::env::var("WARMPOOL_PROCD_TOKEN").ok(),
    };
    let mut client = warmpool_procd::connect(&listen)?;
    let kind: warmpool_api::ProbeKind = kind.parse().map_err(|e: String| anyhow::anyhow!("--kind: {e}"))?;
    let req = warmpool_procd::authorized(
        warmpool_procd::proto::ProbeRequest { kind: warmpool_procd::convert::kind_to_proto(kind).into() },
        token.as_deref().map(str::trim),
    );
    let result = client.probe(req).await.context("probe call failed")?.into_inner();
    let result = warmpool_procd::convert::probe_result_from_proto(result);
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(if result.status == warmpool_api::ProbeStatus::Passed { 0 } else { 1 })
}

fn install(bin_dir: &std::path::Path, config_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let exe = std::env::current_exe().context("finding procd's own binary")?;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let target = bin_dir.join("procd");
    std::fs::copy(&exe, &target).with_context(|| format!("copying procd to {}", target.display()))?;
    std::fs::create_dir_all(config_dir).with_context(|| format!("creating {}", config_dir.display()))?;
    for (var, file) in [("WARMPOOL_PROCD_CONFIG", "procd.json"), ("WARMPOOL_PROCD_TOKEN", "token")] {
        let value = std::env::var(var).with_context(|| format!("{var} is not set"))?;
        let path = config_dir.join(file);
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Downloads the artifact to a file next to `into`, then unpacks it; retries for a minute while the server cannot
/// be reached (a rolling restart), not when it refuses.
async fn fetch_artifact(url: &str, into: &std::path::Path) -> anyhow::Result<()> {
    let token = std::env::var("WARMPOOL_ARTIFACT_TOKEN").context("WARMPOOL_ARTIFACT_TOKEN is not set")?;
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut resp = loop {
        match client.get(url).bearer_auth(&token).send().await {
            Ok(r) => break r,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("procd: {url} unreachable ({e}); retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("downloading {url}")),
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        anyhow::bail!("downloading {url}: {status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut file = tempfile_in(into)?;
    while let Some(chunk) = resp.chunk().await.with_context(|| format!("downloading {url}"))? {
        std::io::Write::write_all(&mut file, &chunk).context("writing the artifact")?;
    }
    std::io::Seek::rewind(&mut file)?;
    let into = into.to_path_buf();
    tokio::task::spawn_blocking(move || warmpool_procd::archive::unpack(std::io::BufReader::new(file), &into))
        .await?
        .context("unpacking the artifact")
}

/// An unnamed file in `dir` (created if missing; the file is unlinked at once, so unpacking never sees it).
fn tempfile_in(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".warmpool-artifact-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let _ = std::fs::remove_file(&path);
    Ok(file)
}
