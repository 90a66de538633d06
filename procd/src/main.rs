use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warmpool_procd::config::{self, Inputs, LogSettings};

/// procd: PID 1 of a Warmpool sandbox.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// JSON config: {"listen", "token_file"?, "warm_processes": [...]}.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// unix:///path/procd.sock or tcp://host:port.
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
        None => {
            let inputs = Inputs {
                config: cli.config,
                listen: cli.listen,
                token_file: cli.token_file,
                warm_processes_env: std::env::var("WARMPOOL_WARM_PROCESSES").ok(),
                token_env: std::env::var("WARMPOOL_PROCD_TOKEN").ok(),
            };
            let settings = match config::load(inputs, LogSettings::from_env(|k| std::env::var(k).ok())) {
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
