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

/// The fields a caller sets when creating a sandbox and reads in a pool's status each say what they mean in the
/// OpenAPI document (and so in `docs/api.md`).
#[test]
fn sandbox_create_and_pool_status_fields_are_described() {
    let doc = warmpool_server::http::openapi::json();
    let mut missing = Vec::new();
    for schema in ["SandboxCreate", "PoolStatus"] {
        let props = doc["components"]["schemas"][schema]["properties"].as_object().expect(schema);
        for (name, prop) in props {
            // A field whose type is another schema carries its description beside the reference.
            let described = prop["description"].as_str().is_some_and(|d| !d.is_empty())
                || prop["allOf"].as_array().is_some_and(|a| a.iter().any(|p| p["description"].is_string()))
                || prop["oneOf"].as_array().is_some_and(|a| a.iter().any(|p| p["description"].is_string()));
            if !described {
                missing.push(format!("{schema}.{name}"));
            }
        }
    }
    assert!(missing.is_empty(), "no description: {missing:?}");
}
