//! schemathesis against a live server: every operation of the served OpenAPI document, every check
//! (`tests/schemathesis/schemathesis.toml` says which rejections a schema cannot express). Seeded with a real
//! template, build, pool and sandbox, so the operations on one resource reach it and not only 404s.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// The schemathesis that `scripts/host-deps.sh` installs (a virtualenv), or `$WARMPOOL_SCHEMATHESIS`.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("WARMPOOL_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").expect("HOME")).join(".cache"));
        cache.join("warmpool/schemathesis/bin/schemathesis")
    });
    assert!(
        path.exists(),
        "{} is missing: run scripts/host-deps.sh (it installs schemathesis from PyPI)",
        path.display()
    );
    path
}

/// Runs schemathesis with `token` against the server's document, limited by `filter`; fails the test when
/// schemathesis fails, else returns how many operations it tested and how many the document has.
fn run(schemathesis: &Path, config: &Path, url: &str, token: &str, filter: &[&str]) -> (u32, u32) {
    let out = Command::new(schemathesis)
        .arg("--config-file")
        .arg(config)
        .args(["run", "--checks", "all", "--max-examples", "25", "--no-color"])
        .args(filter)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{url}/v1/openapi.json"))
        .current_dir(config.parent().unwrap())
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary =
        stdout.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    println!("{summary}");
    assert!(out.status.success(), "schemathesis failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // "Selected: 5/42" and "Tested: 5" in the summary.
    let field =
        |label: &str| stdout.lines().find_map(|l| l.trim().strip_prefix(label)).unwrap_or_default().trim();
    let total = field("Selected:").rsplit('/').next().unwrap_or_default().parse().unwrap_or(0);
    (field("Tested:").parse().unwrap_or(0), total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_conforms_to_the_served_openapi_document() {
    let schemathesis = schemathesis();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let srv = ServerProcess::start(&data, &[]);

    // Everything but the admin routes runs as an account whose quotas keep the sandboxes schemathesis creates (it
    // finds the seeded template) to a handful: quota_exceeded (429) instead of hundreds of containers.
    let quotas = Quotas { max_sandboxes: Some(4), max_warm_sandboxes: Some(2) };
    let account = srv
        .client
        .create_account(&AccountCreate { name: "fuzz".into(), quotas, ..Default::default() })
        .await
        .unwrap();
    let token =
        srv.client.create_token(&TokenCreate { account_id: account.id, name: None }).await.unwrap().token;
    let c = &Client::new(&srv.url, Some(token.clone())).unwrap();
    build(c, &template("seed", 0.0)).await;
    let pool = c.create_pool(&pool_spec("seed", "seed:stable", 0, 1)).await.unwrap();
    let sandbox = c.create_sandbox(&cold("seed")).await.unwrap();
    let build_id = c.list_builds("seed").await.unwrap()[0].id.clone();

    let mut config =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis/schemathesis.toml"))
            .unwrap();
    // Operations on these resources get the seeded ids. The stateful phase, which chains a create to the
    // operations on what it created, would see the fixed id instead; templates it reaches that way by itself.
    for (paths, id) in [
        ("^/v1/builds/", build_id.as_str()),
        ("^/v1/template-warm-pools/", pool.id.as_str()),
        ("^/v1/sandboxes/", sandbox.id.as_str()),
    ] {
        config += &format!(
            "\n[[operations]]\ninclude-path-regex = \"{paths}\"\nparameters = {{ \"path.id\" = \"{id}\" }}\n\
             phases.stateful.enabled = false\n"
        );
    }
    let config_path = tmp.path().join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();

    // schemathesis leaves out the document's own operation unless asked for it by name.
    let own = ["--include-path", "/v1/openapi.json"];
    let (admin, _) = run(&schemathesis, &config_path, &srv.url, &srv.token(), &["--include-tag", "accounts"]);
    let (account, _) = run(&schemathesis, &config_path, &srv.url, &token, &["--exclude-tag", "accounts"]);
    let (document, total) = run(&schemathesis, &config_path, &srv.url, &token, &own);
    assert!(
        total > 40 && admin + account + document == total,
        "{admin} + {account} + {document} of {total} tested"
    );
}
