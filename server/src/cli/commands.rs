//! The client commands: each one call (or a poll) through `warmpool-client`, printed as text or `--json`.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use warmpool_api::*;
use warmpool_client::Client;

use super::{AccountCmd, Command, Global, PoolCmd, SandboxCmd, TemplateCmd, TokenCmd, TrustPolicyCmd};

/// The client for the global flags; without a token, the one saved for this endpoint, else (on a local endpoint)
/// the admin token file.
pub fn client(global: &Global) -> anyhow::Result<Client> {
    let endpoint = global.endpoint();
    let saved =
        super::config::load().filter(|c| c.endpoint.trim_end_matches('/') == endpoint.trim_end_matches('/'));
    let token = match (&global.token, saved) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(saved)) => Some(saved.token),
        (None, None) if is_local(&endpoint) => {
            let dir = std::env::var("WARMPOOL_DATA_DIR").unwrap_or_else(|_| ".warmpool".into());
            std::fs::read_to_string(std::path::Path::new(&dir).join("admin.token"))
                .ok()
                .map(|t| t.trim().to_string())
        }
        (None, None) => None,
    };
    Ok(Client::new(&endpoint, token)?)
}

fn is_local(endpoint: &str) -> bool {
    endpoint_host(endpoint).is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]")
}

fn endpoint_host(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://")?.1;
    let host = rest.split(['/', '?']).next()?;
    Some(host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host).to_string())
}

pub(super) fn print<T: Serialize>(global: &Global, value: &T, text: impl FnOnce(&T) -> String) {
    if global.json {
        println!("{}", serde_json::to_string_pretty(value).expect("json"));
    } else {
        println!("{}", text(value));
    }
}

fn spinner(global: &Global, message: String) -> indicatif::ProgressBar {
    let bar =
        if global.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message);
    bar
}

pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

/// The status line, then the last failed start's output (or the last error) when the pool has one.
fn status_text(s: &PoolStatus) -> String {
    let mut text = status_line(s);
    text.push('\n');
    text.push_str(&demand_text(s));
    let last = match (&s.last_failure_logs, &s.last_error) {
        (Some(logs), _) => Some(("last failed start's output", logs)),
        (None, Some(error)) => Some(("last error", error)),
        (None, None) => None,
    };
    if let Some((what, body)) = last {
        text.push_str(&format!("\n{what}:"));
        for line in body.trim_end().lines() {
            text.push_str(&format!("\n  {line}"));
        }
    }
    text
}

/// The demand line of `pool status`, with its arithmetic.
fn demand_text(s: &PoolStatus) -> String {
    let d = &s.demand;
    let ratio = match d.hit_ratio {
        Some(r) => format!("{:.1} % ({}/{})", r * 100.0, d.hits, d.claims),
        None => "- (no claims)".into(),
    };
    let p90 = d.warm_seconds_p90.map(|p| format!("{p:.2} s")).unwrap_or_else(|| "- (none ready yet)".into());
    let arithmetic = if d.idle {
        "0 (no claim for scale_to_zero_after_seconds)".to_string()
    } else {
        format!(
            "ceil({:.3}/s × {} × {}) = {}",
            d.claims_per_second,
            d.warm_seconds_p90.map(|p| format!("{p:.2} s")).unwrap_or_else(|| "0 s".into()),
            d.headroom,
            d.recommended_ready
        )
    };
    format!(
        "demand: {:.1} claims/min over {} s (recent {:.1}/min), hit ratio {ratio}, warm-up p90 {p90}\n\
         recommended_ready = {arithmetic}",
        d.claims_per_minute, d.window_seconds, d.recent_claims_per_minute
    )
}

fn status_line(s: &PoolStatus) -> String {
    format!(
        "state={} target={} ready={} warming={} claimed={} draining={} failed={} expired={} unavailable={} generation={} build={} degraded=[{}]",
        s.state.as_str(), s.target, s.ready, s.warming, s.claimed, s.draining, s.failed, s.expired, s.unavailable,
        s.rollout_generation, s.resolved_build_id.as_deref().unwrap_or("-"),
        s.degraded_reasons.iter().map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()).collect::<Vec<_>>().join(",")
    )
}

pub async fn run_client_command(global: &Global, command: Command) -> anyhow::Result<i32> {
    let c = client(global)?;
    match command {
        Command::Template(cmd) => template(global, &c, cmd).await,
        Command::Pool(cmd) => pool(global, &c, cmd).await,
        Command::Sandbox(cmd) => sandbox(global, &c, cmd).await,
        Command::Login => login(global, &c).await,
        Command::Account(cmd) => account(global, &c, cmd).await,
        Command::Token(cmd) => token(global, &c, cmd).await,
        Command::TrustPolicy(cmd) => trust_policy(global, &c, cmd).await,
        Command::Serve(_) | Command::Bench(_) => unreachable!("handled by cli::run"),
    }
}

/// Checks the token against the endpoint, then saves both.
async fn login(global: &Global, c: &Client) -> anyhow::Result<i32> {
    let token = c.token().context("no token: pass --token or set WARMPOOL_TOKEN")?.to_string();
    c.list_templates().await.context("the endpoint refused the token")?;
    let config = super::config::UserConfig { endpoint: global.endpoint(), token };
    let path = super::config::save(&config).context("saving the CLI configuration")?;
    print(global, &serde_json::json!({"endpoint": config.endpoint, "config": path}), |_| {
        format!("Logged in to {}; saved in {} (mode 0600)", config.endpoint, path.display())
    });
    Ok(0)
}

async fn template(global: &Global, c: &Client, cmd: TemplateCmd) -> anyhow::Result<i32> {
    match cmd {
        TemplateCmd::Create { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let spec: TemplateSpec = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a template spec", file.display()))?;
            let t = c.create_template(&spec).await?;
            print(global, &t, |t| format!("created template {} ({})", t.name, t.id));
        }
        TemplateCmd::List => {
            let items = c.list_templates().await?;
            print(global, &List::all(items), |l| {
                table(
                    &["ID", "NAME", "START_CMD"],
                    l.items
                        .iter()
                        .map(|t| {
                            vec![t.id.to_string(), t.name.clone(), t.start_cmd.clone().unwrap_or_default()]
                        })
                        .collect(),
                )
            });
        }
        TemplateCmd::Get { reference } => {
            let name = TemplateRef::parse("reference", &reference)?.name().to_string();
            let t = c.get_template(&name).await?;
            print(global, &t, |t| {
                let mut rows = vec![
                    ("id", t.id.to_string()),
                    ("name", t.name.clone()),
                    ("image", t.image.clone().unwrap_or_else(|| "(host base)".into())),
                    ("build steps", t.build.steps.len().to_string()),
                    ("start_cmd", t.start_cmd.clone().unwrap_or_default()),
                    ("cwd", t.cwd.clone().unwrap_or_else(|| "/workspace".into())),
                    ("warm processes", t.warm_processes.len().to_string()),
                    ("created", t.created_at.format("%Y-%m-%d %H:%M:%S").to_string()),
                ];
                rows.retain(|(_, v)| !v.is_empty());
                rows.iter().map(|(k, v)| format!("{k:<16}{v}")).collect::<Vec<_>>().join("\n")
            });
        }
        TemplateCmd::Delete { reference } => {
            c.delete_template(&reference).await?;
            print(global, &serde_json::json!({"deleted": reference}), |_| {
                format!("deleted template {reference}")
            });
        }
        TemplateCmd::Build { name, tags, wait, timeout } => {
            let build = c.create_build(&name, &tags).await?;
            if !wait {
                print(global, &build, |b| format!("build {} is {}", b.id, b.status.as_str()));
                return Ok(0);
            }
            let bar = spinner(global, format!("building {name} ({})", build.id));
            let build = c
                .wait_build(&build.id, timeout, |b| {
                    bar.set_message(format!("build {} is {}", b.id, b.status.as_str()))
                })
                .await?;
            bar.finish_and_clear();
            let failed = build.status == BuildStatus::Failed;
            print(global, &build, |b| match &b.error {
                Some(e) => format!("build {} failed: {e}", b.id),
                None => format!(
                    "build {} is ready{}",
                    b.id,
                    if b.tags.is_empty() { String::new() } else { format!(" (tags: {})", b.tags.join(", ")) }
                ),
            });
            return Ok(if failed { 1 } else { 0 });
        }
        TemplateCmd::Logs { build_id } => print!("{}", c.build_logs(&build_id).await?),
        TemplateCmd::Builds { name } => {
            let items = c.list_builds(&name).await?;
            print(global, &List::all(items), |l| {
                table(
                    &["ID", "STATUS", "TAGS", "CREATED", "ERROR"],
                    l.items
                        .iter()
                        .map(|b| {
                            vec![
                                b.id.to_string(),
                                b.status.as_str().to_string(),
                                b.tags.join(","),
                                b.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                                b.error.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                )
            });
        }
    }
    Ok(0)
}

async fn pool(global: &Global, c: &Client, cmd: PoolCmd) -> anyhow::Result<i32> {
    let show = |p: &WarmPool| {
        format!(
            "pool {} ({}) {} template={} min={} max={} generation={}",
            p.name,
            p.id,
            p.state.as_str(),
            p.template,
            p.min_ready,
            p.max_ready,
            p.rollout_generation
        )
    };
    match cmd {
        PoolCmd::Create {
            name,
            template,
            min_ready,
            max_ready,
            version_policy,
            track_tag,
            checkout_policy,
            idle_timeout,
            scaling,
        } => {
            let spec = WarmPoolSpec {
                name,
                template,
                version_policy: version_policy.map(|v| {
                    if v == "track_tag" {
                        VersionPolicy::TrackTag
                    } else {
                        VersionPolicy::PinnedBuild
                    }
                }),
                track_tag,
                min_ready,
                max_ready,
                checkout_policy: checkout_policy
                    .map(|m| m.parse())
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                idle_timeout_seconds: idle_timeout.map(|d| d.as_secs()),
                autoscale: scaling.autoscale(None),
                max_starts_per_second: scaling.max_starts_per_second.and_then(|r| r.0),
                ..Default::default()
            };
            let p = c.create_pool(&spec).await?;
            print(global, &p, |p| format!("created {}", show(p)));
        }
        PoolCmd::List => {
            let items = c.list_pools().await?;
            print(global, &List::all(items), |l| {
                table(
                    &["ID", "NAME", "STATE", "TEMPLATE", "MIN", "MAX", "GEN"],
                    l.items
                        .iter()
                        .map(|p| {
                            vec![
                                p.id.to_string(),
                                p.name.clone(),
                                p.state.as_str().into(),
                                p.template.clone(),
                                p.min_ready.to_string(),
                                p.max_ready.to_string(),
                                p.rollout_generation.to_string(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        PoolCmd::Get { id } => print(global, &c.get_pool(&id).await?, show),
        PoolCmd::Status { id } => print(global, &c.pool_status(&id).await?, status_text),
        PoolCmd::Update { id, min_ready, max_ready, scaling } => {
            // Autoscale flags change the pool's block, keeping what they do not name.
            let autoscale = match scaling.touches_autoscale() {
                true => scaling.autoscale(Some(c.get_pool(&id).await?.autoscale)),
                false => None,
            };
            let patch = WarmPoolPatch {
                min_ready,
                max_ready,
                autoscale,
                max_starts_per_second: scaling.max_starts_per_second.map(|r| r.0),
                ..Default::default()
            };
            let p = c.update_pool(&id, &patch).await?;
            print(global, &p, show);
        }
        PoolCmd::Delete { id } => {
            let bar = spinner(global, format!("draining pool {id} (its sandboxes stop), then deleting it"));
            let deleted = c.delete_pool(&id).await;
            bar.finish_and_clear();
            deleted?;
            print(global, &serde_json::json!({"deleted": id}), |_| format!("drained and deleted pool {id}"));
        }
        PoolCmd::Enable { id } => print(global, &c.pool_action(&id, "enable").await?, show),
        PoolCmd::Disable { id } => print(global, &c.pool_action(&id, "disable").await?, show),
        PoolCmd::Drain { id } => print(global, &c.pool_action(&id, "drain").await?, show),
        PoolCmd::Reconcile { id } => print(global, &c.pool_action(&id, "reconcile").await?, show),
        PoolCmd::Wait { id, ready, timeout } => {
            let bar = if global.json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(ready as u64)
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len}")
                    .expect("style"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            let result = c
                .wait_pool_ready(&id, ready, timeout, |s| {
                    bar.set_position(s.ready.min(ready) as u64);
                    bar.set_message(format!("pool {id}: {} warming", s.warming));
                })
                .await;
            bar.finish_and_clear();
            match result {
                Ok(s) => print(global, &s, status_line),
                Err(warmpool_client::Error::Timeout(..)) => {
                    let s = c.pool_status(&id).await?;
                    print(global, &s, status_text);
                    eprintln!(
                        "error: timed out after {}: pool {id} has {} of {ready} ready",
                        humantime::format_duration(timeout),
                        s.ready
                    );
                    return Ok(1);
                }
                Err(e) => return Err(e.into()),
            }
        }
        PoolCmd::Lease { id, key, count, ttl } => {
            let l = c.put_lease(&id, &key, &LeaseSpec { count, ttl_seconds: ttl.as_secs().max(1) }).await?;
            print(global, &l, |l| {
                format!("lease {} on {}: count={} expires {}", l.key, l.pool_id, l.count, l.expires_at)
            });
        }
        PoolCmd::Release { id, key, drain_if_last } => {
            let r = c.release_lease(&id, &key, drain_if_last).await?;
            print(global, &r, |r| {
                format!(
                    "released={} remaining_leases={} drained={}",
                    r.released, r.remaining_leases, r.drained
                )
            });
        }
    }
    Ok(0)
}

async fn account(global: &Global, c: &Client, cmd: AccountCmd) -> anyhow::Result<i32> {
    let quota = |q: Option<u64>| q.map_or("-".to_string(), |q| q.to_string());
    let row = move |a: &Account| {
        vec![
            a.id.to_string(),
            a.name.clone(),
            quota(a.quotas.max_sandboxes),
            quota(a.quotas.max_warm_sandboxes),
            a.allow_host_network.to_string(),
        ]
    };
    let header = ["ID", "NAME", "MAX_SANDBOXES", "MAX_WARM_SANDBOXES", "ALLOW_HOST_NETWORK"];
    let one = |a: &Account| table(&header, vec![row(a)]);
    match cmd {
        AccountCmd::Create { name, max_sandboxes, max_warm_sandboxes, allow_host_network } => {
            let quotas = Quotas { max_sandboxes, max_warm_sandboxes };
            let req = AccountCreate { name, quotas, allow_host_network };
            print(global, &c.create_account(&req).await?, one);
        }
        AccountCmd::Update { id, allow_host_network } => {
            let patch = AccountPatch { allow_host_network, ..Default::default() };
            print(global, &c.update_account(&id, &patch).await?, one);
        }
        AccountCmd::List => {
            let items = c.list_accounts().await?;
            print(global, &List::all(items), |l| table(&header, l.items.iter().map(row).collect()));
        }
        AccountCmd::Quotas { id, max_sandboxes, max_warm_sandboxes } => {
            let quotas = Quotas { max_sandboxes, max_warm_sandboxes };
            print(
                global,
                &c.update_account(&id, &AccountPatch { quotas: Some(quotas), ..Default::default() }).await?,
                one,
            );
        }
    }
    Ok(0)
}

async fn trust_policy(global: &Global, c: &Client, cmd: TrustPolicyCmd) -> anyhow::Result<i32> {
    let row = |p: &TrustPolicy| {
        let claims: Vec<String> = p.claims.iter().map(|(k, v)| format!("{k}={v}")).collect();
        vec![
            p.id.to_string(),
            p.name.clone(),
            p.issuer.clone(),
            p.audience.clone(),
            claims.join(","),
            p.token_ttl_seconds.to_string(),
        ]
    };
    let header = ["ID", "NAME", "ISSUER", "AUDIENCE", "CLAIMS", "TOKEN_TTL_SECONDS"];
    match cmd {
        TrustPolicyCmd::Create { account, name, issuer, audience, claims, ttl } => {
            let req = TrustPolicyCreate {
                name,
                issuer,
                audience,
                claims: claims.into_iter().collect(),
                token_ttl_seconds: ttl.map(|d| d.as_secs()),
            };
            let created = c.create_trust_policy(&account, &req).await?;
            print(global, &created, |p| table(&header, vec![row(p)]));
        }
        TrustPolicyCmd::List { account } => {
            let items = c.list_trust_policies(&account).await?;
            print(global, &List::all(items), |l| table(&header, l.items.iter().map(row).collect()));
        }
        TrustPolicyCmd::Delete { account, id } => {
            c.delete_trust_policy(&account, &id).await?;
            print(global, &serde_json::json!({"deleted": id}), |_| format!("deleted trust policy {id}"));
        }
    }
    Ok(0)
}

async fn token(global: &Global, c: &Client, cmd: TokenCmd) -> anyhow::Result<i32> {
    match cmd {
        TokenCmd::Create { account, name } => {
            let account_id = AccountId::parse("--account", &account)?;
            let created = c.create_token(&TokenCreate { account_id, name }).await?;
            print(global, &created, |t| t.token.clone());
        }
        TokenCmd::Delete { id } => {
            c.delete_token(&id).await?;
            print(global, &serde_json::json!({"deleted": id}), |_| format!("revoked token {id}"));
        }
    }
    Ok(0)
}

async fn sandbox(global: &Global, c: &Client, cmd: SandboxCmd) -> anyhow::Result<i32> {
    let show = |s: &Sandbox| {
        let source = s
            .warm_pool_checkout
            .as_ref()
            .map(|co| format!(" source={}", if co.hit { "warm_pool" } else { "cold" }))
            .unwrap_or_default();
        format!("sandbox {} {} template={} build={}{source}", s.id, s.state.as_str(), s.template, s.build_id)
    };
    match cmd {
        SandboxCmd::Create {
            template,
            warm_pool,
            warm_pool_mode,
            warm_pool_wait,
            env,
            cwd,
            network,
            label,
        } => {
            let network = match network.as_deref() {
                None => None,
                Some("none") => Some(NetworkMode::None),
                Some("host") => Some(NetworkMode::Host),
                Some(_) => Some(NetworkMode::Isolated),
            };
            let req = SandboxCreate {
                template,
                warm_pool,
                warm_pool_mode: warm_pool_mode.map(|m| m.parse()).transpose().map_err(anyhow::Error::msg)?,
                warm_pool_wait_ms: warm_pool_wait.map(|d| d.as_millis() as u64),
                envs: (!env.is_empty()).then(|| env.into_iter().collect()),
                cwd,
                network: network.map(|mode| NetworkPolicy { mode }),
                labels: (!label.is_empty()).then(|| label.into_iter().collect()),
                ..Default::default()
            };
            let bar = spinner(global, "creating sandbox".into());
            let s = c.create_sandbox(&req).await;
            bar.finish_and_clear();
            print(global, &s?, show);
        }
        SandboxCmd::Exec { id, cwd, env, timeout, command } => {
            return super::sandbox_io::exec(global, c, &id, cwd, env, timeout, command).await;
        }
        SandboxCmd::Ps { id } => return super::sandbox_io::ps(global, c, &id).await,
        SandboxCmd::Kill { id, process, signal } => {
            return super::sandbox_io::kill(global, c, &id, &process, &signal).await
        }
        SandboxCmd::Cp { src, dst } => return super::sandbox_io::cp(global, c, &src, &dst).await,
        SandboxCmd::List => {
            let items = c.list_sandboxes().await?;
            print(global, &List::all(items), |l| {
                table(
                    &["ID", "STATE", "TEMPLATE", "BUILD"],
                    l.items
                        .iter()
                        .map(|s| {
                            vec![
                                s.id.to_string(),
                                s.state.as_str().into(),
                                s.template.clone(),
                                s.build_id.to_string(),
                            ]
                        })
                        .collect(),
                )
            });
        }
        SandboxCmd::Get { id } => print(global, &c.get_sandbox(&id).await?, show),
        SandboxCmd::Delete { id } => {
            c.delete_sandbox(&id).await?;
            print(global, &serde_json::json!({"deleted": id}), |_| format!("deleted sandbox {id}"));
        }
        SandboxCmd::Logs { id, tail } => {
            let items = match tail {
                Some(n) => c.logs_tail(&id, n).await?,
                None => c.logs(&id).await?,
            };
            print(global, &List::all(items), |l| {
                l.items
                    .iter()
                    .map(|line| format!("{} {} [{}] {}", line.ts, line.process, line.stream, line.data))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(0)
}

impl super::ScalingArgs {
    fn touches_autoscale(&self) -> bool {
        self.autoscale.is_some()
            || self.autoscale_headroom.is_some()
            || self.autoscale_window.is_some()
            || self.scale_to_zero_after.is_some()
    }

    /// The `autoscale` block these flags ask for, over `current` (None when they name none).
    fn autoscale(&self, current: Option<warmpool_api::Autoscale>) -> Option<warmpool_api::Autoscale> {
        if !self.touches_autoscale() {
            return None;
        }
        // Tuning flags alone on a create turn it on; on an update they keep its switch.
        let creating = current.is_none();
        let mut a = current.unwrap_or_default();
        a.enabled = match self.autoscale.as_deref() {
            Some(switch) => switch == "on",
            None => a.enabled || creating,
        };
        if let Some(h) = self.autoscale_headroom {
            a.headroom = Some(h);
        }
        if let Some(w) = self.autoscale_window {
            a.window_seconds = Some(w.as_secs());
        }
        if let Some(s) = self.scale_to_zero_after {
            a.scale_to_zero_after_seconds = Some(s.as_secs());
        }
        Some(a)
    }
}
