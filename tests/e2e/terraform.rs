//! The real `terraform` binary (offline, through `dev_overrides`, no `terraform init`) driving the real provider
//! against a real `warmpool serve` process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use warmpool_api::*;
use warmpool_testkit::oidc::TestIssuer;
use warmpool_testkit::{procd_pids, sibling_bin, TempServer};

fn require_terraform() {
    let ok = Command::new("terraform").arg("version").output().is_ok_and(|o| o.status.success());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    assert!(
        ok,
        "the terraform binary is not on PATH on machine {}: these tests need Terraform >= 1.0",
        host.trim()
    );
}

/// A real `warmpool serve` and a Terraform CLI configuration that loads the freshly built provider.
struct Server(TempServer);

impl std::ops::Deref for Server {
    type Target = TempServer;
    fn deref(&self) -> &TempServer {
        &self.0
    }
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// With extra `warmpool serve` arguments (`--oidc-issuer URL`).
    fn start_with(args: &[&str]) -> Server {
        let server = TempServer::start(args);
        let provider_dir = sibling_bin("terraform-provider-warmpool").parent().unwrap().to_path_buf();
        std::fs::write(
            server.dir.path().join("terraform.rc"),
            format!(
                "provider_installation {{\n  dev_overrides {{ \"warmpool/warmpool\" = \"{}\" }}\n  direct {{}}\n}}\n",
                provider_dir.display()
            ),
        )
        .unwrap();
        Server(server)
    }

    /// A working directory holding a copy of `example` (or nothing).
    fn workdir(&self, name: &str, example: Option<&str>) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(example) = example {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/terraform").join(example);
            for entry in std::fs::read_dir(src).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        dir
    }

    /// Runs terraform in `dir`; returns (exit code, stdout, stderr).
    fn tf(&self, dir: &Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new("terraform")
            .args(args)
            .arg("-no-color")
            .current_dir(dir)
            .env("TF_CLI_CONFIG_FILE", self.dir.path().join("terraform.rc"))
            .env("CHECKPOINT_DISABLE", "1")
            .env("RUST_LIB_BACKTRACE", "0")
            .env("RUST_BACKTRACE", "0")
            .env("TF_IN_AUTOMATION", "1")
            .env("WARMPOOL_ENDPOINT", &self.url)
            .env("WARMPOOL_TOKEN", self.token())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let (code, out, err) = self.tf(dir, args);
        assert_eq!(code, 0, "terraform {args:?} failed:\n{out}\n{err}");
        out
    }

    fn procd_count(&self) -> usize {
        procd_pids(self.dir.path()).len()
    }
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn quickstart_lifecycle_drift_import_and_destroy() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("quickstart", Some("quickstart"));
    let out = server.ok(&dir, &["apply", "-auto-approve"]);
    assert!(out.contains("ready = 2"), "{out}");
    let pool = server.client.get_pool("api").await.unwrap();
    let status = server.client.pool_status(&pool.id).await.unwrap();
    assert!(status.ready >= 2, "{status:?}");
    let first_build = pool.resolved_build_id.clone().unwrap();
    assert_eq!(server.tf(&dir, &["plan", "-detailed-exitcode"]).0, 0, "a second plan shows no changes");

    // A spec change: a new build, the tag moves, the pool rolls to a new generation.
    server.ok(
        &dir,
        &["apply", "-auto-approve", "-var", "start_cmd=echo v2 > v; touch /tmp/started; exec sleep infinity"],
    );
    let tags = server.client.list_tags("api").await.unwrap();
    assert_ne!(tags[0].build_id, first_build, "the tag moved to the new build");
    wait_for("the rollout", async || {
        server.client.pool_status(&pool.id).await.unwrap().rollout_generation >= 2
    })
    .await;
    let v2 = ["-var", "start_cmd=echo v2 > v; touch /tmp/started; exec sleep infinity"];

    // enabled = false disables the pool.
    let mut args = vec!["apply", "-auto-approve", "-var", "pool_enabled=false"];
    args.extend(v2);
    server.ok(&dir, &args);
    assert_eq!(server.client.get_pool(&pool.id).await.unwrap().state, PoolState::Disabled);

    // Drift: a change made outside Terraform shows up, and apply corrects it.
    server
        .client
        .update_pool(&pool.id, &WarmPoolPatch { min_ready: Some(1), ..Default::default() })
        .await
        .unwrap();
    let mut plan = vec!["plan", "-detailed-exitcode", "-var", "pool_enabled=false"];
    plan.extend(v2);
    let (code, out, _) = server.tf(&dir, &plan);
    assert_eq!(code, 2, "drift is detected: {out}");
    assert!(out.contains("min_ready") && out.contains("1 -> 2"), "{out}");
    server.ok(&dir, &args);
    assert_eq!(server.client.get_pool(&pool.id).await.unwrap().min_ready, 2);
    assert_eq!(server.tf(&dir, &plan).0, 0);

    // Import by id with generated configuration plans clean.
    let template = server.client.get_template("api").await.unwrap();
    let imp = server.workdir("import", None);
    std::fs::write(
        imp.join("main.tf"),
        format!(
            "terraform {{\n  required_providers {{\n    warmpool = {{ source = \"warmpool/warmpool\" }}\n  }}\n}}\n\
             import {{\n  to = warmpool_template.api\n  id = \"{}\"\n}}\nimport {{\n  to = warmpool_warm_pool.api\n  id = \"{}\"\n}}\n",
            template.id, pool.id
        ),
    )
    .unwrap();
    server.ok(&imp, &["plan", "-generate-config-out=generated.tf"]);
    let generated = std::fs::read_to_string(imp.join("generated.tf")).unwrap();
    assert!(
        generated.contains("resource \"warmpool_warm_pool\" \"api\"") && generated.contains("min_ready"),
        "{generated}"
    );
    server.ok(&imp, &["apply", "-auto-approve"]);
    let (code, out, err) = server.tf(&imp, &["plan", "-detailed-exitcode"]);
    assert_eq!(code, 0, "imported resources plan clean:\n{out}\n{err}");
    // The command-line form, into a configuration written by hand (as the quickstart's, with `wait_for_ready`,
    // which the server does not know: import records its default, `true`).
    let cli = server.workdir("import-cli", None);
    std::fs::write(
        cli.join("main.tf"),
        "terraform {\n  required_providers {\n    warmpool = { source = \"warmpool/warmpool\" }\n  }\n}\n\
         resource \"warmpool_warm_pool\" \"api\" {\n  name = \"api\"\n  template = \"api:stable\"\n  min_ready = 2\n  max_ready = 10\n  enabled = false\n  wait_for_ready = true\n}\n",
    )
    .unwrap();
    server.ok(&cli, &["import", "-input=false", "warmpool_warm_pool.api", &pool.id]);
    let (code, out, err) = server.tf(&cli, &["plan", "-detailed-exitcode"]);
    assert_eq!(code, 0, "imported pool plans clean:\n{out}\n{err}");

    // A pool deleted outside Terraform is re-created by the next apply.
    server.client.delete_pool(&pool.id).await.unwrap();
    let (code, out, _) = server.tf(&dir, &plan);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("warmpool_warm_pool.api will be created"), "{out}");
    server.ok(&dir, &args);
    assert_eq!(server.client.get_pool("api").await.unwrap().min_ready, 2);

    // Destroy drains and deletes: no pools, no sandboxes.
    server.ok(&dir, &{
        let mut d = vec!["destroy", "-auto-approve", "-var", "pool_enabled=false"];
        d.extend(v2);
        d
    });
    assert!(server.client.list_pools().await.unwrap().is_empty());
    assert!(server.client.list_templates().await.unwrap().is_empty());
    wait_for("sandboxes to stop", async || server.procd_count() == 0).await;
}

#[tokio::test]
async fn bad_config_fails_at_plan_naming_the_attribute() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("bad", None);
    let write = |body: &str| {
        std::fs::write(
            dir.join("main.tf"),
            format!("terraform {{\n  required_providers {{\n    warmpool = {{ source = \"warmpool/warmpool\" }}\n  }}\n}}\n{body}"),
        )
        .unwrap()
    };
    write("resource \"warmpool_warm_pool\" \"p\" {\n  name = \"p\"\n  template = \"api:stable\"\n  min_ready = 5\n  max_ready = 1\n}\n");
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("Invalid max_ready") && err.contains("main.tf line 10"), "{err}");
    assert!(!err.contains("stack backtrace"), "no backtraces in user-facing errors: {err}");

    write("resource \"warmpool_warm_pool\" \"p\" {\n  name = \"p\"\n  template = \"api:stable\"\n  min_ready = 1\n  max_ready = 1\n  checkout_policy = \"sometimes\"\n}\n");
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("checkout_policy") && err.contains("main.tf line 11"), "{err}");

    write(concat!(
        "resource \"warmpool_template\" \"t\" {\n  name = \"t\"\n  start_cmd = \"sleep 1\"\n",
        "  warm_process {\n    name = \"a\"\n    type = \"repl\"\n    language = \"python\"\n    command = [\"python3\"]\n  }\n",
        "  warm_process {\n    name = \"b\"\n    command = [\"true\"]\n    cwd = \"relative\"\n  }\n}\n"
    ));
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("warm_processes[0].command") && err.contains("main.tf line 13"), "{err}");

    // A refused token or an unreachable server fails plan, naming the attribute.
    let pool = "resource \"warmpool_warm_pool\" \"p\" {\n  name = \"p\"\n  template = \"api:stable\"\n  min_ready = 1\n  max_ready = 1\n}\n";
    write(&format!("provider \"warmpool\" {{\n  token = \"wrong\"\n}}\n{pool}"));
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused the token") && err.contains("token"), "{err}");
    write(&format!("provider \"warmpool\" {{\n  endpoint = \"http://127.0.0.1:1\"\n}}\n{pool}"));
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("Cannot reach the Warmpool server") && err.contains("127.0.0.1:1"), "{err}");

    // Values from other resources are unknown at plan time: no false errors.
    write(concat!(
        "resource \"warmpool_template\" \"t\" {\n  name = \"t\"\n  start_cmd = \"sleep 1\"\n}\n",
        "resource \"warmpool_warm_pool\" \"p\" {\n  name = \"p\"\n  template = \"${warmpool_template.t.id}:stable\"\n  min_ready = 1\n  max_ready = 1\n}\n"
    ));
    let (code, out, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test]
async fn a_failed_build_is_an_apply_error_with_the_log_tail() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("failing", None);
    std::fs::write(
        dir.join("main.tf"),
        concat!(
            "terraform {\n  required_providers {\n    warmpool = { source = \"warmpool/warmpool\" }\n  }\n}\n",
            "resource \"warmpool_template\" \"broken\" {\n  name = \"broken\"\n",
            "  build_steps = [\"echo preparing the broken template\"]\n",
            "  start_cmd = \"exec sleep infinity\"\n",
            "  readiness {\n    exec { command = [\"test\", \"-f\", \"never.flag\"] }\n    timeout_ms = 1000\n  }\n}\n"
        ),
    )
    .unwrap();
    let (code, out, err) = server.tf(&dir, &["apply", "-auto-approve"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("failed") && err.contains("readiness did not pass"), "{err}");
    assert!(err.contains("preparing the broken template"), "the log tail is shown: {err}");
    assert!(!err.contains("stack backtrace"), "{err}");
    assert!(server.client.list_templates().await.unwrap().is_empty(), "nothing is left half-created");
}

#[tokio::test]
async fn terraform_test_file_passes() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("tftest", Some("quickstart"));
    let out = server.ok(&dir, &["test"]);
    assert!(out.contains("1 passed, 0 failed"), "{out}");
    assert!(server.client.list_pools().await.unwrap().is_empty(), "terraform test destroys what it applied");
}

/// A template and a pool tracking its `stable` tag; `start_cmd` and `min_ready` come from variables.
const ROLLOUT_CONFIG: &str = r#"terraform {
  required_providers {
    warmpool = { source = "warmpool/warmpool" }
  }
}
variable "start_cmd" { type = string }
variable "min_ready" { type = number }
resource "warmpool_template" "t" {
  name        = "t"
  build_steps = ["echo built > built.txt"]
  start_cmd   = var.start_cmd
  readiness {
    exec { command = ["test", "-f", "/tmp/started"] }
    timeout_ms = 30000
  }
  tags = ["stable"]
}
resource "warmpool_warm_pool" "p" {
  name           = "p"
  template       = "${warmpool_template.t.name}:stable"
  version_policy = "track_tag"
  track_tag      = "stable"
  min_ready      = var.min_ready
  max_ready      = 3
  depends_on     = [warmpool_template.t]
}
"#;

/// What changes outside Terraform before an apply.
#[derive(Debug, Clone, Copy)]
enum Outside {
    Nothing,
    /// `warmpool pool drain` with the real CLI.
    DrainWithCli,
    /// A build made outside Terraform takes the `stable` tag (the pool rolls to it).
    TagMoved,
    /// The template's `start_cmd` edited through the API (Terraform sees drift and rebuilds).
    TemplateEdited,
}

#[tokio::test]
async fn one_apply_changing_template_pool_and_outside_state_succeeds_and_plans_clean() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("rollout", None);
    std::fs::write(dir.join("main.tf"), ROLLOUT_CONFIG).unwrap();
    let start_cmd = |v: usize| format!("echo v{v} > v; touch /tmp/started; exec sleep infinity");
    let vars = |v: usize, min: u32| {
        vec![
            "-var".to_string(),
            format!("start_cmd={}", start_cmd(v)),
            "-var".into(),
            format!("min_ready={min}"),
        ]
    };
    let run = |cmd: &[&str], vars: &[String]| {
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(vars.iter().map(String::as_str));
        server.tf(&dir, &args)
    };
    let (mut version, mut min) = (0, 1);
    let (code, out, err) = run(&["apply", "-auto-approve"], &vars(version, min));
    assert_eq!(code, 0, "first apply:\n{out}\n{err}");

    let outsides = [Outside::Nothing, Outside::DrainWithCli, Outside::TagMoved, Outside::TemplateEdited];
    for outside in outsides {
        for template_change in [false, true] {
            for pool_change in [false, true] {
                let case =
                    format!("template change {template_change}, pool change {pool_change}, {outside:?}");
                match outside {
                    Outside::Nothing => {}
                    Outside::DrainWithCli => {
                        let out = Command::new(sibling_bin("warmpool"))
                            .args(["pool", "drain", "p"])
                            .env("WARMPOOL_ENDPOINT", &server.url)
                            .env("WARMPOOL_TOKEN", server.token())
                            .output()
                            .unwrap();
                        assert!(out.status.success(), "{case}: drain: {out:?}");
                    }
                    Outside::TagMoved => {
                        let b = server.client.create_build("t", &["stable".into()]).await.unwrap();
                        let b =
                            server.client.wait_build(&b.id, Duration::from_secs(120), |_| {}).await.unwrap();
                        assert_eq!(b.status, BuildStatus::Ready, "{case}");
                    }
                    Outside::TemplateEdited => {
                        let patch = TemplatePatch {
                            start_cmd: Some("echo edited; touch /tmp/started; exec sleep infinity".into()),
                            ..Default::default()
                        };
                        server.client.update_template("t", &patch).await.unwrap();
                    }
                }
                if template_change {
                    version += 1;
                }
                if pool_change {
                    min = 3 - min;
                }
                let (code, out, err) = run(&["apply", "-auto-approve"], &vars(version, min));
                assert_eq!(code, 0, "{case}: the apply fails:\n{out}\n{err}");
                let (code, out, err) = run(&["plan", "-detailed-exitcode"], &vars(version, min));
                assert_eq!(code, 0, "{case}: the plan after apply is not empty:\n{out}\n{err}");
                let pool = server.client.get_pool("p").await.unwrap();
                assert_eq!((pool.state, pool.min_ready), (PoolState::Enabled, min), "{case}");
            }
        }
    }
    run(&["destroy", "-auto-approve"], &vars(version, min));
}

/// `main.tf` of a trust policy test: the provider block's header, then `body`.
fn write_main_tf(dir: &Path, body: &str) {
    std::fs::write(
        dir.join("main.tf"),
        format!("terraform {{\n  required_providers {{\n    warmpool = {{ source = \"warmpool/warmpool\" }}\n  }}\n}}\n{body}"),
    )
    .unwrap();
}

/// A trust policy of `account` for `issuer`; the `repository` glob comes from a variable.
fn trust_policy_config(account: &str, issuer: &str) -> String {
    format!(
        "variable \"repository\" {{ type = string }}\n\
         resource \"warmpool_oidc_trust_policy\" \"ci\" {{\n  account_id = \"{account}\"\n  name = \"deploy\"\n  \
         issuer = \"{issuer}\"\n  audience = \"warmpool\"\n  claims = {{\n    repository = var.repository\n    \
         ref = \"refs/heads/main\"\n  }}\n}}\n"
    )
}

#[tokio::test]
async fn oidc_trust_policy_replace_import_drift_and_destroy() {
    require_terraform();
    let issuer = TestIssuer::start().await;
    let server = Server::start_with(&["--oidc-issuer", &issuer.url]);
    let team = server
        .client
        .create_account(&AccountCreate { name: "team".into(), ..Default::default() })
        .await
        .unwrap();
    let dir = server.workdir("trust", None);
    write_main_tf(&dir, &trust_policy_config(&team.id, &issuer.url));
    let repo = |glob: &str| format!("repository={glob}");
    let anonymous = warmpool_client::Client::new(&server.url, None).unwrap();
    let exchange = async |repository: &str| {
        let token = issuer.token(&issuer.claims("warmpool", repository, "refs/heads/main"));
        anonymous.exchange_oidc(&token).await
    };
    // Why an exchange was refused (`no_matching_policy` when no policy admits the job).
    let reason = |result: Result<OidcToken, warmpool_client::Error>| match result {
        Err(warmpool_client::Error::Api { details, .. }) => {
            details["reason"].as_str().unwrap_or_default().to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    };

    // Create: the default lifetime, and a CI job of the org gets a token of the account.
    server.ok(&dir, &["apply", "-auto-approve", "-var", &repo("octo-org/*")]);
    let policies = server.client.list_trust_policies(&team.id).await.unwrap();
    assert_eq!(policies.len(), 1, "{policies:?}");
    let first = &policies[0];
    assert_eq!((first.name.as_str(), first.token_ttl_seconds), ("deploy", TOKEN_TTL_DEFAULT_SECONDS));
    assert_eq!(first.claims["repository"], "octo-org/*");
    assert_eq!(exchange("octo-org/app").await.unwrap().account_id, team.id);
    let (code, out, err) = server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &repo("octo-org/*")]);
    assert_eq!(code, 0, "a second plan shows no changes:\n{out}\n{err}");

    // A claims change replaces the policy (there is no update route): the plan says so, the apply does it.
    let narrow = repo("octo-org/app");
    let (code, out, _) = server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &narrow]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("must be replaced") && out.contains("# forces replacement"), "{out}");
    assert!(out.contains("1 to add, 0 to change, 1 to destroy"), "{out}");
    server.ok(&dir, &["apply", "-auto-approve", "-var", &narrow]);
    let policies = server.client.list_trust_policies(&team.id).await.unwrap();
    assert_eq!(policies.len(), 1, "the old policy is gone: {policies:?}");
    let policy = policies[0].clone();
    assert_ne!(policy.id, first.id);
    assert_eq!(policy.claims["repository"], "octo-org/app");
    assert_eq!(
        reason(exchange("octo-org/other").await),
        "no_matching_policy",
        "the narrowed policy refuses it"
    );
    assert_eq!(exchange("octo-org/app").await.unwrap().account_id, team.id);
    assert_eq!(server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &narrow]).0, 0);

    // A trailing slash on the issuer names the same issuer (the server stores it without): an in-place update of
    // the state alone, the policy is kept.
    write_main_tf(&dir, &trust_policy_config(&team.id, &format!("{}/", issuer.url)));
    let (code, out, _) = server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &narrow]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("0 to add, 1 to change, 0 to destroy") && !out.contains("forces replacement"),
        "{out}"
    );
    server.ok(&dir, &["apply", "-auto-approve", "-var", &narrow]);
    assert_eq!(server.client.list_trust_policies(&team.id).await.unwrap(), std::slice::from_ref(&policy));
    assert_eq!(server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &narrow]).0, 0);

    // Import by acc_…/trp_… into a fresh state: the same configuration plans clean.
    let imp = server.workdir("trust-import", None);
    write_main_tf(&imp, &trust_policy_config(&team.id, &issuer.url));
    let import_id = format!("{}/{}", team.id, policy.id);
    server
        .ok(&imp, &["import", "-input=false", "-var", &narrow, "warmpool_oidc_trust_policy.ci", &import_id]);
    let (code, out, err) = server.tf(&imp, &["plan", "-detailed-exitcode", "-var", &narrow]);
    assert_eq!(code, 0, "the imported policy plans clean:\n{out}\n{err}");
    let (code, _, err) = server
        .tf(&imp, &["import", "-input=false", "-var", &narrow, "warmpool_oidc_trust_policy.ci", &policy.id]);
    assert_ne!(code, 0);
    assert!(err.contains("acc_…/trp_…"), "a bare policy id is refused, naming the form: {err}");

    // Deleted outside Terraform: gone from state at refresh, the next plan creates it again.
    server.client.delete_trust_policy(&team.id, &policy.id).await.unwrap();
    let (code, out, _) = server.tf(&dir, &["plan", "-detailed-exitcode", "-var", &narrow]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("warmpool_oidc_trust_policy.ci will be created"), "{out}");
    server.ok(&dir, &["apply", "-auto-approve", "-var", &narrow]);
    assert_eq!(server.client.list_trust_policies(&team.id).await.unwrap().len(), 1);
    assert_eq!(exchange("octo-org/app").await.unwrap().account_id, team.id);

    // Destroy deletes it: the job's token is refused again.
    server.ok(&dir, &["destroy", "-auto-approve", "-var", &narrow]);
    assert!(server.client.list_trust_policies(&team.id).await.unwrap().is_empty());
    assert_eq!(reason(exchange("octo-org/app").await), "no_matching_policy");
}

#[tokio::test]
async fn bad_trust_policy_fails_at_plan_naming_the_attribute() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("bad-trust", None);
    let policy = |issuer: &str, glob: &str, extra: &str| {
        format!(
            "resource \"warmpool_oidc_trust_policy\" \"p\" {{\n  account_id = \"acc_0123\"\n  name = \"p\"\n  \
             issuer = \"{issuer}\"\n  audience = \"warmpool\"\n  claims = {{\n    repository = \"octo-org/app\"\n    \
             ref = \"{glob}\"\n  }}\n{extra}}}\n"
        )
    };
    let github = "https://token.actions.githubusercontent.com";
    // Line 6 opens the resource: issuer is on line 9, the `ref` claim on line 13, extra lines from 15.
    for (body, attribute, line) in [
        (policy(github, "", ""), "claims.ref", 13),
        (policy("http://example.com", "refs/heads/*", ""), "issuer", 9),
        (policy(github, "refs/heads/*", "  token_ttl_seconds = 30\n"), "token_ttl_seconds", 15),
        (policy(github, "refs/heads/*", "  token_ttl_seconds = 21601\n"), "token_ttl_seconds", 15),
    ] {
        write_main_tf(&dir, &body);
        let (code, _, err) = server.tf(&dir, &["plan"]);
        assert_eq!(code, 1, "{body}");
        assert!(
            err.contains(&format!("Invalid {attribute}")) && err.contains(&format!("main.tf line {line}")),
            "{attribute} is named with its line:\n{err}"
        );
        assert!(!err.contains("stack backtrace"), "{err}");
    }

    // An issuer the server does not trust passes the plan and fails the apply, naming `issuer`.
    let team = server
        .client
        .create_account(&AccountCreate { name: "team".into(), ..Default::default() })
        .await
        .unwrap();
    write_main_tf(&dir, &policy(github, "refs/heads/*", "").replace("acc_0123", &team.id));
    let (code, out, err) = server.tf(&dir, &["apply", "-auto-approve"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("--oidc-issuer") && err.contains("main.tf line 9"), "{err}");
    assert!(server.client.list_trust_policies(&team.id).await.unwrap().is_empty());
}

/// A pool with an `autoscale` block and `max_starts_per_second`, read back as configured, changed and removed in
/// place, with the computed `recommended_ready` in the state and plans clean after each apply; a bad window fails
/// at plan naming the attribute.
#[tokio::test]
async fn autoscale_block_and_start_rate_apply_read_back_and_plan_clean() {
    require_terraform();
    let server = Server::start();
    let dir = server.workdir("autoscale", None);
    let config = |scaling: &str| {
        format!(
            r#"terraform {{
  required_providers {{
    warmpool = {{ source = "warmpool/warmpool" }}
  }}
}}
resource "warmpool_template" "t" {{
  name      = "t"
  start_cmd = "touch /tmp/started; exec sleep infinity"
  readiness {{
    exec {{ command = ["test", "-f", "/tmp/started"] }}
    timeout_ms = 30000
  }}
  tags = ["stable"]
}}
resource "warmpool_warm_pool" "p" {{
  name       = "p"
  template   = "${{warmpool_template.t.name}}:stable"
  min_ready  = 1
  max_ready  = 4
  depends_on = [warmpool_template.t]
{scaling}
}}
output "recommended_ready" {{ value = warmpool_warm_pool.p.recommended_ready }}
"#
        )
    };
    let apply_and_plan_clean = |scaling: &str| {
        std::fs::write(dir.join("main.tf"), config(scaling)).unwrap();
        server.ok(&dir, &["apply", "-auto-approve"]);
        let (code, out, err) = server.tf(&dir, &["plan", "-detailed-exitcode"]);
        assert_eq!(code, 0, "the plan after apply is not empty:\n{out}\n{err}");
    };

    apply_and_plan_clean(
        "  max_starts_per_second = 5\n  autoscale {\n    enabled = true\n    window_seconds = 120\n    scale_to_zero_after_seconds = 900\n  }",
    );
    let pool = server.client.get_pool("p").await.unwrap();
    assert_eq!(pool.max_starts_per_second, Some(5.0));
    let want = Autoscale {
        enabled: true,
        headroom: None,
        window_seconds: Some(120),
        scale_to_zero_after_seconds: Some(900),
    };
    assert_eq!(pool.autoscale, want);
    let out = server.ok(&dir, &["output", "-json", "recommended_ready"]);
    let recommended: u32 = out.trim().parse().unwrap_or_else(|_| panic!("recommended_ready: {out}"));
    assert_eq!(recommended, server.client.pool_status("p").await.unwrap().demand.recommended_ready);

    // Changed in place.
    apply_and_plan_clean("  autoscale {\n    enabled = true\n    headroom = 2\n  }");
    let pool = server.client.get_pool("p").await.unwrap();
    assert_eq!(pool.autoscale, Autoscale { enabled: true, headroom: Some(2.0), ..Default::default() });
    assert_eq!(pool.max_starts_per_second, None, "removed from the configuration: unlimited again");

    // Removed: off.
    apply_and_plan_clean("");
    let pool = server.client.get_pool("p").await.unwrap();
    assert_eq!(pool.autoscale, Autoscale::default());

    // Changed outside Terraform: drift, then back.
    let patch = WarmPoolPatch { max_starts_per_second: Some(Some(9.0)), ..Default::default() };
    server.client.update_pool("p", &patch).await.unwrap();
    let (code, out, _) = server.tf(&dir, &["plan", "-detailed-exitcode"]);
    assert_eq!(code, 2, "drift shows:\n{out}");
    assert!(out.contains("max_starts_per_second"), "{out}");
    apply_and_plan_clean("");
    assert_eq!(server.client.get_pool("p").await.unwrap().max_starts_per_second, None);

    std::fs::write(
        dir.join("main.tf"),
        config("  autoscale {\n    enabled = true\n    window_seconds = 1\n  }"),
    )
    .unwrap();
    let (code, _, err) = server.tf(&dir, &["plan"]);
    assert_eq!(code, 1);
    assert!(err.contains("window_seconds") && err.contains("between 10 and 86400"), "{err}");
    std::fs::write(dir.join("main.tf"), config("")).unwrap();
    server.ok(&dir, &["destroy", "-auto-approve"]);
}
