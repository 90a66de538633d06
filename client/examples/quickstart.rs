//! The Rust client quickstart: create a template, build it, put a warm pool in front of it, check a sandbox out
//! and run a command in it. Run it against a local server:
//!
//! ```sh
//! WARMPOOL_TOKEN=$(cat .warmpool/admin.token) cargo run -p warmpool-client --example quickstart
//! ```

use std::time::Duration;

use warmpool_api::{CheckoutMode, ExecRequest, SandboxCreate, TemplateSpec};
use warmpool_client::{Client, TemplateExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("WARMPOOL_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:7070".into());
    let client = Client::new(&endpoint, std::env::var("WARMPOOL_TOKEN").ok())?;

    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": "client-example",
        "start_cmd": "touch ready.flag; exec sleep infinity",
        "readiness": {"exec": {"command": ["test", "-f", "ready.flag"]}}
    }))?;
    let template = client.create_template(&spec).await?;
    let build = client.create_build(&template.name, &["stable".into()]).await?;
    let build = client.wait_build(&build.id, Duration::from_secs(120), |_| {}).await?;
    println!("build {} is {}", build.id, build.status.as_str());

    let pool = template.create_warm_pool(&client, "client-example", 2, 4).await?;
    client.wait_pool_ready(&pool.id, 2, Duration::from_secs(120), |_| {}).await?;
    let sandbox = client
        .create_sandbox(&SandboxCreate {
            warm_pool: Some(pool.id.to_string()),
            warm_pool_mode: Some(CheckoutMode::Require),
            ..Default::default()
        })
        .await?;
    println!("checked out {} ({:?})", sandbox.id, sandbox.warm_pool_checkout);
    let out = client
        .exec(
            &sandbox.id,
            &ExecRequest {
                command: vec!["echo".into(), "hello from a warm sandbox".into()],
                ..Default::default()
            },
        )
        .await?;
    print!("{}", out.stdout);

    client.delete_sandbox(&sandbox.id).await?;
    client.delete_pool(&pool.id).await?;
    client.delete_template(&template.name).await?;
    Ok(())
}
