//! The OpenAPI document (`/v1/openapi.json`): schemas derived from the `warmpool-api` types, paths from the
//! handlers' `#[utoipa::path]` attributes (the same ones that register the routes). A golden-file test keeps
//! it from changing by accident.

use std::sync::LazyLock;

use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Doc, Ref, RefOr, ResponseBuilder};
use utoipa::OpenApi;
use warmpool_api::*;

#[derive(OpenApi)]
#[openapi(
    info(title = "Warmpool", description = "Sandboxes from templates, with warm pools of ready sandboxes."),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        ErrorCode,
        Account,
        AccountCreate,
        AccountPatch,
        Quotas,
        TokenCreate,
        TokenCreated,
        TemplateSpec,
        TemplatePatch,
        Template,
        BuildRecipe,
        Resources,
        ProbeSpec,
        ProcessCheck,
        ExecCheck,
        HttpGetCheck,
        TcpSocketCheck,
        ProbeSet,
        WarmProcessSpec,
        ProcessType,
        ReplLanguage,
        Build,
        BuildStatus,
        BuildCreate,
        TagPut,
        Tag,
        WarmPoolSpec,
        WarmPoolPatch,
        WarmPool,
        VersionPolicy,
        PoolState,
        PoolStatus,
        DegradedReason,
        LeaseSpec,
        Lease,
        LeaseRelease,
        SandboxCreate,
        Sandbox,
        SandboxState,
        CheckoutMode,
        CheckoutSource,
        FallbackReason,
        WarmPoolCheckout,
        TimeoutPolicy,
        TimeoutAction,
        VolumeMount,
        NetworkPolicy,
        NetworkMode,
        ExecRequest,
        ExecResult,
        ProbeResult,
        ProbeCheckResult,
        ProbeKind,
        ProbeStatus,
        LogLine
    ))
)]
struct Schemas;

/// The document's frame: info, schemas, bearer auth. The handlers add the paths (`handlers::routes`).
pub fn base() -> Doc {
    let mut doc = Schemas::openapi();
    doc.components.get_or_insert_with(Default::default).add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    doc.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    doc
}

/// The served document (`/v1/openapi.json`), built once.
pub fn document() -> &'static Doc {
    static DOC: LazyLock<Doc> = LazyLock::new(|| {
        let mut doc = super::handlers::routes().1;
        // Every authenticated operation can fail, always with the error envelope.
        let error = ResponseBuilder::new()
            .description("An error: `{\"error\": {\"code\", \"message\", \"details\"}}`")
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            )
            .build();
        for item in doc.paths.paths.values_mut() {
            for op in operations(item) {
                for (status, response) in op.responses.responses.iter_mut() {
                    if let RefOr::T(r) = response {
                        if r.description.is_empty() {
                            r.description =
                                if status.starts_with('2') { "Success" } else { "Failure" }.into();
                        }
                    }
                }
                let public = op
                    .security
                    .as_ref()
                    .is_some_and(|s| s.iter().all(|r| *r == SecurityRequirement::default()));
                if !public {
                    op.responses.responses.insert("default".into(), error.clone().into());
                }
            }
        }
        doc
    });
    &DOC
}

/// The served document as JSON (request bodies are checked against its schemas).
pub fn json() -> &'static serde_json::Value {
    static JSON: LazyLock<serde_json::Value> =
        LazyLock::new(|| serde_json::to_value(document()).expect("the OpenAPI document is JSON"));
    &JSON
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
}
