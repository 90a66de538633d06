//! `docs/cli.md` and `docs/api.md` are generated; this keeps them equal to the CLI and the served document.
//! `UPDATE_GOLDEN=1` rewrites them.

#[test]
fn generated_references_are_up_to_date() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    for (file, text) in [
        ("cli.md", warmpool_server::docs::cli_reference()),
        ("api.md", warmpool_server::docs::api_reference()),
    ] {
        let path = docs.join(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(current == text, "docs/{file} is out of date: run `UPDATE_GOLDEN=1 cargo nextest run -p warmpool-server generated_references`");
    }
}
