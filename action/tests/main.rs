//! The action's package contract: every input its action.yml files declare is read, every output written.

use std::path::Path;

/// Every input declared in action.yml (and the sub-actions) is read by the binary, and every output is written.
#[test]
fn action_yml_contract() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source =
        ["src/commands.rs", "src/work.rs"].map(|f| std::fs::read_to_string(root.join(f)).unwrap()).join("\n");
    for file in ["action.yml", "scale-up/action.yml", "checkout/action.yml", "drain/action.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let doc = &yaml_rust2::YamlLoader::load_from_str(&text).unwrap()[0];
        assert!(doc["branding"]["icon"].as_str().is_some(), "{file}: branding");
        let runs = &doc["runs"];
        assert_eq!(runs["using"].as_str(), Some("node24"), "{file}");
        let main = runs["main"].as_str().unwrap();
        assert!(root.join(Path::new(file).parent().unwrap()).join(main).exists(), "{file}: {main} exists");
        for (name, spec) in doc["inputs"].as_hash().unwrap() {
            let name = name.as_str().unwrap();
            assert!(
                spec["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{file}: input {name} is documented"
            );
            let read = [
                format!("input(\"{name}\")"),
                format!("input_lines(\"{name}\")"),
                format!("count(&r.env, \"{name}\""),
                format!("duration(&r.env, \"{name}\""),
            ];
            assert!(read.iter().any(|r| source.contains(r)), "{file}: input {name} is never read");
        }
        if let Some(outputs) = doc["outputs"].as_hash() {
            for (name, spec) in outputs {
                let name = name.as_str().unwrap();
                assert!(spec["description"].as_str().is_some(), "{file}: output {name} is documented");
                assert!(
                    source.contains(&format!("set_output(\"{name}\"")),
                    "{file}: output {name} is never written"
                );
            }
        }
    }
    let main = std::fs::read_to_string(root.join("action.yml")).unwrap();
    assert!(main.contains("post: shim/post.js"), "main action has a post step");
}
