//! The plugin binary: Terraform starts it and talks gRPC; stdout carries only the go-plugin handshake.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tf_provider::serve(
        "warmpool",
        terraform_provider_warmpool::WarmpoolProvider::default(),
    )
    .await
}
