//! The provider's registry-layout docs against its schemas.

use std::path::Path;

/// Every attribute and block of every schema is documented in the registry-layout docs.
#[test]
fn docs_cover_the_schema() {
    use tf_provider::schema::{Block, NestedBlock};
    fn names(block: &Block, out: &mut Vec<String>) {
        out.extend(block.attributes.keys().cloned());
        for (name, nested) in &block.blocks {
            out.push(name.clone());
            let (NestedBlock::Single(b)
            | NestedBlock::List(b)
            | NestedBlock::Set(b)
            | NestedBlock::Map(b)
            | NestedBlock::Group(b)
            | NestedBlock::Optional(b)) = nested;
            names(b, out);
        }
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let check = |file: &str, block: &Block| {
        let text =
            std::fs::read_to_string(docs.join(file)).unwrap_or_else(|_| panic!("docs/{file} is missing"));
        let mut all = Vec::new();
        names(block, &mut all);
        for name in all {
            assert!(text.contains(&format!("`{name}`")), "docs/{file} does not document `{name}`");
        }
    };
    check("index.md", &terraform_provider_warmpool::provider_schema().block);
    check("resources/template.md", &terraform_provider_warmpool::template::template_schema().block);
    check("resources/warm_pool.md", &terraform_provider_warmpool::pool::pool_schema().block);
    check("resources/oidc_trust_policy.md", &terraform_provider_warmpool::trust::trust_policy_schema().block);
    let mut diags = tf_provider::Diagnostics::default();
    let shared = terraform_provider_warmpool::Shared::default();
    use tf_provider::DataSource;
    let t = terraform_provider_warmpool::data::TemplateDataSource { shared: shared.clone() }
        .schema(&mut diags)
        .unwrap();
    check("data-sources/template.md", &t.block);
    let p = terraform_provider_warmpool::data::PoolDataSource { shared }.schema(&mut diags).unwrap();
    check("data-sources/warm_pool.md", &p.block);
}
