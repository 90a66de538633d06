//! One handler per route; each parses, calls `app`, and shapes the response.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::openapi::OpenApi as Doc;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warmpool_api::*;

use super::{ApiResult, Auth, Body, OptionalBody};
use crate::app::{App, AppError};

type S = State<Arc<App>>;

/// Every route with its OpenAPI entry: the `#[utoipa::path]` on a handler is both its route and its
/// documentation, so the served document cannot drift from the router.
pub fn routes() -> (Router<Arc<App>>, Doc) {
    let (router, mut doc) = OpenApiRouter::with_openapi(super::openapi::base())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi))
        .routes(routes!(create_account, list_accounts))
        .routes(routes!(update_account))
        .routes(routes!(create_token))
        .routes(routes!(delete_token))
        .routes(routes!(create_trust_policy, list_trust_policies))
        .routes(routes!(get_trust_policy, delete_trust_policy))
        .routes(routes!(exchange_oidc))
        .routes(routes!(create_template, list_templates))
        .routes(routes!(get_template, update_template, delete_template))
        .routes(routes!(create_build, list_builds))
        .routes(routes!(list_tags))
        .routes(routes!(put_tag, get_tag, delete_tag))
        .routes(routes!(get_build))
        .routes(routes!(build_logs))
        .routes(routes!(build_artifact))
        .routes(routes!(create_pool, list_pools))
        .routes(routes!(get_pool, update_pool, delete_pool))
        .routes(routes!(pool_status))
        .routes(routes!(enable_pool))
        .routes(routes!(disable_pool))
        .routes(routes!(drain_pool))
        .routes(routes!(reconcile_pool))
        .routes(routes!(list_leases))
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, delete_sandbox))
        .routes(routes!(exec))
        .routes(routes!(probe))
        .routes(routes!(logs))
        .merge(super::io::routes())
        .split_for_parts();
    // A lease key may hold slashes (`owner/repo/run/attempt/job`), so its route is a catch-all: `*key` to
    // axum, `{key}` to OpenAPI (utoipa-axum would make that a one-segment `:key`).
    let (schemas, paths, methods) = routes!(put_lease, release_lease);
    doc.paths.paths.extend(paths.paths);
    doc.components.get_or_insert_with(Default::default).schemas.extend(schemas);
    (router.route("/v1/template-warm-pools/:id/leases/*key", methods), doc)
}

fn list<T>(items: Vec<T>) -> Json<List<T>> {
    Json(List::all(items))
}

/// `?limit=N&cursor=C` of a paginated list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Items per page (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page (an id).
    #[param(pattern = "^[A-Za-z0-9_]*$")]
    cursor: Option<String>,
}

impl ListQuery {
    fn page(self) -> Result<crate::store::Page, FieldError> {
        let limit = match self.limit.as_deref() {
            None => LIST_LIMIT_DEFAULT,
            Some(text) => {
                text.parse::<u32>().ok().filter(|n| (1..=LIST_LIMIT_MAX).contains(n)).ok_or_else(|| {
                    FieldError::new("limit", format!("must be a whole number from 1 to {LIST_LIMIT_MAX}"))
                })?
            }
        };
        if self.cursor.as_deref().is_some_and(|c| !c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err(FieldError::new("cursor", "is not a cursor this server handed out"));
        }
        Ok(crate::store::Page { after: self.cursor.filter(|c| !c.is_empty()), limit })
    }
}

#[utoipa::path(get, path = "/healthz", tag = "server", security(()),
    summary = "Liveness: answers while the process serves",
    responses((status = 200, description = "The server is up", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready while the store takes writes: a real (tiny) write, so a full disk or a read-only database shows.
#[utoipa::path(get, path = "/readyz", tag = "server", security(()),
    summary = "Readiness: 503 while the store cannot take writes; store, runtime, reconciler, replica",
    responses(
    (status = 200, description = "Ready: store, runtime, reconciler and replica details", body = Object),
    (status = 503, description = "The store cannot take writes now", body = Object)))]
async fn readyz(State(app): S) -> impl IntoResponse {
    let write = app.store.check_writable().await;
    let store_ok = write.is_ok();
    let body = serde_json::json!({
        "status": if store_ok { "ready" } else { "not_ready" },
        "store": app.store.describe(),
        "store_error": write.err().map(|e| crate::app::AppError::from(e).to_string()),
        "runtime": app.runtime.details(),
        "reconciler": if app.config.reconciler_enabled { "on" } else { "off" },
        "max_parallel_starts": app.config.max_parallel_starts,
        "replica": {"id": app.replica, "pools": app.owned_pools()},
    });
    (if store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

#[utoipa::path(get, path = "/metrics", tag = "server", security(()), summary = "Prometheus metrics",
    responses(
    (status = 200, description = "Prometheus metrics", body = String,
    content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(app): S) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], app.render_metrics().await)
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "server", security(()),
    summary = "This OpenAPI 3.1 document",
    responses((status = 200, description = "This document", body = Object)))]
async fn openapi() -> Json<Doc> {
    Json(super::openapi::document().clone())
}

#[utoipa::path(post, path = "/v1/accounts", tag = "accounts", summary = "Create an account (admin)",
    request_body = AccountCreate, responses((status = 201, body = Account)))]
async fn create_account(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<AccountCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_account(&c, req).await?)))
}
#[utoipa::path(get, path = "/v1/accounts", tag = "accounts", summary = "List accounts (admin)",
    params(ListQuery), responses((status = 200, body = List<Account>)))]
async fn list_accounts(
    State(app): S,
    Auth(c): Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<Account>>> {
    Ok(Json(app.list_accounts(&c, &q.page()?).await?))
}
#[utoipa::path(patch, path = "/v1/accounts/{id}", tag = "accounts", summary = "Update an account (admin)",
    params(("id" = String, Path, description = "Account id (`acc_…`)")),
    request_body = AccountPatch, responses((status = 200, body = Account)))]
async fn update_account(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<AccountPatch>,
) -> ApiResult<Json<Account>> {
    Ok(Json(app.update_account(&c, &id, req).await?))
}
#[utoipa::path(post, path = "/v1/tokens", tag = "accounts",
    summary = "Create a token for an account (admin); the secret is shown once",
    request_body = TokenCreate, responses((status = 201, body = TokenCreated)))]
async fn create_token(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<TokenCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_token(&c, req).await?)))
}
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "accounts", summary = "Revoke a token (admin)",
    params(("id" = String, Path, description = "Token id (`tok_…`)")),
    responses((status = 204, description = "Revoked")))]
async fn delete_token(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_token(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/accounts/{id}/trust-policies", tag = "accounts",
    summary = "Let identity tokens that match act as the account (admin)",
    params(("id" = String, Path, description = "Account id (`acc_…`)")),
    request_body = TrustPolicyCreate, responses((status = 201, body = TrustPolicy)))]
async fn create_trust_policy(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<TrustPolicyCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_trust_policy(&c, &id, req).await?)))
}
#[utoipa::path(get, path = "/v1/accounts/{id}/trust-policies", tag = "accounts",
    summary = "List an account's trust policies (admin)",
    params(("id" = String, Path, description = "Account id (`acc_…`)"), ListQuery),
    responses((status = 200, body = List<TrustPolicy>)))]
async fn list_trust_policies(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<TrustPolicy>>> {
    Ok(Json(app.list_trust_policies(&c, &id, &q.page()?).await?))
}
#[utoipa::path(get, path = "/v1/accounts/{id}/trust-policies/{pid}", tag = "accounts",
    summary = "Show a trust policy (admin)",
    params(("id" = String, Path, description = "Account id (`acc_…`)"),
    ("pid" = String, Path, description = "Trust policy id (`trp_…`)")),
    responses((status = 200, body = TrustPolicy)))]
async fn get_trust_policy(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Json<TrustPolicy>> {
    Ok(Json(app.get_trust_policy(&c, &id, &pid).await?))
}
#[utoipa::path(delete, path = "/v1/accounts/{id}/trust-policies/{pid}", tag = "accounts",
    summary = "Delete a trust policy (admin); tokens it gave out live out their lifetime",
    params(("id" = String, Path, description = "Account id (`acc_…`)"),
    ("pid" = String, Path, description = "Trust policy id (`trp_…`)")),
    responses((status = 204, description = "Deleted")))]
async fn delete_trust_policy(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    app.delete_trust_policy(&c, &id, &pid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// No `Authorization`: the identity token is the credential. A refusal is 401 `unauthorized` whose
/// `details.reason` names the failed check: `signature`, `issuer`, `audience`, `expired` or
/// `no_matching_policy`.
#[utoipa::path(post, path = "/v1/auth/oidc", tag = "accounts", security(()),
    summary = "Exchange an OIDC identity token (a CI job's) for a short-lived token of the account a trust policy names",
    request_body = OidcExchange, responses((status = 201, body = OidcToken),
    (status = 400, description = "The body is not `{token}`", body = ErrorBody),
    (status = 401, description = "Refused: `details.reason` names the failed check", body = ErrorBody),
    (status = 503, description = "The issuer's keys cannot be fetched now", body = ErrorBody)))]
async fn exchange_oidc(State(app): S, Body(req): Body<OidcExchange>) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.exchange_oidc(&req.token).await?)))
}

#[utoipa::path(post, path = "/v1/templates", tag = "templates", summary = "Create a template",
    request_body = TemplateSpec, responses((status = 201, body = Template)))]
async fn create_template(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<TemplateSpec>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_template(&c, req).await?)))
}
#[utoipa::path(get, path = "/v1/templates", tag = "templates", summary = "List templates",
    params(ListQuery), responses((status = 200, body = List<Template>)))]
async fn list_templates(
    State(app): S,
    Auth(c): Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<Template>>> {
    Ok(Json(app.list_templates(&c, &q.page()?).await?))
}
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates", summary = "Get a template by id or name",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name")),
    responses((status = 200, body = Template)))]
async fn get_template(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Template>> {
    Ok(Json(app.get_template(&c, &id).await?.template))
}
#[utoipa::path(patch, path = "/v1/templates/{id}", tag = "templates",
    summary = "Update a template; present fields replace",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name")),
    request_body = TemplatePatch, responses((status = 200, body = Template)))]
async fn update_template(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<TemplatePatch>,
) -> ApiResult<Json<Template>> {
    Ok(Json(app.update_template(&c, &id, req).await?))
}
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates",
    summary = "Delete a template with its builds and tags",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name")),
    responses((status = 204, description = "Deleted")))]
async fn delete_template(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_template(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
#[utoipa::path(post, path = "/v1/templates/{id}/builds", tag = "builds",
    summary = "Start a build; its tags move when it is ready",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name")),
    request_body(content = Option<BuildCreate>, description = "May be left out"),
    responses((status = 202, body = Build)))]
async fn create_build(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<BuildCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::ACCEPTED, Json(app.create_build(&c, &id, req).await?)))
}
#[utoipa::path(get, path = "/v1/templates/{id}/builds", tag = "builds",
    summary = "List a template's builds (in id order, a page at a time)",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name"), ListQuery),
    responses((status = 200, body = List<Build>)))]
async fn list_builds(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<Build>>> {
    Ok(Json(app.list_builds(&c, &id, &q.page()?).await?))
}
#[utoipa::path(get, path = "/v1/builds/{id}", tag = "builds", summary = "Get a build",
    params(("id" = String, Path, description = "Build id (`bld_…`)")),
    responses((status = 200, body = Build)))]
async fn get_build(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Build>> {
    Ok(Json(app.get_build(&c, &id).await?.build))
}
#[utoipa::path(get, path = "/v1/builds/{id}/logs", tag = "builds", summary = "A build's log",
    params(("id" = String, Path, description = "Build id (`bld_…`)")),
    responses((status = 200, body = String, content_type = "text/plain; charset=utf-8")))]
async fn build_logs(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(([("content-type", "text/plain; charset=utf-8")], app.build_logs(&c, &id).await?))
}
/// Streams the artifact (`application/zstd`, a tar); answers an artifact token as well as an account token.
#[utoipa::path(get, path = "/v1/builds/{id}/artifact", tag = "builds",
    summary = "A ready build's artifact, a zstd tar (the kubernetes runtime's init containers fetch it)",
    params(("id" = String, Path, description = "Build id (`bld_…`)")),
    responses((status = 200, body = Vec<u8>, content_type = "application/zstd")))]
async fn build_artifact(
    State(app): S,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let path = app.build_artifact_file(super::bearer(&headers), &id).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| AppError::Internal(format!("opening {}: {e}", path.display())))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([("content-type", "application/zstd")], body))
}
#[utoipa::path(get, path = "/v1/templates/{id}/tags", tag = "builds", summary = "List a template's tags",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name")),
    responses((status = 200, body = List<Tag>)))]
async fn list_tags(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<Tag>>> {
    Ok(list(app.list_tags(&c, &id).await?))
}
#[utoipa::path(put, path = "/v1/templates/{id}/tags/{tag}", tag = "builds",
    summary = "Point a tag at a ready build",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name"), ("tag" = String, Path,
    description = "Tag name")),
    request_body = TagPut, responses((status = 200, body = Tag)))]
async fn put_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
    Body(req): Body<TagPut>,
) -> ApiResult<Json<Tag>> {
    Ok(Json(app.put_tag(&c, &id, &tag, &req.build_id).await?))
}
#[utoipa::path(get, path = "/v1/templates/{id}/tags/{tag}", tag = "builds", summary = "Get a tag",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name"), ("tag" = String, Path,
    description = "Tag name")),
    responses((status = 200, body = Tag)))]
async fn get_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<Json<Tag>> {
    Ok(Json(app.get_tag(&c, &id, &tag).await?))
}
#[utoipa::path(delete, path = "/v1/templates/{id}/tags/{tag}", tag = "builds", summary = "Delete a tag",
    params(("id" = String, Path, description = "Template id (`tpl_…`) or name"), ("tag" = String, Path,
    description = "Tag name")),
    responses((status = 204, description = "Deleted")))]
async fn delete_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    app.delete_tag(&c, &id, &tag).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/template-warm-pools", tag = "pools", summary = "Create a warm pool",
    request_body = WarmPoolSpec, responses((status = 201, body = WarmPool)))]
async fn create_pool(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<WarmPoolSpec>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_pool(&c, req).await?)))
}
#[utoipa::path(get, path = "/v1/template-warm-pools", tag = "pools", summary = "List warm pools",
    params(ListQuery), responses((status = 200, body = List<WarmPool>)))]
async fn list_pools(
    State(app): S,
    Auth(c): Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<WarmPool>>> {
    Ok(Json(app.list_pools(&c, &q.page()?).await?))
}
#[utoipa::path(get, path = "/v1/template-warm-pools/{id}", tag = "pools",
    summary = "Get a warm pool by id or name",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = WarmPool)))]
async fn get_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.get_pool(&c, &id).await?.pool))
}
#[utoipa::path(patch, path = "/v1/template-warm-pools/{id}", tag = "pools",
    summary = "Update a warm pool; present fields replace",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    request_body = WarmPoolPatch, responses((status = 200, body = WarmPool)))]
async fn update_pool(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<WarmPoolPatch>,
) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.update_pool_spec(&c, &id, req).await?))
}
#[utoipa::path(delete, path = "/v1/template-warm-pools/{id}", tag = "pools",
    summary = "Drain, then delete a warm pool",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 204, description = "Deleted")))]
async fn delete_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_pool(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
#[utoipa::path(get, path = "/v1/template-warm-pools/{id}/status", tag = "pools",
    summary = "A pool's live status",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = PoolStatus)))]
async fn pool_status(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<PoolStatus>> {
    Ok(Json(app.pool_status(&c, &id).await?))
}
#[utoipa::path(post, path = "/v1/template-warm-pools/{id}/enable", tag = "pools", summary = "Resume filling",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = WarmPool)))]
async fn enable_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.set_pool_state(&c, &id, PoolState::Enabled).await?))
}
#[utoipa::path(post, path = "/v1/template-warm-pools/{id}/disable", tag = "pools",
    summary = "Stop filling, keep the inventory",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = WarmPool)))]
async fn disable_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.set_pool_state(&c, &id, PoolState::Disabled).await?))
}
#[utoipa::path(post, path = "/v1/template-warm-pools/{id}/drain", tag = "pools",
    summary = "Stop filling, remove the inventory",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = WarmPool)))]
async fn drain_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.set_pool_state(&c, &id, PoolState::Draining).await?))
}
#[utoipa::path(post, path = "/v1/template-warm-pools/{id}/reconcile", tag = "pools",
    summary = "Run a reconcile pass now",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = WarmPool)))]
async fn reconcile_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.reconcile_now(&c, &id).await?))
}
#[utoipa::path(get, path = "/v1/template-warm-pools/{id}/leases", tag = "pools",
    summary = "A pool's active leases",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name")),
    responses((status = 200, body = List<Lease>)))]
async fn list_leases(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<Lease>>> {
    Ok(list(app.list_leases(&c, &id).await?))
}
#[utoipa::path(put, path = "/v1/template-warm-pools/{id}/leases/{key}", tag = "pools",
    summary = "Raise the pool's target for a while; the same key updates its lease",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name"),
        ("key" = String, Path, description = "Lease key; may hold slashes")),
    request_body = LeaseSpec, responses((status = 200, body = Lease)))]
async fn put_lease(
    State(app): S,
    Auth(c): Auth,
    Path((id, key)): Path<(String, String)>,
    Body(req): Body<LeaseSpec>,
) -> ApiResult<Json<Lease>> {
    Ok(Json(app.put_lease(&c, &id, key.trim_start_matches('/'), req).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReleaseQuery {
    /// Drain the pool when no other lease remains.
    #[serde(default)]
    drain_if_last: bool,
}

#[utoipa::path(delete, path = "/v1/template-warm-pools/{id}/leases/{key}", tag = "pools",
    summary = "Release a lease",
    params(("id" = String, Path, description = "Pool id (`twp_…`) or name"),
        ("key" = String, Path, description = "Lease key; may hold slashes"), ReleaseQuery),
    responses((status = 200, body = LeaseRelease)))]
async fn release_lease(
    State(app): S,
    Auth(c): Auth,
    Path((id, key)): Path<(String, String)>,
    Query(q): Query<ReleaseQuery>,
) -> ApiResult<Json<LeaseRelease>> {
    Ok(Json(app.release_lease(&c, &id, key.trim_start_matches('/'), q.drain_if_last).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    summary = "Create a sandbox, from a warm pool when one fits; it answers once readiness passed",
    request_body = SandboxCreate, responses((status = 201, body = Sandbox)))]
async fn create_sandbox(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<SandboxCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_sandbox(&c, req).await?)))
}
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", summary = "List sandboxes",
    params(ListQuery), responses((status = 200, body = List<Sandbox>)))]
async fn list_sandboxes(
    State(app): S,
    Auth(c): Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<List<Sandbox>>> {
    Ok(Json(app.list_sandboxes(&c, &q.page()?).await?))
}
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", summary = "Get a sandbox",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)")),
    responses((status = 200, body = Sandbox)))]
async fn get_sandbox(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Sandbox>> {
    Ok(Json(app.get_sandbox(&c, &id).await?))
}
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", summary = "Delete a sandbox",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)")),
    responses((status = 204, description = "Deleted")))]
async fn delete_sandbox(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_sandbox(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sandboxes",
    summary = "Run a command and wait for it, or stream it with `Accept: application/x-ndjson`",
    description = "With `Accept: application/x-ndjson` the answer is a stream of events as the command runs (no size \
        cap, no default timeout; the command is killed when the client goes away).",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)")),
    request_body = ExecRequest, responses((status = 200, body = ExecResult),
        (status = 200, content_type = "application/x-ndjson", body = StreamEvent)))]
async fn exec(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    Body(req): Body<ExecRequest>,
) -> ApiResult<axum::response::Response> {
    if super::io::wants_ndjson(&headers) {
        return Ok(super::io::ndjson(app.exec_stream(&c, &id, req).await?));
    }
    Ok(Json(app.exec(&c, &id, req).await?).into_response())
}
#[utoipa::path(get, path = "/v1/sandboxes/{id}/probes/{kind}", tag = "sandboxes",
    summary = "The latest result of a probe",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), ("kind" = ProbeKind, Path,
    description = "Which probe")),
    responses((status = 200, body = ProbeResult)))]
async fn probe(
    State(app): S,
    Auth(c): Auth,
    Path((id, kind)): Path<(String, String)>,
) -> ApiResult<Json<ProbeResult>> {
    let kind: ProbeKind = kind.parse().map_err(|m: String| FieldError::new("kind", m))?;
    Ok(Json(app.probe(&c, &id, kind).await?))
}
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// The last N lines (default 1000, at most 100000).
    #[param(value_type = Option<u32>, maximum = 100000)]
    tail: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes",
    summary = "The last lines of the sandbox processes' mirrored output",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), LogsQuery),
    responses((status = 200, body = List<LogLine>)))]
async fn logs(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<impl IntoResponse> {
    let tail = q
        .tail
        .map(|t| t.parse::<u32>().map_err(|_| FieldError::new("tail", format!("{t:?} is not a line count"))))
        .transpose()?;
    let lines = app.logs(&c, &id, tail).await?;
    // `{"items": [...]}`, written as the lines are read: the log is never held whole.
    use futures::StreamExt;
    let items = lines.enumerate().map(|(i, line)| {
        let mut chunk = if i == 0 { Vec::new() } else { b",".to_vec() };
        chunk.extend(serde_json::to_vec(&line).unwrap_or_default());
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(chunk))
    });
    let body = futures::stream::once(async { Ok(axum::body::Bytes::from_static(b"{\"items\":[")) })
        .chain(items)
        .chain(futures::stream::once(async { Ok(axum::body::Bytes::from_static(b"]}")) }));
    Ok(([("content-type", "application/json")], axum::body::Body::from_stream(body)))
}
