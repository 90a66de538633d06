//! The `warmpool` CLI against a real server process: the quickstart of the README, `--json`, errors and exit codes.

use std::process::Command;

use crate::harness::*;

struct Cli<'a> {
    url: &'a str,
    data_dir: &'a std::path::Path,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_warmpool"))
            .args(args)
            .env("WARMPOOL_ENDPOINT", self.url)
            .env("WARMPOOL_DATA_DIR", self.data_dir)
            .env_remove("WARMPOOL_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let (code, out, err) = self.run(&all);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed non-JSON ({e}): {out}"))
    }
}

#[tokio::test]
async fn quickstart_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let server = ServerProcess::start(tmp.path(), &[]);
    let cli = Cli { url: &server.url, data_dir: tmp.path() };
    let spec = tmp.path().join("template.json");
    std::fs::write(&spec, serde_json::to_string(&quick_template("api")).unwrap()).unwrap();

    let t = cli.json(&["template", "create", "-f", spec.to_str().unwrap()]);
    assert!(t["id"].as_str().unwrap().starts_with("tpl_"));
    let b = cli.json(&["template", "build", "api", "--tag", "stable", "--wait"]);
    assert_eq!(b["status"], "ready");
    let builds = cli.json(&["template", "builds", "api"]);
    assert_eq!(builds["items"][0]["id"], b["id"]);
    let (code, out, _) = cli.run(&["template", "builds", "api"]);
    assert!(code == 0 && out.contains("ready") && out.contains("stable"), "{out}");
    let s = cli.json(&["sandbox", "create", "--template", "api:stable"]);
    assert_eq!(s["state"], "running");
    let id = s["id"].as_str().unwrap().to_string();
    let (code, out, err) = cli.run(&["sandbox", "exec", &id, "--", "echo", "hi"]);
    assert_eq!((code, out.as_str()), (0, "hi\n"), "{err}");
    let (code, _, _) = cli.run(&["sandbox", "exec", &id, "--", "sh", "-c", "exit 3"]);
    assert_eq!(code, 3, "exec exits with the command's code");
    let list = cli.json(&["sandbox", "list"]);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    let p = cli.json(&[
        "pool",
        "create",
        "--name",
        "api",
        "--template",
        "api:stable",
        "--min-ready",
        "1",
        "--max-ready",
        "2",
    ]);
    assert_eq!(p["version_policy"], "track_tag");
    let st = cli.json(&["pool", "wait", "api", "--ready", "1", "--timeout", "60s"]);
    assert_eq!(st["ready"], 1);
    let hit = cli.json(&["sandbox", "create", "--warm-pool", "api", "--warm-pool-mode", "require"]);
    assert_eq!(hit["warm_pool_checkout"]["hit"], true);
    let lease = cli.json(&["pool", "lease", "api", "--key", "job/1", "--count", "1", "--ttl", "10m"]);
    assert_eq!(lease["count"], 1);
    let released = cli.json(&["pool", "release", "api", "--key", "job/1", "--drain-if-last"]);
    assert_eq!(released["drained"], true);
    let (code, out, _) = cli.run(&["pool", "status", "api"]);
    assert_eq!(code, 0);
    assert!(out.contains("state=draining"), "{out}");
    // Demand with its arithmetic: one claim (a hit) in the window; the rate used is the larger of the window's
    // (1 in 600 s) and the recent one (which depends on the claim's age).
    assert!(out.contains("demand: 0.1 claims/min over 600 s (recent "), "{out}");
    assert!(out.contains("/min), hit ratio 100.0 % (1/1)"), "{out}");
    let number = |after: &str, until: &str| -> f64 {
        out.split(after).nth(1).and_then(|r| r.split(until).next()).unwrap().parse().unwrap()
    };
    let (recent, used) = (number("(recent ", "/min)"), number("recommended_ready = ceil(", "/s × "));
    // Both are rounded for display (0.1/min and 0.001/s).
    assert!((used - (recent / 60.0).max(1.0 / 600.0)).abs() < 0.002, "{out}");
    let p = cli.json(&[
        "pool",
        "update",
        "api",
        "--autoscale",
        "on",
        "--scale-to-zero-after",
        "15m",
        "--max-starts-per-second",
        "5",
    ]);
    assert_eq!(p["autoscale"], serde_json::json!({"enabled": true, "scale_to_zero_after_seconds": 900}));
    assert_eq!(p["max_starts_per_second"], 5.0);
    let p = cli.json(&[
        "pool",
        "update",
        "api",
        "--autoscale-headroom",
        "2",
        "--max-starts-per-second",
        "unlimited",
    ]);
    assert_eq!(p["autoscale"]["enabled"], true, "tuning keeps the switch");
    assert_eq!(p["autoscale"]["headroom"], 2.0);
    assert_eq!(p["max_starts_per_second"], serde_json::Value::Null);
    let st = cli.json(&["pool", "status", "api"]);
    assert_eq!(st["demand"]["claims"], 1);

    let (code, out, err) = cli.run(&["sandbox", "get", "sbx_missing"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    assert!(err.starts_with("error: not_found: "), "{err}");
    let (code, _, err) = cli.run(&["sandbox", "create", "--template", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid_request") && err.contains("template"), "{err}");

    let dir = tmp.path().join("sandboxes").join(&id);
    assert!(dir.exists());
    let (code, _, _) = cli.run(&["sandbox", "delete", &id]);
    assert_eq!(code, 0);
    assert!(!dir.exists());
    for item in cli.json(&["sandbox", "list"])["items"].as_array().unwrap() {
        cli.run(&["sandbox", "delete", item["id"].as_str().unwrap()]);
    }
    cli.run(&["pool", "delete", "api"]);
    wait_no_procd(tmp.path());
}

/// The Rust client example (`client/examples/quickstart.rs`) runs against a real server.
#[tokio::test]
async fn rust_client_example_runs() {
    let cp = TestControlPlane::start().await;
    let example = warmpool_testkit::sibling_bin("examples/quickstart");
    let token = std::fs::read_to_string(cp.dir.path().join("admin.token")).unwrap();
    let out = tokio::process::Command::new(example)
        .env("WARMPOOL_ENDPOINT", &cp.url)
        .env("WARMPOOL_TOKEN", token.trim())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("hello from a warm sandbox") && stdout.contains("hit: true"), "{stdout}");
    assert!(cp.client.list_templates().await.unwrap().is_empty(), "the example cleans up");
}

#[tokio::test]
async fn accounts_and_tokens_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    // The server makes its layers filesystem even when no sandbox runs.
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let server = ServerProcess::start(tmp.path(), &[]);
    let cli = Cli { url: &server.url, data_dir: tmp.path() };
    let account = cli.json(&["account", "create", "ci", "--max-sandboxes", "2"]);
    let id = account["id"].as_str().unwrap().to_string();
    // The quota left out takes the server's --default-quotas.
    assert_eq!(
        (account["quotas"]["max_sandboxes"].as_u64(), account["quotas"]["max_warm_sandboxes"].as_u64()),
        (Some(2), Some(50))
    );
    assert_eq!(account["allow_host_network"], false);
    let (code, out, _) = cli.run(&["account", "list"]);
    assert!(
        code == 0 && out.lines().any(|l| l.starts_with(&id) && l.contains(" ci ") && l.contains(" 2 ")),
        "{out}"
    );
    let updated = cli.json(&["account", "quotas", &id, "--max-warm-sandboxes", "5"]);
    assert_eq!(
        (updated["quotas"].get("max_sandboxes"), updated["quotas"]["max_warm_sandboxes"].as_u64()),
        (None, Some(5))
    );

    // The token works for its account only, and stops working when revoked.
    let (code, secret, _) = cli.run(&["token", "create", "--account", &id, "--name", "github"]);
    assert_eq!(code, 0);
    let client = warmpool_client::Client::new(&server.url, Some(secret.trim().to_string())).unwrap();
    assert!(client.list_templates().await.unwrap().is_empty());
    assert!(client.list_accounts().await.is_err(), "an account token is not an admin token");
    let created = cli.json(&["token", "create", "--account", &id]);
    let (code, out, _) = cli.run(&["token", "delete", created["id"].as_str().unwrap()]);
    assert!(code == 0 && out.contains("revoked"), "{out}");
    let revoked =
        warmpool_client::Client::new(&server.url, Some(created["token"].as_str().unwrap().into())).unwrap();
    assert_eq!(revoked.list_templates().await.unwrap_err().code(), Some("unauthorized"));

    let (code, _, err) = cli.run(&["account", "create", "Not A Name"]);
    assert!(code != 0 && err.contains("name"), "{err}");
}

/// Runs the CLI with its stdout a pipe whose reading end is already closed, as `warmpool … | head -0` does.
fn run_into_closed_pipe(url: &str, data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_warmpool"))
        .args(args)
        .env("WARMPOOL_ENDPOINT", url)
        .env("WARMPOOL_DATA_DIR", data_dir)
        .env_remove("WARMPOOL_TOKEN")
        .stdout(writer)
        .output()
        .unwrap()
}

#[tokio::test]
async fn pool_wait_and_status_say_why_a_pool_does_not_fill_and_a_closed_stdout_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;

    let tmp = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let server = ServerProcess::start(tmp.path(), &["--allow-unlimited-disk"]);
    let cli = Cli { url: &server.url, data_dir: tmp.path() };
    let spec = tmp.path().join("template.json");
    // The build's prewarm (its id is bld_…) passes; every pool sandbox prints a line and exits. The readiness file
    // is named by the sandbox: the artifact keeps what the prewarm wrote, and a shared name would let a pool
    // sandbox pass readiness before its start command exits.
    let mut template = quick_template("doomed");
    template.start_cmd = Some(
        "case $WARMPOOL_SANDBOX_ID in bld_*) ;; *) echo doomed-start-output; exit 3;; esac; \
         touch ready-$WARMPOOL_SANDBOX_ID; exec sleep infinity"
            .into(),
    );
    template.readiness = Some(
        serde_json::from_value(serde_json::json!(
            {"exec": {"command": ["sh", "-c", "test -f ready-$WARMPOOL_SANDBOX_ID"]}, "timeout_ms": 10000}
        ))
        .unwrap(),
    );
    std::fs::write(&spec, serde_json::to_string(&template).unwrap()).unwrap();
    cli.json(&["template", "create", "-f", spec.to_str().unwrap()]);
    let b = cli.json(&["template", "build", "doomed", "--tag", "stable", "--wait"]);
    assert_eq!(b["status"], "ready");
    std::fs::write(&spec, serde_json::to_string(&quick_template("api")).unwrap()).unwrap();
    cli.json(&["template", "create", "-f", spec.to_str().unwrap()]);
    cli.json(&["template", "build", "api", "--tag", "stable", "--wait"]);
    // "off" holds nothing ready when it is disabled, so a wait for one can only end by saying why.
    for (name, template, min) in [("doomed", "doomed:stable", "1"), ("off", "api:stable", "0")] {
        let args = [
            "pool",
            "create",
            "--name",
            name,
            "--template",
            template,
            "--min-ready",
            min,
            "--max-ready",
            "1",
        ];
        cli.json(&args);
    }

    // A pool that cannot fill: the wait stops at once, and the status shows the failed start's output once.
    let (code, _, err) = cli.run(&["pool", "wait", "doomed", "--ready", "1", "--timeout", "2m"]);
    assert_eq!(code, 1);
    assert!(err.contains("artifact_prewarm_failed"), "{err}");
    let (code, out, _) = cli.run(&["pool", "status", "doomed"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("doomed-start-output").count(), 1, "the output is shown once:\n{out}");

    // A disabled pool does not fill either: the wait says so at once instead of waiting out --timeout.
    cli.json(&["pool", "disable", "off"]);
    let started = std::time::Instant::now();
    let (code, _, err) = cli.run(&["pool", "wait", "off", "--ready", "1", "--timeout", "2m"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("disabled") && err.contains("enable"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "it waited {:?}", started.elapsed());

    // A reader that goes away (`| head -1`) ends every command quietly: no panic, no "Broken pipe" error; the
    // exit is the conventional one of a Unix tool killed by SIGPIPE (141 in a shell).
    for args in [
        &["pool", "status", "doomed"][..],
        &["pool", "list"],
        &["pool", "get", "off", "--json"],
        &["template", "builds", "api"],
    ] {
        let out = run_into_closed_pipe(&server.url, tmp.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{args:?}: {:?}\n{stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");
    }
    cli.run(&["pool", "delete", "doomed"]);
    cli.run(&["pool", "delete", "off"]);
    wait_no_procd(tmp.path());
}

#[tokio::test]
async fn trust_policies_through_the_cli() {
    let issuer = warmpool_testkit::oidc::TestIssuer::start().await;
    let tmp = tempfile::tempdir().unwrap();
    // The server makes its layers filesystem even when no sandbox runs.
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let server = ServerProcess::start(tmp.path(), &["--oidc-issuer", &issuer.url]);
    let cli = Cli { url: &server.url, data_dir: tmp.path() };
    let account = cli.json(&["account", "create", "ci"]);
    let acc = account["id"].as_str().unwrap().to_string();
    let created = cli.json(&[
        "trust-policy",
        "create",
        "--account",
        &acc,
        "--name",
        "main",
        "--issuer",
        &issuer.url,
        "--audience",
        "warmpool",
        "--claim",
        "repository=octo-org/app",
        "--claim",
        "ref=refs/heads/main",
        "--ttl",
        "15m",
    ]);
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("trp_"), "{created}");
    assert_eq!(
        created["claims"],
        serde_json::json!({"repository": "octo-org/app", "ref": "refs/heads/main"})
    );
    assert_eq!(created["token_ttl_seconds"], 900);
    let (code, out, _) = cli.run(&["trust-policy", "list", "--account", &acc]);
    assert!(
        code == 0 && out.lines().any(|l| l.starts_with(&id) && l.contains("repository=octo-org/app")),
        "{out}"
    );

    // What it admits gets a token of the account.
    let token = issuer.token(&issuer.claims("warmpool", "octo-org/app", "refs/heads/main"));
    let anonymous = warmpool_client::Client::new(&server.url, None).unwrap();
    assert_eq!(anonymous.exchange_oidc(&token).await.unwrap().account_id, acc);

    // The server's refusal names the field; the CLI exits non-zero with it.
    let create_bad = |extra: &[&str]| {
        let base = [
            "trust-policy",
            "create",
            "--account",
            &acc,
            "--name",
            "bad",
            "--issuer",
            &issuer.url,
            "--audience",
            "warmpool",
        ];
        cli.run(&[&base[..], extra].concat())
    };
    let (code, _, err) = create_bad(&["--claim", "=x"]);
    assert!(code != 0 && err.contains("claims"), "{err}");
    let (code, _, err) = create_bad(&["--claim", "ref=*", "--ttl", "7h"]);
    assert!(code != 0 && err.contains("token_ttl_seconds"), "{err}");

    let (code, out, _) = cli.run(&["trust-policy", "delete", "--account", &acc, &id]);
    assert!(code == 0 && out.contains("deleted"), "{out}");
    assert!(cli.json(&["trust-policy", "list", "--account", &acc])["items"].as_array().unwrap().is_empty());
    let err = anonymous.exchange_oidc(&token).await.unwrap_err();
    assert_eq!(err.code(), Some("unauthorized"));
}
