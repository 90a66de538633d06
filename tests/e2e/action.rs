//! The real `warmpool-action` binary against a real `warmpool serve` process, in a temp dir that plays the
//! runner: `INPUT_*` and context variables in, `GITHUB_OUTPUT` / `GITHUB_STATE` / `GITHUB_STEP_SUMMARY` files out,
//! `STATE_*` passed from main to post as the runner does. GitHub's API is a wiremock server.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use warmpool_action::runner::parse_key_values;
use warmpool_api::*;
use warmpool_testkit::{sibling_bin, TempServer};

/// A built template and a pool of it on `server` (`min_ready` 0, so only leases raise it).
async fn pool(server: &TempServer, name: &str, start_cmd: &str) -> WarmPool {
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "start_cmd": start_cmd,
            // The flag is named after the sandbox: the artifact keeps the build's own, which must not count.
            "readiness": {"exec": {"command": ["sh", "-c", "test -f ready.$WARMPOOL_SANDBOX_ID"]}, "timeout_ms": 20000}
        }))
        .unwrap();
    server.client.create_template(&spec).await.unwrap();
    let b = server.client.create_build(name, &["stable".into()]).await.unwrap();
    let b = server.client.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
    let spec = WarmPoolSpec {
        name: name.into(),
        template: format!("{name}:stable"),
        min_ready: 0,
        max_ready: 4,
        ..Default::default()
    };
    server.client.create_pool(&spec).await.unwrap()
}

const QUICK: &str = "touch ready.$WARMPOOL_SANDBOX_ID; exec sleep infinity";

/// A directory playing one job of a workflow run on a runner.
struct Job {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

struct StepResult {
    code: i32,
    stdout: String,
    outputs: HashMap<String, String>,
    state: HashMap<String, String>,
    summary: String,
}

impl Job {
    fn new(server: &TempServer, run_id: &str, job: &str) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let mut env = HashMap::new();
        for (k, v) in [
            ("GITHUB_REPOSITORY", "octo/app"),
            ("GITHUB_RUN_ID", run_id),
            ("GITHUB_RUN_ATTEMPT", "1"),
            ("GITHUB_JOB", job),
            ("INPUT_ENDPOINT", server.url.as_str()),
            ("INPUT_WAIT-TIMEOUT", "60s"),
        ] {
            env.insert(k.to_string(), v.to_string());
        }
        env.insert("INPUT_TOKEN".into(), server.token());
        Job { dir, env }
    }

    fn input(mut self, name: &str, value: &str) -> Job {
        self.env.insert(format!("INPUT_{}", name.to_uppercase()), value.to_string());
        self
    }

    /// Runs one step with fresh output/state/summary files, as the runner does for each step.
    fn step(&self, command: &str, extra: &HashMap<String, String>) -> StepResult {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let file = |kind: &str| self.dir.path().join(format!("{n}-{command}-{kind}"));
        let (out, state, summary) = (file("output"), file("state"), file("summary"));
        let mut cmd = Command::new(sibling_bin("warmpool-action"));
        cmd.arg(command).env_clear().env("PATH", std::env::var("PATH").unwrap());
        cmd.envs(&self.env).envs(extra);
        cmd.env("GITHUB_OUTPUT", &out).env("GITHUB_STATE", &state).env("GITHUB_STEP_SUMMARY", &summary);
        let result = cmd.output().unwrap();
        // The token never reaches the state file: any later step of the job can read it.
        let saved = std::fs::read_to_string(&state).unwrap_or_default();
        let secrets = ["INPUT_TOKEN", "INPUT_GITHUB-TOKEN"].map(|k| [self.env.get(k), extra.get(k)]);
        for secret in secrets.into_iter().flatten().flatten() {
            assert!(
                !secret.is_empty() && !saved.contains(secret.as_str()),
                "{command} saved the token in GITHUB_STATE"
            );
        }
        let read = |p: &Path| {
            parse_key_values(&std::fs::read_to_string(p).unwrap_or_default()).into_iter().collect()
        };
        StepResult {
            code: result.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&result.stdout).into_owned(),
            outputs: read(&out),
            state: read(&state),
            summary: std::fs::read_to_string(&summary).unwrap_or_default(),
        }
    }

    /// `post`, with the main step's state as `STATE_*` and, as the runner does, the step's `token` input (the
    /// only input post reads).
    fn post(&self, main: &StepResult) -> StepResult {
        let mut bare = Job { dir: tempfile::tempdir().unwrap(), env: HashMap::new() };
        bare.env.insert("GITHUB_REPOSITORY".into(), "octo/app".into());
        bare.env.insert("INPUT_TOKEN".into(), self.env["INPUT_TOKEN"].clone());
        let state = main.state.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())).collect();
        let r = bare.step("post", &state);
        // Keep the dir alive for the caller's inspection only as long as needed.
        drop(bare.dir);
        r
    }
}

fn ids(step: &StepResult) -> Vec<String> {
    serde_json::from_str(&step.outputs["sandboxes"]).unwrap()
}

#[tokio::test]
async fn main_raises_waits_checks_out_and_post_cleans_up() {
    let server = TempServer::start(&[]);
    let pool = pool(&server, "api", QUICK).await;
    let job =
        Job::new(&server, "100", "test").input("pools", "api\n").input("ready", "2").input("checkout", "2");
    let main = job.step("main", &HashMap::new());
    assert_eq!(main.code, 0, "{}", main.stdout);
    assert!(
        main.stdout.starts_with(&format!("::add-mask::{}\n", server.token())),
        "the token is masked first"
    );
    assert!(!main.state.contains_key("token"), "post takes the token from its input, not GITHUB_STATE");
    assert!(main.stdout.contains("::group::Waiting for 2 ready sandboxes"));
    let sandboxes = ids(&main);
    assert_eq!(sandboxes.len(), 2);
    assert_eq!(main.outputs["sandbox-ids"], sandboxes.join(" "));
    let report: serde_json::Value = serde_json::from_str(&main.outputs["report"]).unwrap();
    assert_eq!(
        (report[0]["pool"].as_str(), report[0]["hits"].as_u64(), report[0]["misses"].as_u64()),
        (Some("api"), Some(2), Some(0))
    );
    assert_eq!(report[0]["target"], 2);
    assert!(main.summary.contains("| api | 2 |"), "{}", main.summary);
    for id in &sandboxes {
        let s = server.client.get_sandbox(id).await.unwrap();
        assert_eq!(s.warm_pool_checkout.unwrap().mode, CheckoutMode::Require);
    }
    let leases = server.client.list_leases(&pool.id).await.unwrap();
    assert_eq!((leases[0].key.as_str(), leases[0].count), ("octo/app/100/1/test", 2));

    let post = job.post(&main);
    assert_eq!(post.code, 0, "{}", post.stdout);
    for id in &sandboxes {
        assert_eq!(server.client.get_sandbox(id).await.unwrap_err().code(), Some("not_found"));
    }
    assert!(server.client.list_leases(&pool.id).await.unwrap().is_empty());
    assert_eq!(server.client.get_pool(&pool.id).await.unwrap().state, PoolState::Draining);
    assert!(post.summary.contains(&format!("| {} | released | yes |", pool.id)), "{}", post.summary);
    // post is idempotent.
    let again = job.post(&main);
    assert_eq!(again.code, 0, "{}", again.stdout);
}

#[tokio::test]
async fn a_second_workflow_keeps_its_capacity_when_the_first_drains() {
    let server = TempServer::start(&[]);
    let pool = pool(&server, "shared", QUICK).await;
    let first = Job::new(&server, "1", "a").input("pools", "shared").input("ready", "1");
    let second = Job::new(&server, "2", "b").input("pools", "shared").input("ready", "2");
    let (m1, m2) = (first.step("main", &HashMap::new()), second.step("main", &HashMap::new()));
    assert_eq!((m1.code, m2.code), (0, 0), "{}\n{}", m1.stdout, m2.stdout);
    assert_eq!(server.client.pool_status(&pool.id).await.unwrap().target, 3);
    let p1 = first.post(&m1);
    assert_eq!(p1.code, 0);
    let status = server.client.pool_status(&pool.id).await.unwrap();
    assert_eq!((status.state, status.target), (PoolState::Enabled, 2), "the other lease keeps the pool up");
    assert!(p1.summary.contains(&format!("| {} | released | no |", pool.id)), "{}", p1.summary);
    let p2 = second.post(&m2);
    assert_eq!(p2.code, 0);
    assert_eq!(server.client.pool_status(&pool.id).await.unwrap().state, PoolState::Draining);
}

#[tokio::test]
async fn a_timeout_fails_with_an_annotation_and_post_still_cleans_up() {
    let server = TempServer::start(&[]);
    // Starts at once in the build (whose id is bld_…), takes 30 s in every sandbox.
    let slow = "case $WARMPOOL_SANDBOX_ID in bld_*) ;; *) sleep 30;; esac; touch ready.$WARMPOOL_SANDBOX_ID; exec sleep infinity";
    let pool = pool(&server, "slow", slow).await;
    let job =
        Job::new(&server, "7", "t").input("pools", "slow").input("ready", "1").input("wait-timeout", "1s");
    let main = job.step("main", &HashMap::new());
    assert_eq!(main.code, 1, "{}", main.stdout);
    let line = main
        .stdout
        .lines()
        .find(|l| l.starts_with("::error title=Warm pool slow not ready::"))
        .unwrap_or_else(|| panic!("{}", main.stdout));
    // The time actually waited: the timeout, give or take a status poll.
    assert!(line.contains("warm pool slow: 0 of 1 ready after 1.") && line.contains("warming 1"), "{line}");
    assert!(main.stdout.contains("::error title=warmpool::1 pool(s) not ready after 1."), "{}", main.stdout);
    assert_eq!(ids(&main), Vec::<String>::new());
    let post = job.post(&main);
    assert_eq!(post.code, 0);
    assert!(server.client.list_leases(&pool.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_pool_that_stops_filling_fails_at_once_with_the_reason_and_the_time_waited() {
    let server = TempServer::start(&[]);
    // The build's prewarm (bld_…) passes; every pool sandbox exits, so the pool trips artifact_prewarm_failed.
    let doomed = "case $WARMPOOL_SANDBOX_ID in bld_*) ;; *) echo doomed; exit 3;; esac; touch ready.$WARMPOOL_SANDBOX_ID; exec sleep infinity";
    pool(&server, "doomed", doomed).await;
    let job =
        Job::new(&server, "9", "t").input("pools", "doomed").input("ready", "1").input("wait-timeout", "5m");
    let started = std::time::Instant::now();
    let main = job.step("main", &HashMap::new());
    assert_eq!(main.code, 1, "{}", main.stdout);
    assert!(started.elapsed() < Duration::from_secs(120), "it waited out the timeout: {}", main.stdout);
    let last = main
        .stdout
        .lines()
        .find(|l| l.starts_with("::error title=warmpool::"))
        .unwrap_or_else(|| panic!("{}", main.stdout));
    assert!(!last.contains("wait-timeout"), "not a timeout: {last}");
    assert!(last.contains("stopped filling: doomed (artifact_prewarm_failed)"), "{last}");
    let waited = last.split("after ").nth(1).and_then(|r| r.split('s').next()).unwrap_or_default();
    let waited: f64 = waited.parse().unwrap_or_else(|_| panic!("the time waited in seconds: {last}"));
    assert!(waited <= started.elapsed().as_secs_f64() + 0.05, "rounded to tenths: {last}");
    assert_eq!(job.post(&main).code, 0);
}

#[tokio::test]
async fn require_mode_miss_fails_the_step_with_the_reason() {
    // Room for one sandbox: once it is checked out the pool cannot refill, so the second checkout misses.
    let server = TempServer::start(&["--max-sandboxes", "1"]);
    pool(&server, "tiny", QUICK).await;
    let job = Job::new(&server, "8", "t").input("pools", "tiny").input("ready", "1").input("checkout", "2");
    let main = job.step("main", &HashMap::new());
    assert_eq!(main.code, 1, "{}", main.stdout);
    assert!(
        main.stdout
            .contains("::error title=Warm pool tiny unavailable::warm_pool_unavailable (no_ready_inventory)"),
        "{}",
        main.stdout
    );
    assert_eq!(ids(&main).len(), 1);
    assert_eq!(job.post(&main).code, 0);
}

#[tokio::test]
async fn ready_auto_counts_the_runs_waiting_jobs_across_pages() {
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let github = MockServer::start().await;
    let route = "/repos/octo/app/actions/runs/55/attempts/1/jobs";
    let page1: Vec<serde_json::Value> = (0..100)
        .map(|i| serde_json::json!({"id": i, "status": if i < 2 { "in_progress" } else if i < 50 { "completed" } else { "queued" }}))
        .collect();
    let page2 = vec![
        serde_json::json!({"id": 100, "status": "queued"}),
        serde_json::json!({"id": 101, "status": "some_future_status"}),
    ];
    Mock::given(method("GET"))
        .and(path(route))
        .and(query_param("page", "1"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"total_count": 102, "jobs": page1})),
        )
        .expect(1)
        .mount(&github)
        .await;
    Mock::given(method("GET"))
        .and(path(route))
        .and(query_param("page", "2"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(serde_json::json!({"total_count": 102, "jobs": page2})),
        )
        .expect(1)
        .mount(&github)
        .await;
    let server = TempServer::start(&[]);
    let pool = pool(&server, "auto", QUICK).await;
    server
        .client
        .update_pool("auto", &WarmPoolPatch { max_ready: Some(100), ..Default::default() })
        .await
        .unwrap();
    let job = Job::new(&server, "55", "plan")
        .input("pools", "auto")
        .input("ready", "auto")
        .input("github-token", "ghs_secret")
        .input("wait-timeout", "1ms");
    let mut extra = HashMap::new();
    extra.insert("GITHUB_API_URL".to_string(), github.uri());
    let main = job.step("main", &extra);
    assert!(main.stdout.contains("::add-mask::ghs_secret"));
    assert!(main.stdout.contains("ready: auto → 53 queued or running jobs"), "{}", main.stdout);
    let lease = &server.client.list_leases(&pool.id).await.unwrap()[0];
    assert_eq!(lease.count, 53, "2 in progress + 50 queued + 1 queued on page 2");
    assert_eq!(job.post(&main).code, 0);
}

#[tokio::test]
async fn cross_job_sub_actions_share_one_lease() {
    let server = TempServer::start(&[]);
    let pool = pool(&server, "burst", QUICK).await;
    let key = "octo/app/9/1";
    let setup = Job::new(&server, "9", "setup").input("pools", "burst").input("ready", "2");
    let up = setup.step("scale-up", &HashMap::new());
    assert_eq!(up.code, 0, "{}", up.stdout);
    assert!(up.state.is_empty(), "scale-up leaves nothing for a post step");
    assert_eq!(server.client.list_leases(&pool.id).await.unwrap()[0].key, key);
    let worker = Job::new(&server, "9", "worker").input("pools", "burst").input("checkout", "1");
    let got = worker.step("checkout", &HashMap::new());
    assert_eq!(got.code, 0, "{}", got.stdout);
    let sandbox = ids(&got).remove(0);
    let last = Job::new(&server, "9", "cleanup").input("pools", "burst").input("sandboxes", &sandbox);
    let drained = last.step("drain", &HashMap::new());
    assert_eq!(drained.code, 0, "{}", drained.stdout);
    assert_eq!(server.client.get_sandbox(&sandbox).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(server.client.get_pool(&pool.id).await.unwrap().state, PoolState::Draining);
}

/// The node shim finds the binary, passes stdio and the exit code through, and verifies a downloaded binary's
/// checksum.
#[tokio::test]
async fn node_shim_runs_and_verifies_downloads() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is required for the shim test (apt-get install nodejs)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../action");
    let bin = sibling_bin("warmpool-action");
    let bin = bin.as_path();
    let out =
        Command::new("node").arg(root.join("shim/post.js")).env("WARMPOOL_ACTION_BIN", bin).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Nothing to clean up"));
    let out = Command::new("node")
        .arg(root.join("shim/drain.js"))
        .env("WARMPOOL_ACTION_BIN", bin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "exit codes pass through");

    // `main` puts the `warmpool` CLI on the PATH of the job's later steps.
    let runner = tempfile::tempdir().unwrap();
    let github_path = runner.path().join("github_path");
    let out = Command::new("node")
        .arg(root.join("shim/main.js"))
        .env("WARMPOOL_ACTION_BIN", bin)
        .env("WARMPOOL_CLI_BIN", bin) // any executable stands in for the CLI
        .env("GITHUB_PATH", &github_path)
        .env("RUNNER_TOOL_CACHE", runner.path())
        .output()
        .unwrap();
    let added = std::fs::read_to_string(&github_path).unwrap_or_default();
    let cli = Path::new(added.trim()).join("warmpool");
    assert_eq!(
        std::fs::read(&cli).ok(),
        std::fs::read(bin).ok(),
        "{added:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let releases = MockServer::start().await;
    let bytes = std::fs::read(bin).unwrap();
    let platform = String::from_utf8(
        Command::new("node")
            .args(["-e", "console.log(require(process.argv[1]).platform())"])
            .arg(root.join("shim/run.js"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let asset = format!("/v0.1.0/warmpool-action-{}", platform.trim());
    let good = {
        use std::fmt::Write;
        let digest = Command::new("sha256sum").arg(bin).output().unwrap();
        let mut s = String::new();
        write!(s, "{}", String::from_utf8_lossy(&digest.stdout).split_whitespace().next().unwrap()).unwrap();
        s
    };
    Mock::given(path(asset.clone()))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(bytes))
        .mount(&releases)
        .await;
    Mock::given(path(format!("{asset}.sha256")))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{good}  warmpool-action\n")))
        .mount(&releases)
        .await;
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .arg(root.join("shim/post.js"))
        .env("WARMPOOL_ACTION_RELEASES", releases.uri())
        .env("RUNNER_TOOL_CACHE", cache.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Nothing to clean up"));

    let bad = MockServer::start().await;
    Mock::given(path(asset.clone()))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"not the binary".to_vec()))
        .mount(&bad)
        .await;
    Mock::given(path(format!("{asset}.sha256")))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{good}\n")))
        .mount(&bad)
        .await;
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .arg(root.join("shim/post.js"))
        .env("WARMPOOL_ACTION_RELEASES", bad.uri())
        .env("RUNNER_TOOL_CACHE", cache.path())
        .env("PATH", "/usr/bin:/bin") // no cargo: the fallback fails too
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("checksum mismatch"), "{stdout}");
    assert_ne!(out.status.code(), Some(0));
}

/// The runner's ID-token endpoint (`ACTIONS_ID_TOKEN_REQUEST_URL`): answers `{"value": <jwt>}` for the
/// audience asked, to the request token only, signed by the test's issuer.
async fn id_token_endpoint(
    issuer: &warmpool_testkit::oidc::TestIssuer,
    request_token: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::extract::Query;
    use axum::http::{HeaderMap, StatusCode};
    let key = issuer.key("k1");
    let claims = issuer.claims("", "octo/app", "refs/heads/main");
    let audiences = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = audiences.clone();
    let handler = move |headers: HeaderMap, Query(q): Query<HashMap<String, String>>| {
        let (key, mut claims, seen) = (key.clone(), claims.clone(), seen.clone());
        async move {
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if auth != format!("bearer {request_token}")
                || q.get("api-version").map(String::as_str) != Some("2.0")
            {
                return Err(StatusCode::UNAUTHORIZED);
            }
            let audience = q.get("audience").cloned().unwrap_or_default();
            seen.lock().unwrap().push(audience.clone());
            claims["aud"] = audience.into();
            Ok(axum::Json(serde_json::json!({"value": key.sign(&claims)})))
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/idtoken?api-version=2.0", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().route("/idtoken", axum::routing::get(handler)))
            .await
            .unwrap();
    });
    (url, audiences)
}

// Multi-threaded: the issuer and the ID-token endpoint answer while a step blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_job_authenticates_with_oidc() {
    let issuer = warmpool_testkit::oidc::TestIssuer::start().await;
    let server = TempServer::start(&["--oidc-issuer", &issuer.url]);
    let policy = TrustPolicyCreate {
        name: "app-main".into(),
        issuer: issuer.url.clone(),
        audience: "warmpool-ci".into(),
        claims: [("repository".to_string(), "octo/app".to_string()), ("ref".into(), "refs/heads/*".into())]
            .into(),
        token_ttl_seconds: None,
    };
    server.client.create_trust_policy("acc_default", &policy).await.unwrap();
    let pool = pool(&server, "api", QUICK).await;
    const REQUEST_TOKEN: &str = "runner-request-token";
    let (id_url, audiences) = id_token_endpoint(&issuer, REQUEST_TOKEN).await;

    let mut job = Job::new(&server, "300", "test").input("pools", "api").input("ready", "1");
    job.env.remove("INPUT_TOKEN");
    job.env.insert("INPUT_OIDC-AUDIENCE".into(), "warmpool-ci".into());
    let oidc_env = HashMap::from([
        ("ACTIONS_ID_TOKEN_REQUEST_URL".to_string(), id_url.clone()),
        ("ACTIONS_ID_TOKEN_REQUEST_TOKEN".to_string(), REQUEST_TOKEN.to_string()),
    ]);
    let github_env = job.dir.path().join("github-env");
    let mut extra = oidc_env.clone();
    extra.insert("GITHUB_ENV".into(), github_env.display().to_string());
    let main = job.step("main", &extra);
    assert_eq!(main.code, 0, "{}", main.stdout);
    assert_eq!(*audiences.lock().unwrap(), ["warmpool-ci"], "the ID token is asked for the input's audience");

    // The exchanged token reaches later steps through GITHUB_ENV, masked first, and never the state file.
    let exported = parse_key_values(&std::fs::read_to_string(&github_env).unwrap());
    let [(name, token)] = exported.as_slice() else { panic!("{exported:?}") };
    assert_eq!(name, "WARMPOOL_TOKEN");
    assert!(token.starts_with("wpt_"), "{token}");
    assert!(main.stdout.starts_with(&format!("::add-mask::{REQUEST_TOKEN}\n")), "{}", main.stdout);
    let mask = format!("::add-mask::{token}\n");
    let masked_at = main.stdout.find(&mask).expect("the exchanged token is masked");
    assert_eq!(main.stdout.matches(token.as_str()).count(), 1, "printed only inside its mask command");
    assert!(main.stdout[..masked_at].matches("::add-mask::").count() == 2, "request token, then ID token");
    assert!(main.state.values().all(|v| !v.contains("wpt_") && !v.contains("eyJ")), "{:?}", main.state);
    let later_step = warmpool_client::Client::new(&server.url, Some(token.clone())).unwrap();
    assert_eq!(later_step.get_pool("api").await.unwrap().id, pool.id, "it acts as the policy's account");

    // post has no token either: it exchanges a new ID token (the state names the audience, not a secret).
    let mut bare = Job { dir: tempfile::tempdir().unwrap(), env: oidc_env.clone() };
    bare.env.insert("GITHUB_REPOSITORY".into(), "octo/app".into());
    let state: HashMap<String, String> =
        main.state.iter().map(|(k, v)| (format!("STATE_{k}"), v.clone())).collect();
    let post = bare.step("post", &state);
    assert_eq!(post.code, 0, "{}", post.stdout);
    assert_eq!(audiences.lock().unwrap().len(), 2, "post asked for its own ID token");
    assert!(server.client.list_leases(&pool.id).await.unwrap().is_empty(), "post released the lease");

    // A job with neither a token nor `id-token: write` is told what to grant.
    let mut no_auth = Job::new(&server, "301", "test").input("pools", "api");
    no_auth.env.remove("INPUT_TOKEN");
    let failed = no_auth.step("main", &HashMap::new());
    assert_eq!(failed.code, 1);
    assert!(failed.stdout.contains("id-token: write"), "{}", failed.stdout);
    // A policy's audience must match: another audience is refused by the server, naming the check.
    let mut wrong = Job::new(&server, "302", "test").input("pools", "api");
    wrong.env.remove("INPUT_TOKEN");
    let failed = wrong.step("main", &oidc_env);
    assert_eq!(failed.code, 1);
    assert!(failed.stdout.contains("audience"), "{}", failed.stdout);
}

/// The steps of `examples/github/ci-burst.yml`, as the runner would run them, on a small repository with a passing
/// and a failing shard: the action step fails, the summary shows every shard, the reports come back from all of
/// them, and post cleans up.
#[tokio::test]
async fn the_ci_burst_example_tests_the_checkout_in_its_sandboxes() {
    let server = TempServer::start(&[]);
    pool(&server, "api", QUICK).await;
    let workflow = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/github/ci-burst.yml"),
    )
    .unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&workflow).unwrap()[0];
    let steps = doc["jobs"]["test"]["steps"].as_vec().unwrap();
    let step = steps
        .iter()
        .find(|s| s["uses"].as_str().is_some_and(|u| u.contains("warmpool/action")))
        .expect("the workflow uses the action");

    // The job's checkout: a test script whose shard 1 fails, writing a report either way.
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("src")).unwrap();
    std::fs::write(repo.path().join("src/lib.txt"), "the code under test\n").unwrap();
    let script = "#!/bin/sh\nmkdir -p reports\n\
        echo \"shard $WARMPOOL_SHARD_INDEX of $WARMPOOL_SHARD_TOTAL, args $*\" > reports/result.txt\n\
        cat src/lib.txt >> reports/result.txt\n\
        echo \"testing shard $WARMPOOL_SHARD_INDEX\"\n\
        if [ \"$WARMPOOL_SHARD_INDEX\" = 1 ]; then echo 'FAIL: test_b' >&2; exit 1; fi\n\
        echo 'ok: test_a'\n";
    std::fs::write(repo.path().join("run-tests.sh"), script).unwrap();
    std::fs::set_permissions(
        repo.path().join("run-tests.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let mut job = Job::new(&server, "300", "test");
    for (name, value) in step["with"].as_hash().unwrap() {
        let name = name.as_str().unwrap();
        let value = match value {
            yaml_rust2::Yaml::Integer(i) => i.to_string(),
            other => other.as_str().unwrap().to_string(),
        };
        // The workflow's endpoint is a repository variable; here it is the test's server.
        let value = if value.contains("${{") { server.url.clone() } else { value };
        job = job.input(name, &value);
    }
    job.env.insert("GITHUB_WORKSPACE".into(), repo.path().display().to_string());
    let main = job.step("main", &HashMap::new());
    assert_eq!(main.code, 1, "a failing shard fails the step: {}", main.stdout);
    let sandboxes = ids(&main);
    assert_eq!(sandboxes.len(), 3);
    for n in 0..3 {
        assert!(
            main.stdout.contains(&format!("[{n}] testing shard {n}\n")),
            "live output of shard {n}: {}",
            main.stdout
        );
        let report =
            std::fs::read_to_string(repo.path().join(format!("warmpool-results/{n}/reports/result.txt")))
                .unwrap_or_else(|e| panic!("report of shard {n}: {e}\n{}", main.stdout));
        assert_eq!(report, format!("shard {n} of 3, args --shard {n} --of 3\nthe code under test\n"));
    }
    assert!(main.stdout.contains("[1] FAIL: test_b"), "{}", main.stdout);
    assert!(main.stdout.contains("::error title=Shard 1 failed::"), "{}", main.stdout);
    assert!(main.summary.contains(&format!("| 0 | {} | 0 |", sandboxes[0])), "{}", main.summary);
    assert!(main.summary.contains(&format!("| 1 | {} | 1 |", sandboxes[1])), "{}", main.summary);
    assert!(main.summary.contains(&format!("| 2 | {} | 0 |", sandboxes[2])), "{}", main.summary);

    let post = job.post(&main);
    assert_eq!(post.code, 0, "{}", post.stdout);
    for id in &sandboxes {
        assert_eq!(server.client.get_sandbox(id).await.unwrap_err().code(), Some("not_found"));
    }
}
