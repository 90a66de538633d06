//! Compiles `proto/procd.proto` with the vendored `protoc`, so `cargo build` needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-changed=proto/procd.proto");
    tonic_build::configure().compile_protos(&["proto/procd.proto"], &["proto"])?;
    Ok(())
}
