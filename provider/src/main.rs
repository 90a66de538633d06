//! The plugin binary: Terraform starts it and talks gRPC; stdout carries only the go-plugin handshake.

fn main() -> anyhow::Result<()> {
    // Diagnostics are for people: never append Rust backtraces to them (these machines set RUST_BACKTRACE=1).
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(tf_provider::serve("warmpool", terraform_provider_warmpool::WarmpoolProvider::default()))
}
