//! The `warmpool` command line: `serve` runs the control plane; every other command is a client of its API
//! (through `warmpool-client`). `--json` prints machine output on stdout and nothing else there.

mod bench;
mod commands;
pub mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use commands::run_client_command;

#[derive(Parser)]
#[command(name = "warmpool", version, about = "Warm pools of ready sandboxes: control plane and CLI")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Control plane URL.
    #[arg(long, global = true, env = "WARMPOOL_ENDPOINT", default_value = "http://127.0.0.1:7070")]
    pub endpoint: String,
    /// API token (default: <data-dir>/admin.token when the endpoint is local).
    #[arg(long, global = true, env = "WARMPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(serve::ServeArgs),
    /// Templates and builds.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Warm pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Benchmarks that print their numbers as JSON.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Create a template from a JSON spec.
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    List,
    Get {
        reference: String,
    },
    Delete {
        reference: String,
    },
    /// Build a template; tags move to the build when it is ready.
    Build {
        name: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Wait until the build is ready or failed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a build's log.
    Logs {
        build_id: String,
    },
    /// List a template's builds, oldest first, with their status and tags.
    Builds {
        /// Template name or id.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum PoolCmd {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        template: String,
        #[arg(long)]
        min_ready: u32,
        #[arg(long)]
        max_ready: u32,
        #[arg(long, value_parser = ["pinned_build", "track_tag"])]
        version_policy: Option<String>,
        #[arg(long)]
        track_tag: Option<String>,
        #[arg(long, value_parser = ["prefer", "require", "bypass"])]
        checkout_policy: Option<String>,
        #[arg(long)]
        idle_timeout_seconds: Option<u64>,
    },
    List,
    Get {
        id: String,
    },
    Status {
        id: String,
    },
    Update {
        id: String,
        #[arg(long)]
        min_ready: Option<u32>,
        #[arg(long)]
        max_ready: Option<u32>,
    },
    Delete {
        id: String,
    },
    Enable {
        id: String,
    },
    Disable {
        id: String,
    },
    Drain {
        id: String,
    },
    Reconcile {
        id: String,
    },
    /// Wait until the pool has N ready sandboxes.
    Wait {
        id: String,
        #[arg(long)]
        ready: u32,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Raise the pool's target with a lease (idempotent per key).
    Lease {
        id: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Release a lease.
    Release {
        id: String,
        #[arg(long)]
        key: String,
        #[arg(long)]
        drain_if_last: bool,
    },
}

#[derive(Subcommand)]
pub enum SandboxCmd {
    Create {
        #[arg(long)]
        template: Option<String>,
        #[arg(long)]
        warm_pool: Option<String>,
        #[arg(long, value_parser = ["prefer", "require", "bypass"])]
        warm_pool_mode: Option<String>,
        /// Milliseconds to wait for ready inventory.
        #[arg(long)]
        warm_pool_wait: Option<u64>,
    },
    /// Run a command in a sandbox; exits with its exit code.
    Exec {
        id: String,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    List,
    Get {
        id: String,
    },
    Delete {
        id: String,
    },
    Logs {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Warm vs cold checkout latency and throughput, as JSON.
    Checkout(bench::CheckoutArgs),
    /// The server's CPU use at rest with N idle pools, as JSON.
    Pools(bench::PoolsArgs),
    /// Cold create and pool fill for a tiny and a big (300 MB, 20,000 files) artifact, side by side, as JSON.
    Artifact(bench::ArtifactArgs),
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::serve(args).await.map(|_| 0),
        Command::Bench(BenchCmd::Checkout(args)) => bench::checkout(&cli.global, args).await,
        Command::Bench(BenchCmd::Pools(args)) => bench::pools(&cli.global, args).await,
        Command::Bench(BenchCmd::Artifact(args)) => bench::artifact(&cli.global, args).await,
        command => run_client_command(&cli.global, command).await,
    }
}
