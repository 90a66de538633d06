//! The `warmpool` command line: `serve` runs the control plane; every other command is a client of its API
//! (through `warmpool-client`). `--json` prints machine output on stdout and nothing else there.

mod bench;
mod bench_fill;
mod bench_io;
mod burst;
mod commands;
pub mod config;
mod sandbox_io;
pub mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use commands::run_client_command;

/// A client command whose reader goes away (`warmpool pool status api | head -1`) ends as Unix tools do: killed
/// quietly by SIGPIPE (a shell reports exit status 141), not with a "Broken pipe" panic from `println!`. Rust
/// ignores SIGPIPE by default; this restores the default. Not for `serve`, which must outlive any peer or child
/// that closes a pipe on it; the client commands write to no pipe but stdout and stderr.
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: called at the start of `main`, before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[derive(Parser)]
#[command(name = "warmpool", version, about = "Warm pools of ready sandboxes: control plane and CLI")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

impl Global {
    /// The endpoint in use: the flag or `WARMPOOL_ENDPOINT`, else the saved one, else the local default.
    pub fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .or_else(|| config::load().map(|c| c.endpoint))
            .unwrap_or_else(|| "http://127.0.0.1:7070".into())
    }
}

#[derive(Args, Clone)]
pub struct Global {
    /// Control plane URL (default: the one `warmpool login` saved, else http://127.0.0.1:7070).
    #[arg(long, global = true, env = "WARMPOOL_ENDPOINT")]
    pub endpoint: Option<String>,
    /// API token (default: the one `warmpool login` saved for this endpoint, else <data-dir>/admin.token when the
    /// endpoint is local).
    #[arg(long, global = true, env = "WARMPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(Box<serve::ServeArgs>),
    /// Check an endpoint and token and save them for every later command (in the user's config directory).
    Login,
    /// Templates and builds.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Warm pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Accounts and their quotas (admin token).
    #[command(subcommand)]
    Account(AccountCmd),
    /// API tokens of accounts (admin token).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Trust policies: which CI identity tokens may act as an account (admin token).
    #[command(subcommand, name = "trust-policy")]
    TrustPolicy(TrustPolicyCmd),
    /// Benchmarks that print their numbers as JSON.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
pub enum TemplateCmd {
    /// Create a template from a JSON spec.
    Create {
        /// The template spec (JSON; the fields of `POST /v1/templates`).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List the templates of the token's account.
    List,
    /// Show a template.
    Get {
        /// `name`, `name:tag`, `name@bld_…` or the template's id.
        reference: String,
    },
    /// Delete a template with its builds and tags.
    Delete {
        /// Template name or id.
        reference: String,
    },
    /// Build a template; tags move to the build when it is ready.
    Build {
        /// Template name or id.
        name: String,
        /// Tag to move to the build once it is ready (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Wait until the build is ready or failed.
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits (`30s`, `10m`).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print a build's log.
    Logs {
        /// The build's id (`bld_…`).
        build_id: String,
    },
    /// List a template's builds, oldest first, with their status and tags.
    Builds {
        /// Template name or id.
        name: String,
    },
}

/// A duration: `500ms`, `30s`, `10m`; a bare number is milliseconds.
fn millis(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<u64>() {
        Ok(ms) => Ok(std::time::Duration::from_millis(ms)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// How a pool follows demand and how fast it starts sandboxes (`pool create` and `pool update`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ScalingArgs {
    /// `on` lets demand set the target: min(max_ready, max(min_ready + leases, recommended_ready)).
    #[arg(long, value_parser = ["on", "off"])]
    pub autoscale: Option<String>,
    /// Autoscale's headroom over Little's law (default 1.2).
    #[arg(long)]
    pub autoscale_headroom: Option<f64>,
    /// The window claims are counted over (`10m`, the default).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub autoscale_window: Option<std::time::Duration>,
    /// With no claim for this long, autoscale lets the pool fall back to min_ready (`15m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub scale_to_zero_after: Option<std::time::Duration>,
    /// Starts of this pool per second, at most (`unlimited` clears it).
    #[arg(long, value_parser = parse_rate)]
    pub max_starts_per_second: Option<Rate>,
}

/// `--max-starts-per-second`: a rate, or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub Option<f64>);

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "unlimited" {
        return Ok(Rate(None));
    }
    s.parse::<f64>()
        .map(|r| Rate(Some(r)))
        .map_err(|_| format!("expected a number or `unlimited`, got {s:?}"))
}

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Create a warm pool.
    Create {
        /// Pool name (unique in the account).
        #[arg(long)]
        name: String,
        /// Template ref: `name`, `name:tag` or `name@bld_…`.
        #[arg(long)]
        template: String,
        /// Ready sandboxes kept at all times.
        #[arg(long)]
        min_ready: u32,
        /// Upper bound of the target, leases included.
        #[arg(long)]
        max_ready: u32,
        /// `track_tag` follows a tag as it moves; `pinned_build` keeps one build (default: `track_tag` when the ref
        /// names a tag).
        #[arg(long, value_parser = ["pinned_build", "track_tag"])]
        version_policy: Option<String>,
        /// The tag a `track_tag` pool follows (default: the ref's tag).
        #[arg(long)]
        track_tag: Option<String>,
        /// Default checkout mode for this pool.
        #[arg(long, value_parser = ["prefer", "require", "bypass"])]
        checkout_policy: Option<String>,
        /// Replace a ready sandbox idle for longer than this (`30m`, `2h`).
        #[arg(long, alias = "idle-timeout-seconds", value_parser = humantime::parse_duration)]
        idle_timeout: Option<std::time::Duration>,
        #[command(flatten)]
        scaling: ScalingArgs,
    },
    /// List the warm pools of the token's account.
    List,
    /// Show a pool's spec.
    Get {
        /// Pool id or name.
        id: String,
    },
    /// Show a pool's live status: counts, degraded reasons, last failure.
    Status {
        /// Pool id or name.
        id: String,
    },
    /// Change a pool's size, autoscale and start rate.
    Update {
        /// Pool id or name.
        id: String,
        /// New `min_ready`.
        #[arg(long)]
        min_ready: Option<u32>,
        /// New `max_ready`.
        #[arg(long)]
        max_ready: Option<u32>,
        #[command(flatten)]
        scaling: ScalingArgs,
    },
    /// Drain a pool, then delete it (checked-out sandboxes are not touched).
    Delete {
        /// Pool id or name.
        id: String,
    },
    /// Resume filling.
    Enable {
        /// Pool id or name.
        id: String,
    },
    /// Stop filling; ready inventory is kept and still handed out.
    Disable {
        /// Pool id or name.
        id: String,
    },
    /// Stop filling and destroy ready and warming inventory.
    Drain {
        /// Pool id or name.
        id: String,
    },
    /// Run a reconcile pass now (and lift a prewarm-failure stop).
    Reconcile {
        /// Pool id or name.
        id: String,
    },
    /// Wait until the pool has N ready sandboxes; fails at once if the pool stopped filling.
    Wait {
        /// Pool id or name.
        id: String,
        /// Ready sandboxes to wait for.
        #[arg(long)]
        ready: u32,
        /// Give up after this long (`30s`, `5m`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Raise the pool's target with a lease (idempotent per key).
    Lease {
        /// Pool id or name.
        id: String,
        /// Lease key; putting the same key again updates it.
        #[arg(long)]
        key: String,
        /// Sandboxes the lease adds to the target.
        #[arg(long)]
        count: u32,
        /// The lease stops counting after this long (`30m`, `2h`).
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Release a lease.
    Release {
        /// Pool id or name.
        id: String,
        /// Lease key.
        #[arg(long)]
        key: String,
        /// Drain the pool when no other lease remains.
        #[arg(long)]
        drain_if_last: bool,
    },
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account; everything its tokens create belongs to it.
    Create {
        /// The account's name.
        name: String,
        /// Sandboxes the account may own at once (checked-out and cold; not warm inventory).
        #[arg(long)]
        max_sandboxes: Option<u64>,
        /// Warm (unclaimed) sandboxes across the account's pools.
        #[arg(long)]
        max_warm_sandboxes: Option<u64>,
        /// Let the account's sandboxes use `--network host` (the host's network namespace, loopback services
        /// included). Off by default.
        #[arg(long)]
        allow_host_network: bool,
    },
    /// List accounts.
    List,
    /// Change an account's settings.
    Update {
        /// The account's id (`acc_…`).
        id: String,
        /// Allow (`true`, or the bare flag) or refuse (`false`) host networking to the account's sandboxes.
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        allow_host_network: Option<bool>,
    },
    /// Replace an account's quotas (a quota left out is unlimited).
    Quotas {
        /// The account's id (`acc_…`).
        id: String,
        /// Sandboxes the account may own at once.
        #[arg(long)]
        max_sandboxes: Option<u64>,
        /// Warm sandboxes across the account's pools.
        #[arg(long)]
        max_warm_sandboxes: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token for an account and print its secret (shown this once).
    Create {
        /// The account's id (`acc_…`).
        #[arg(long)]
        account: String,
        /// A name to recognise the token by.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a token.
    Delete {
        /// The token's id (`tok_…`).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum TrustPolicyCmd {
    /// Let identity tokens of an issuer whose audience and claims match act as the account.
    Create {
        /// The account's id (`acc_…`).
        #[arg(long)]
        account: String,
        /// The policy's name (unique in the account).
        #[arg(long)]
        name: String,
        /// The token issuer, one of the server's `--oidc-issuer`s (`https://token.actions.githubusercontent.com`).
        #[arg(long)]
        issuer: String,
        /// The audience (`aud`) the token must carry (the GitHub Action asks for `warmpool`).
        #[arg(long)]
        audience: String,
        /// `CLAIM=GLOB` the token's claim must match (`repository=octo-org/app`, `ref=refs/heads/*`); repeatable,
        /// at least one. `*` matches any run of characters, `?` one.
        #[arg(long = "claim", value_parser = claim, required = true)]
        claims: Vec<(String, String)>,
        /// Lifetime of the tokens it gives out (`15m`, `1h`; default 1h, from 60s to 6h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List an account's trust policies.
    List {
        /// The account's id (`acc_…`).
        #[arg(long)]
        account: String,
    },
    /// Delete a trust policy: no new exchanges; tokens it gave out live out their lifetime.
    Delete {
        /// The account's id (`acc_…`).
        #[arg(long)]
        account: String,
        /// The policy's id (`trp_…`).
        id: String,
    },
}

/// `K=V`.
fn key_value(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// `CLAIM=GLOB`.
fn claim(text: &str) -> Result<(String, String), String> {
    let (name, glob) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected CLAIM=GLOB"))?;
    Ok((name.to_string(), glob.to_string()))
}

#[derive(Subcommand)]
pub enum SandboxCmd {
    /// Create a sandbox: cold from a template, or checked out from a warm pool.
    Create {
        /// Template ref: `name`, `name:tag` or `name@bld_…` (optional with `--warm-pool`).
        #[arg(long)]
        template: Option<String>,
        /// Check out from this warm pool (id or name).
        #[arg(long)]
        warm_pool: Option<String>,
        /// `prefer` falls back to a cold start, `require` fails without ready inventory, `bypass` always starts
        /// cold (default: the pool's checkout policy, else prefer).
        #[arg(long, value_parser = ["prefer", "require", "bypass"])]
        warm_pool_mode: Option<String>,
        /// How long to wait for ready inventory (`500ms`, `2s`; a bare number is milliseconds).
        #[arg(long, value_parser = millis)]
        warm_pool_wait: Option<std::time::Duration>,
        /// Environment of start_cmd, warm processes and every exec (`K=V`, repeatable; makes the create cold).
        #[arg(long = "env", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// Working directory of start_cmd and warm processes (absolute; makes the create cold).
        #[arg(long)]
        cwd: Option<String>,
        /// Network: `isolated` (default), `none` or `host` (any but isolated makes the create cold).
        #[arg(long, value_parser = ["isolated", "none", "host"])]
        network: Option<String>,
        /// A label (`K=V`, repeatable).
        #[arg(long = "label", value_parser = key_value)]
        label: Vec<(String, String)>,
    },
    /// Run a command in a sandbox, streaming its output live; stdin is forwarded when it is not a terminal; exits
    /// with the command's code (128+N on signal N). A dropped connection reattaches from the last offset.
    Exec {
        /// Sandbox id.
        id: String,
        /// Working directory (absolute, or relative to the template's).
        #[arg(long)]
        cwd: Option<String>,
        /// Environment of the command (`K=V`, repeatable).
        #[arg(long = "env", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// Kill the command after this long (`30s`, `10m`; default: no limit but the server's 24 h).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List a sandbox's processes (warm processes included).
    Ps {
        /// Sandbox id.
        id: String,
    },
    /// Send a signal to a process started through the API.
    Kill {
        /// Sandbox id.
        id: String,
        /// Process id (`proc_…`).
        process: String,
        /// TERM, KILL, INT, HUP, QUIT, USR1 or USR2.
        #[arg(long, default_value = "TERM")]
        signal: String,
    },
    /// Copy files between this machine and a sandbox, like `docker cp`: either side may be `ID:PATH`; `-` is a
    /// tar stream on stdin or stdout; directories go as tar streams.
    Cp {
        /// Source: a local path, `ID:PATH` or `-`.
        src: String,
        /// Destination: a local path, `ID:PATH` or `-`.
        dst: String,
    },
    /// List the sandboxes of the token's account.
    List,
    /// Show a sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// Stop a sandbox and remove everything it had.
    Delete {
        /// Sandbox id.
        id: String,
    },
    /// Print the last lines of a sandbox's mirrored process output.
    Logs {
        /// Sandbox id.
        id: String,
        /// How many lines, from the end (the server's default is 1000).
        #[arg(long)]
        tail: Option<u32>,
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
    /// Sandbox I/O: a tree up and down through the archive routes beside tar inside the sandbox, streamed-exec
    /// line latency, and the server's memory while 1 GB streams in and out, as JSON.
    Io(bench_io::IoArgs),
    /// A pool of N filling beside plain `runc run` of N containers at the same parallelism, as JSON.
    Fill(bench_fill::FillArgs),
    /// A ramp of claims (1 to 10/s over 2 minutes) against a static pool and an autoscaled one, side by side, as
    /// JSON: hit ratio, checkout p50/p99, sandbox-seconds, time back to min_ready.
    Burst(burst::BurstArgs),
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args).await.map(|_| 0),
        Command::Bench(BenchCmd::Checkout(args)) => bench::checkout(&cli.global, args).await,
        Command::Bench(BenchCmd::Pools(args)) => bench::pools(&cli.global, args).await,
        Command::Bench(BenchCmd::Artifact(args)) => bench::artifact(&cli.global, args).await,
        Command::Bench(BenchCmd::Io(args)) => bench_io::io(&cli.global, args).await,
        Command::Bench(BenchCmd::Fill(args)) => bench_fill::fill(&cli.global, args).await,
        Command::Bench(BenchCmd::Burst(args)) => burst::burst(&cli.global, args).await,
        command => run_client_command(&cli.global, command).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command and every flag says what it is for in `--help`.
    #[test]
    fn every_command_and_flag_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name()).trim().to_string();
            if cmd.get_about().is_none() && path != "warmpool" {
                missing.push(format!("{path}: no description"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} {id}: no description"));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
