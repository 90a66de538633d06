//! The action's steps. Everything reads the runner through [`Runner`] and the control plane through
//! `warmpool-client`; `post` reads `STATE_*` and, for the API token, the `token` input (the runner hands a post
//! step the same inputs as its main step). The token is never written to `GITHUB_STATE`: the state file is plain
//! text on the runner's disk that any later step of the job can read.
//!
//! Without a `token`, a job granted `permissions: id-token: write` authenticates with OIDC: the job's ID token
//! (audience `oidc-audience`) is exchanged at `POST /v1/auth/oidc` for a short-lived token, masked, and handed
//! to later steps as `WARMPOOL_TOKEN` through `GITHUB_ENV`; `post` exchanges again.

use std::io::Write;
use std::time::{Duration, Instant};

use serde::Serialize;
use warmpool_api::{
    CheckoutMode, LeaseSpec, PoolId, PoolState, PoolStatus, SandboxCreate, SandboxId, WarmPool,
};
use warmpool_client::Client;

use crate::github::{self, GithubError, RunRef};
use crate::runner::{ActionEnv, Runner, RunnerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Main,
    Post,
    ScaleUp,
    Checkout,
    Drain,
}

impl std::str::FromStr for Command {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "main" => Command::Main,
            "post" => Command::Post,
            "scale-up" => Command::ScaleUp,
            "checkout" => Command::Checkout,
            "drain" => Command::Drain,
            other => return Err(format!("unknown command {other:?}")),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error("{context}: {source}")]
    Api {
        context: String,
        #[source]
        source: warmpool_client::Error,
    },
    #[error(transparent)]
    Github(#[from] GithubError),
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, ActionError>;

fn api(context: impl Into<String>) -> impl FnOnce(warmpool_client::Error) -> ActionError {
    let context = context.into();
    move |source| ActionError::Api { context, source }
}

fn input_error(name: &str, message: impl Into<String>) -> ActionError {
    ActionError::Runner(RunnerError::Input { name: name.into(), message: message.into() })
}

/// Runs a step; returns the exit code. Failures are reported as an `::error::` annotation.
pub async fn run<W: Write>(command: Command, r: &mut Runner<W>) -> i32 {
    let result = match command {
        Command::Main => scale_up_and_checkout(r, true, true).await,
        Command::ScaleUp => scale_up_and_checkout(r, false, false).await,
        Command::Checkout => checkout_only(r).await,
        Command::Post => post(r).await,
        Command::Drain => drain(r).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let title = match &e {
                ActionError::Api { source, .. } => source.code().unwrap_or("warmpool").to_string(),
                _ => "warmpool".to_string(),
            };
            r.error(&title, &e.to_string());
            1
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFinish {
    Drain,
    Release,
    None,
}

impl OnFinish {
    fn parse(s: &str) -> Option<OnFinish> {
        match s {
            "drain" => Some(OnFinish::Drain),
            "release" => Some(OnFinish::Release),
            "none" => Some(OnFinish::None),
            _ => None,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            OnFinish::Drain => "drain",
            OnFinish::Release => "release",
            OnFinish::None => "none",
        }
    }
}

/// The control plane, with the token masked before anything is printed. Without a `token` input, an OIDC
/// exchange gets one, exported to later steps as `WARMPOOL_TOKEN`.
async fn client<W: Write>(r: &mut Runner<W>) -> Result<Client> {
    if let Some(t) = r.env.input("github-token") {
        r.add_mask(&t);
    }
    let endpoint = r.env.input("endpoint").or_else(|| r.env.var("WARMPOOL_ENDPOINT").map(String::from));
    let endpoint = endpoint.ok_or_else(|| input_error("endpoint", "is required"))?;
    let audience = oidc_audience(&r.env, false);
    let token = credentials(r, &endpoint, &audience).await?;
    if let Some(Credentials::Exchanged(t)) = &token {
        r.export_var("WARMPOOL_TOKEN", t)?;
    }
    Client::new(&endpoint, token.map(Credentials::into_secret))
        .map_err(api("connecting to the control plane"))
}

/// The audience of the ID token: the `oidc-audience` input (main) or what main saved (post), default `warmpool`.
fn oidc_audience(env: &ActionEnv, post: bool) -> String {
    let saved = if post { env.state("oidc-audience") } else { None };
    saved.or_else(|| env.input("oidc-audience")).unwrap_or_else(|| "warmpool".into())
}

enum Credentials {
    /// The `token` input.
    Given(String),
    /// A short-lived token from the OIDC exchange.
    Exchanged(String),
}

impl Credentials {
    fn into_secret(self) -> String {
        match self {
            Credentials::Given(t) | Credentials::Exchanged(t) => t,
        }
    }
}

/// The `token` input, else (when the job may request an ID token) a token exchanged for the job's ID token.
/// Every secret is masked before anything else is printed.
async fn credentials<W: Write>(
    r: &mut Runner<W>,
    endpoint: &str,
    audience: &str,
) -> Result<Option<Credentials>> {
    if let Some(t) = r.env.input("token") {
        r.add_mask(&t);
        return Ok(Some(Credentials::Given(t)));
    }
    let (Some(url), Some(bearer)) = (
        r.env.var("ACTIONS_ID_TOKEN_REQUEST_URL").map(String::from),
        r.env.var("ACTIONS_ID_TOKEN_REQUEST_TOKEN").map(String::from),
    ) else {
        return Err(input_error(
            "token",
            "is empty and the job cannot request an OIDC ID token: grant the job `permissions: id-token: write` \
             (and give the account a trust policy), or pass a Warmpool token",
        ));
    };
    r.add_mask(&bearer);
    let id_token = request_id_token(&url, &bearer, audience).await?;
    r.add_mask(&id_token);
    let anonymous = Client::new(endpoint, None).map_err(api("connecting to the control plane"))?;
    let exchanged =
        anonymous.exchange_oidc(&id_token).await.map_err(api("exchanging the job's OIDC ID token"))?;
    r.add_mask(&exchanged.token);
    r.info(&format!(
        "Authenticated with OIDC as account {} (trust policy {}, token valid until {})",
        exchanged.account_id, exchanged.policy, exchanged.expires_at
    ));
    Ok(Some(Credentials::Exchanged(exchanged.token)))
}

/// GitHub's ID token for `audience`, as the toolkit's `getIDToken` asks for it.
async fn request_id_token(url: &str, bearer: &str, audience: &str) -> Result<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        value: String,
    }
    let failed = |why: String| ActionError::Failed(format!("requesting the job's OIDC ID token: {why}"));
    let mut url =
        reqwest::Url::parse(url).map_err(|e| failed(format!("ACTIONS_ID_TOKEN_REQUEST_URL: {e}")))?;
    url.query_pairs_mut().append_pair("audience", audience);
    let resp = reqwest::Client::new()
        .get(url)
        .header("authorization", format!("bearer {bearer}"))
        .header("accept", "application/json")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(failed(format!("the runner answered {status}")));
    }
    let answer: Answer = resp.json().await.map_err(|e| failed(format!("unexpected answer ({e})")))?;
    Ok(answer.value)
}

fn duration(env: &ActionEnv, name: &str, default: &str) -> Result<Duration> {
    let text = env.input(name).unwrap_or_else(|| default.to_string());
    humantime::parse_duration(&text)
        .map_err(|e| input_error(name, format!("{text:?} is not a duration ({e})")))
}

fn count(env: &ActionEnv, name: &str, default: u32) -> Result<u32> {
    match env.input(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| input_error(name, format!("{v:?} is not a whole number"))),
    }
}

fn context_var<'a>(env: &'a ActionEnv, name: &str) -> Result<&'a str> {
    env.var(name)
        .ok_or_else(|| ActionError::Failed(format!("{name} is not set: is this running on a GitHub runner?")))
}

/// `<repository>/<run_id>/<run_attempt>/<job>` for `main`; without the job for the cross-job sub-actions (so
/// `scale-up` and `drain` in different jobs name the same lease). The `lease-key` input overrides both.
fn lease_key(env: &ActionEnv, with_job: bool) -> Result<String> {
    if let Some(key) = env.input("lease-key") {
        return Ok(key);
    }
    let mut key = format!(
        "{}/{}/{}",
        context_var(env, "GITHUB_REPOSITORY")?,
        context_var(env, "GITHUB_RUN_ID")?,
        env.var("GITHUB_RUN_ATTEMPT").unwrap_or("1")
    );
    if with_job {
        key.push('/');
        key.push_str(context_var(env, "GITHUB_JOB")?);
    }
    Ok(key)
}

fn pools(env: &ActionEnv) -> Result<Vec<String>> {
    let pools = env.input_lines("pools");
    if pools.is_empty() {
        return Err(input_error("pools", "is required (pool ids or names, one per line)"));
    }
    Ok(pools)
}

fn mode(env: &ActionEnv) -> Result<CheckoutMode> {
    let text = env.input("warm-pool-mode").unwrap_or_else(|| "require".into());
    text.parse().map_err(|e: String| input_error("warm-pool-mode", e))
}

/// What happened to one pool, reported in the `report` output and the step summary.
#[derive(Debug, Clone, Serialize)]
struct PoolReport {
    pool: String,
    id: PoolId,
    target: u32,
    ready_before: u32,
    ready: u32,
    waited_ms: u64,
    hits: u32,
    misses: u32,
    sandboxes: Vec<SandboxId>,
    degraded_reasons: Vec<String>,
    #[serde(skip)]
    cold_start: Option<Duration>,
}

fn degraded(s: &PoolStatus) -> Vec<String> {
    s.degraded_reasons.iter().map(|r| r.as_str().to_string()).collect()
}

async fn resolve<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    names: &[String],
) -> Result<Vec<(WarmPool, PoolReport)>> {
    let mut out = Vec::new();
    for name in names {
        let pool = c.get_pool(name).await.map_err(api(format!("warm pool {name}")))?;
        let status = c.pool_status(&pool.id).await.map_err(api(format!("status of warm pool {name}")))?;
        let cold_start = match &pool.resolved_build_id {
            Some(b) => c.get_build(b).await.ok().and_then(|b| (b.finished_at? - b.created_at).to_std().ok()),
            None => None,
        };
        r.info(&format!("Pool {name} ({}): {} ready of target {}", pool.id, status.ready, status.target));
        let report = PoolReport {
            pool: name.clone(),
            id: pool.id.clone(),
            target: status.target,
            ready_before: status.ready,
            ready: status.ready,
            waited_ms: 0,
            hits: 0,
            misses: 0,
            sandboxes: Vec::new(),
            degraded_reasons: degraded(&status),
            cold_start,
        };
        out.push((pool, report));
    }
    Ok(out)
}

async fn burst<W: Write>(r: &mut Runner<W>) -> Result<u32> {
    match r.env.input("ready").as_deref() {
        Some("auto") => {
            let env = &r.env;
            let token = env.input("github-token").or_else(|| env.var("GITHUB_TOKEN").map(String::from));
            let token = token.ok_or(GithubError::Missing("github-token"))?;
            let run = RunRef {
                api_url: env.var("GITHUB_API_URL").unwrap_or("https://api.github.com"),
                token: &token,
                repository: context_var(env, "GITHUB_REPOSITORY")?,
                run_id: context_var(env, "GITHUB_RUN_ID")?,
                run_attempt: env.var("GITHUB_RUN_ATTEMPT").unwrap_or("1"),
            };
            let n = github::burst_size(&run).await?;
            r.info(&format!("ready: auto → {n} queued or running jobs in this workflow run"));
            Ok(n)
        }
        Some(v) => v.parse().map_err(|_| input_error("ready", format!("{v:?} is neither a number nor auto"))),
        None => Ok(count(&r.env, "checkout", 0)?.max(1)),
    }
}

async fn scale_up_and_checkout<W: Write>(
    r: &mut Runner<W>,
    with_checkout: bool,
    keep_state: bool,
) -> Result<()> {
    let c = client(r).await?;
    let names = pools(&r.env)?;
    let key = lease_key(&r.env, keep_state)?;
    let ready = burst(r).await?;
    let wait = duration(&r.env, "wait-timeout", "10m")?;
    let ttl = duration(&r.env, "lease-ttl", "2h")?;
    let on_finish = r.env.input("on-finish").unwrap_or_else(|| "drain".into());
    let on_finish = OnFinish::parse(&on_finish)
        .ok_or_else(|| input_error("on-finish", "must be drain, release or none"))?;
    let checkouts = if with_checkout { count(&r.env, "checkout", 0)? } else { 0 };
    let mode = mode(&r.env)?;
    let template = r.env.input("template");
    let mut pools = resolve(r, &c, &names).await?;

    if keep_state {
        // Saved before anything changes, so post can clean up whatever happens next.
        let ids: Vec<&str> = pools.iter().map(|(p, _)| p.id.as_str()).collect();
        // Not the token: post reads it from its own `token` input, or exchanges the job's ID token again.
        r.save_state("endpoint", c.endpoint())?;
        r.save_state("oidc-audience", &oidc_audience(&r.env, false))?;
        r.save_state("pools", &serde_json::to_string(&ids).expect("json"))?;
        r.save_state("lease-key", &key)?;
        r.save_state("on-finish", on_finish.as_str())?;
        r.save_state("sandboxes", "[]")?;
    }
    for (pool, _) in &pools {
        let spec = LeaseSpec { count: ready, ttl_seconds: ttl.as_secs().max(1) };
        c.put_lease(&pool.id, &key, &spec)
            .await
            .map_err(api(format!("putting lease {key} on {}", pool.name)))?;
        if pool.state != PoolState::Enabled {
            r.info(&format!("Pool {} is {}: enabling it", pool.name, pool.state.as_str()));
            c.pool_action(&pool.id, "enable").await.map_err(api(format!("enabling {}", pool.name)))?;
        }
    }
    r.info(&format!(
        "Lease {key}: +{ready} on {} pool(s), ttl {}",
        pools.len(),
        humantime::format_duration(ttl)
    ));

    let waited = wait_ready(r, &c, &mut pools, ready, wait).await;
    let result = match waited {
        Ok(()) => checkout_all(r, &c, &mut pools, checkouts, mode, template.as_deref(), keep_state).await,
        Err(e) => Err(e),
    };
    finish(r, &pools)?;
    result?;
    if with_checkout {
        work(r, &c, &pools).await?;
    }
    Ok(())
}

/// The `upload`, `run` and `download` inputs, in the sandboxes just checked out.
async fn work<W: Write>(r: &mut Runner<W>, c: &Client, pools: &[(WarmPool, PoolReport)]) -> Result<()> {
    let work = crate::work::Work::from_inputs(&r.env);
    if work.is_empty() {
        return Ok(());
    }
    let ids: Vec<SandboxId> = pools.iter().flat_map(|(_, rep)| rep.sandboxes.iter().cloned()).collect();
    crate::work::run(r, c, &ids, &work).await
}

/// Waits until every pool has `min(ready, target)` ready sandboxes, or `timeout`.
async fn wait_ready<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    pools: &mut [(WarmPool, PoolReport)],
    ready: u32,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    let mut last_log = Instant::now() - Duration::from_secs(60);
    r.group(&format!("Waiting for {ready} ready sandboxes in {} pool(s)", pools.len()));
    let outcome = loop {
        let mut missing = Vec::new();
        for (pool, report) in pools.iter_mut() {
            let s = c.pool_status(&pool.id).await.map_err(api(format!("status of {}", pool.name)))?;
            report.target = s.target;
            report.ready = s.ready;
            report.degraded_reasons = degraded(&s);
            let want = ready.min(s.target);
            if s.ready >= want {
                if report.waited_ms == 0 {
                    report.waited_ms = started.elapsed().as_millis() as u64;
                }
            } else {
                missing.push((pool.name.clone(), want, s));
            }
        }
        if missing.is_empty() {
            break Ok(());
        }
        // A pool that stopped filling for a reason waiting cannot clear fails the step now, not at the timeout.
        if missing.iter().any(|(_, _, s)| s.stuck().is_some()) {
            break Err(missing);
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            for (name, want, s) in &missing {
                r.info(&format!(
                    "  {name}: {}/{want} ready, {} warming, {} failed",
                    s.ready, s.warming, s.failed
                ));
            }
            last_log = Instant::now();
        }
        if started.elapsed() >= timeout {
            break Err(missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    r.end_group();
    let waited = started.elapsed();
    match outcome {
        Ok(()) => Ok(()),
        Err(missing) => {
            let mut stuck = Vec::new();
            for (name, want, s) in &missing {
                if let Some((reason, detail)) = s.stuck() {
                    stuck.push(format!("{name} ({reason})"));
                    r.error(
                        &format!("Warm pool {name} stopped filling"),
                        &format!(
                            "warm pool {name}: {} of {want} ready; it stopped filling ({reason}): {detail}",
                            s.ready
                        ),
                    );
                    continue;
                }
                let reasons = degraded(s);
                r.error(
                    &format!("Warm pool {name} not ready"),
                    &format!(
                        "warm pool {name}: {} of {want} ready after {} (target {}, warming {}, claimed {}, failed {}, degraded: {})",
                        s.ready,
                        format_waited(waited),
                        s.target,
                        s.warming,
                        s.claimed,
                        s.failed,
                        if reasons.is_empty() { "none".to_string() } else { reasons.join(", ") }
                    ),
                );
            }
            for (_, report) in pools.iter_mut() {
                report.waited_ms = waited.as_millis() as u64;
            }
            // Say why the wait ended: pools that stopped filling end it early, not the timeout.
            let message = if stuck.is_empty() {
                format!(
                    "{} pool(s) not ready after {} (wait-timeout {})",
                    missing.len(),
                    format_waited(waited),
                    humantime::format_duration(timeout)
                )
            } else {
                format!(
                    "{} pool(s) not ready after {}: stopped filling: {}",
                    missing.len(),
                    format_waited(waited),
                    stuck.join(", ")
                )
            };
            Err(ActionError::Failed(message))
        }
    }
}

/// A waited time as people read it: `1.7s`, `1m 0s` (tenths of a second, no nanoseconds).
fn format_waited(waited: Duration) -> String {
    if waited < Duration::from_secs(60) {
        format!("{:.1}s", waited.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(waited.as_secs())).to_string()
    }
}

async fn checkout_all<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    pools: &mut [(WarmPool, PoolReport)],
    per_pool: u32,
    mode: CheckoutMode,
    template: Option<&str>,
    keep_state: bool,
) -> Result<()> {
    let mut failures = Vec::new();
    let mut all = Vec::new();
    for (pool, report) in pools.iter_mut() {
        for _ in 0..per_pool {
            let req = SandboxCreate {
                template: template.map(String::from),
                warm_pool: Some(pool.id.to_string()),
                warm_pool_mode: Some(mode),
                warm_pool_wait_ms: Some(5_000),
                ..Default::default()
            };
            match c.create_sandbox(&req).await {
                Ok(s) => {
                    let hit = s.warm_pool_checkout.as_ref().is_some_and(|co| co.hit);
                    if hit {
                        report.hits += 1;
                    } else {
                        report.misses += 1;
                    }
                    report.sandboxes.push(s.id.clone());
                    all.push(s.id);
                    if keep_state {
                        r.save_state("sandboxes", &serde_json::to_string(&all).expect("json"))?;
                    }
                }
                Err(e) if e.code() == Some("warm_pool_unavailable") => {
                    report.misses += 1;
                    let reason = match &e {
                        warmpool_client::Error::Api { details, .. } => {
                            details["reason"].as_str().unwrap_or("").to_string()
                        }
                        _ => String::new(),
                    };
                    r.error(
                        &format!("Warm pool {} unavailable", pool.name),
                        &format!("warm_pool_unavailable ({reason}): {e}"),
                    );
                    failures.push(pool.name.clone());
                    break;
                }
                Err(e) => {
                    return Err(ActionError::Api {
                        context: format!("checking out from {}", pool.name),
                        source: e,
                    })
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ActionError::Failed(format!("no warm sandbox available in: {}", failures.join(", "))))
    }
}

/// Outputs and the step summary, written whether the step succeeded or not.
fn finish<W: Write>(r: &mut Runner<W>, pools: &[(WarmPool, PoolReport)]) -> Result<()> {
    let ids: Vec<&str> =
        pools.iter().flat_map(|(_, rep)| rep.sandboxes.iter().map(SandboxId::as_str)).collect();
    let reports: Vec<&PoolReport> = pools.iter().map(|(_, rep)| rep).collect();
    r.set_output("sandboxes", &serde_json::to_string(&ids).expect("json"))?;
    r.set_output("sandbox-ids", &ids.join(" "))?;
    r.set_output("report", &serde_json::to_string(&reports).expect("json"))?;
    let mut md = String::from("### Warmpool\n\n| pool | target | ready before | ready after | wait | hits | misses | sandboxes |\n|---|---|---|---|---|---|---|---|\n");
    let mut saved = Duration::ZERO;
    for rep in &reports {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1}s | {} | {} | {} |\n",
            rep.pool,
            rep.target,
            rep.ready_before,
            rep.ready,
            rep.waited_ms as f64 / 1000.0,
            rep.hits,
            rep.misses,
            if rep.sandboxes.is_empty() { "–".to_string() } else { rep.sandboxes.join(" ") }
        ));
        saved += rep.cold_start.unwrap_or_default() * rep.hits;
    }
    md.push_str(&format!(
        "\nEstimated time saved: {:.1}s (cold build time × warm hits).\n",
        saved.as_secs_f64()
    ));
    r.summary(&md)?;
    Ok(())
}

async fn checkout_only<W: Write>(r: &mut Runner<W>) -> Result<()> {
    let c = client(r).await?;
    let names = pools(&r.env)?;
    let per_pool = count(&r.env, "checkout", 1)?;
    let mode = mode(&r.env)?;
    let template = r.env.input("template");
    let mut pools = resolve(r, &c, &names).await?;
    let result = checkout_all(r, &c, &mut pools, per_pool, mode, template.as_deref(), false).await;
    finish(r, &pools)?;
    result?;
    work(r, &c, &pools).await
}

/// Cleans up after `main`, from `STATE_*` and the `token` input. Safe to run twice.
async fn post<W: Write>(r: &mut Runner<W>) -> Result<()> {
    let Some(endpoint) = r.env.state("endpoint") else {
        r.info("Nothing to clean up: main saved no state.");
        return Ok(());
    };
    let audience = oidc_audience(&r.env, true);
    let token = credentials(r, &endpoint, &audience).await?;
    let c = Client::new(&endpoint, token.map(Credentials::into_secret))
        .map_err(api("connecting to the control plane"))?;
    let parse = |name: &str| -> Vec<String> {
        r.env.state(name).and_then(|v| serde_json::from_str(&v).ok()).unwrap_or_default()
    };
    let (pools, sandboxes) = (parse("pools"), parse("sandboxes"));
    let key = r.env.state("lease-key").unwrap_or_default();
    let on_finish = r.env.state("on-finish").as_deref().and_then(OnFinish::parse).unwrap_or(OnFinish::Drain);
    cleanup(r, &c, &pools, &sandboxes, &key, on_finish).await
}

/// The cross-job `drain` sub-action: inputs instead of state.
async fn drain<W: Write>(r: &mut Runner<W>) -> Result<()> {
    let c = client(r).await?;
    let names = pools(&r.env)?;
    let key = lease_key(&r.env, false)?;
    let on_finish = r.env.input("on-finish").unwrap_or_else(|| "drain".into());
    let on_finish = OnFinish::parse(&on_finish)
        .ok_or_else(|| input_error("on-finish", "must be drain, release or none"))?;
    let sandboxes: Vec<String> = r
        .env
        .input("sandboxes")
        .map(|s| s.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    cleanup(r, &c, &names, &sandboxes, &key, on_finish).await
}

async fn cleanup<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    pools: &[String],
    sandboxes: &[String],
    key: &str,
    on_finish: OnFinish,
) -> Result<()> {
    let mut deleted = 0;
    for id in sandboxes {
        match c.delete_sandbox(id).await {
            Ok(()) => deleted += 1,
            Err(e) if e.code() == Some("not_found") => {}
            Err(e) => r.warning(&format!("deleting sandbox {id}: {e}")),
        }
    }
    let mut md = format!("### Warmpool cleanup\n\nDeleted {deleted} sandbox(es).\n\n| pool | lease | drained |\n|---|---|---|\n");
    for pool in pools {
        if on_finish == OnFinish::None {
            md.push_str(&format!("| {pool} | kept | no |\n"));
            continue;
        }
        match c.release_lease(pool, key, on_finish == OnFinish::Drain).await {
            Ok(rel) => {
                r.info(&format!(
                    "Pool {pool}: lease {} ({} other lease(s) remain){}",
                    if rel.released { "released" } else { "already gone" },
                    rel.remaining_leases,
                    if rel.drained { "; drained" } else { "" }
                ));
                md.push_str(&format!("| {pool} | released | {} |\n", if rel.drained { "yes" } else { "no" }));
            }
            Err(e) if e.code() == Some("not_found") => r.warning(&format!("pool {pool} no longer exists")),
            Err(e) => {
                return Err(ActionError::Api { context: format!("releasing the lease on {pool}"), source: e })
            }
        }
    }
    r.summary(&md)?;
    Ok(())
}
