//! The OpenAPI document (`/v1/openapi.json`): schemas derived from the `warmpool-api` types with utoipa, paths
//! from the route table below. A golden-file test keeps it from changing by accident.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{ContentBuilder, OpenApi as Doc, Ref, Required, ResponseBuilder};
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

/// (method, path, request schema, success status, response schema or "text", summary).
type Route = (&'static str, &'static str, Option<&'static str>, u16, Option<&'static str>, &'static str);

const ROUTES: &[Route] = &[
    ("get", "/healthz", None, 200, Some("text"), "Liveness of the server"),
    ("get", "/readyz", None, 200, None, "Readiness, store and runtime details"),
    ("get", "/metrics", None, 200, Some("text"), "Prometheus metrics"),
    ("post", "/v1/accounts", Some("AccountCreate"), 201, Some("Account"), "Create an account (admin)"),
    ("get", "/v1/accounts", None, 200, None, "List accounts (admin)"),
    ("patch", "/v1/accounts/{id}", Some("AccountPatch"), 200, Some("Account"), "Update an account (admin)"),
    ("post", "/v1/tokens", Some("TokenCreate"), 201, Some("TokenCreated"), "Create a token (admin)"),
    ("delete", "/v1/tokens/{id}", None, 204, None, "Revoke a token (admin)"),
    ("post", "/v1/templates", Some("TemplateSpec"), 201, Some("Template"), "Create a template"),
    ("get", "/v1/templates", None, 200, None, "List templates"),
    ("get", "/v1/templates/{id}", None, 200, Some("Template"), "Get a template by id or name"),
    ("patch", "/v1/templates/{id}", Some("TemplatePatch"), 200, Some("Template"), "Update a template"),
    ("delete", "/v1/templates/{id}", None, 204, None, "Delete a template with its builds and tags"),
    ("post", "/v1/templates/{id}/builds", Some("BuildCreate"), 202, Some("Build"), "Start a build"),
    ("get", "/v1/templates/{id}/builds", None, 200, None, "List a template's builds"),
    ("get", "/v1/templates/{id}/tags", None, 200, None, "List a template's tags"),
    (
        "put",
        "/v1/templates/{id}/tags/{tag}",
        Some("TagPut"),
        200,
        Some("Tag"),
        "Point a tag at a ready build",
    ),
    ("get", "/v1/templates/{id}/tags/{tag}", None, 200, Some("Tag"), "Get a tag"),
    ("delete", "/v1/templates/{id}/tags/{tag}", None, 204, None, "Delete a tag"),
    ("get", "/v1/builds/{id}", None, 200, Some("Build"), "Get a build"),
    ("get", "/v1/builds/{id}/logs", None, 200, Some("text"), "A build's log"),
    (
        "get",
        "/v1/builds/{id}/artifact",
        None,
        200,
        Some("zstd"),
        "A build's artifact (a zstd tar; kubernetes runtime)",
    ),
    ("post", "/v1/template-warm-pools", Some("WarmPoolSpec"), 201, Some("WarmPool"), "Create a warm pool"),
    ("get", "/v1/template-warm-pools", None, 200, None, "List warm pools"),
    ("get", "/v1/template-warm-pools/{id}", None, 200, Some("WarmPool"), "Get a warm pool by id or name"),
    (
        "patch",
        "/v1/template-warm-pools/{id}",
        Some("WarmPoolPatch"),
        200,
        Some("WarmPool"),
        "Update a warm pool",
    ),
    ("delete", "/v1/template-warm-pools/{id}", None, 204, None, "Drain, then delete a warm pool"),
    ("get", "/v1/template-warm-pools/{id}/status", None, 200, Some("PoolStatus"), "A pool's live status"),
    ("post", "/v1/template-warm-pools/{id}/enable", None, 200, Some("WarmPool"), "Resume filling"),
    (
        "post",
        "/v1/template-warm-pools/{id}/disable",
        None,
        200,
        Some("WarmPool"),
        "Stop filling, keep inventory",
    ),
    (
        "post",
        "/v1/template-warm-pools/{id}/drain",
        None,
        200,
        Some("WarmPool"),
        "Stop filling, remove inventory",
    ),
    ("post", "/v1/template-warm-pools/{id}/reconcile", None, 200, Some("WarmPool"), "Run a pass now"),
    ("get", "/v1/template-warm-pools/{id}/leases", None, 200, None, "Active leases"),
    (
        "put",
        "/v1/template-warm-pools/{id}/leases/{key}",
        Some("LeaseSpec"),
        200,
        Some("Lease"),
        "Put a lease",
    ),
    (
        "delete",
        "/v1/template-warm-pools/{id}/leases/{key}",
        None,
        200,
        Some("LeaseRelease"),
        "Release a lease",
    ),
    ("post", "/v1/sandboxes", Some("SandboxCreate"), 201, Some("Sandbox"), "Create or check out a sandbox"),
    ("get", "/v1/sandboxes", None, 200, None, "List sandboxes"),
    ("get", "/v1/sandboxes/{id}", None, 200, Some("Sandbox"), "Get a sandbox"),
    ("delete", "/v1/sandboxes/{id}", None, 204, None, "Delete a sandbox"),
    ("post", "/v1/sandboxes/{id}/exec", Some("ExecRequest"), 200, Some("ExecResult"), "Run a command"),
    ("get", "/v1/sandboxes/{id}/probes/{kind}", None, 200, Some("ProbeResult"), "Latest probe result"),
    ("get", "/v1/sandboxes/{id}/logs", None, 200, None, "Mirrored process output"),
];

fn json(schema: &str) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build()
}

pub fn document() -> Doc {
    let mut doc = Schemas::openapi();
    for (method, path, body, status, response, summary) in ROUTES {
        let method = match *method {
            "get" => HttpMethod::Get,
            "post" => HttpMethod::Post,
            "put" => HttpMethod::Put,
            "patch" => HttpMethod::Patch,
            _ => HttpMethod::Delete,
        };
        let mut op = OperationBuilder::new().summary(Some(*summary));
        for param in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            op = op.parameter(
                ParameterBuilder::new().name(param).parameter_in(ParameterIn::Path).required(Required::True),
            );
        }
        if let Some(body) = body {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", json(body))
                    .build(),
            ));
        }
        let ok = match response {
            Some("text") => {
                ResponseBuilder::new().description("OK").content("text/plain", ContentBuilder::new().build())
            }
            Some("zstd") => ResponseBuilder::new()
                .description("OK")
                .content("application/zstd", ContentBuilder::new().build()),
            Some(schema) => {
                ResponseBuilder::new().description("OK").content("application/json", json(schema))
            }
            None => ResponseBuilder::new().description("OK"),
        };
        op = op.response(status.to_string(), ok.build());
        if !path.starts_with("/healthz") && !path.starts_with("/readyz") && !path.starts_with("/metrics") {
            op = op.response(
                "default",
                ResponseBuilder::new()
                    .description("Error")
                    .content("application/json", json("ErrorBody"))
                    .build(),
            );
        }
        doc.paths.add_path_operation(*path, vec![method], op.build());
    }
    doc
}
