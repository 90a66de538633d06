//! One handler per route; each parses, calls `app`, and shapes the response.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use warmpool_api::*;

use super::{ApiResult, Auth, Body, OptionalBody};
use crate::app::{App, AppError};

type S = State<Arc<App>>;

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(|| async { Json(super::openapi::document()) }))
        .route("/v1/accounts", post(create_account).get(list_accounts))
        .route("/v1/accounts/:id", axum::routing::patch(update_account))
        .route("/v1/tokens", post(create_token))
        .route("/v1/tokens/:id", axum::routing::delete(delete_token))
        .route("/v1/templates", post(create_template).get(list_templates))
        .route("/v1/templates/:id", get(get_template).patch(update_template).delete(delete_template))
        .route("/v1/templates/:id/builds", post(create_build).get(list_builds))
        .route("/v1/templates/:id/tags", get(list_tags))
        .route("/v1/templates/:id/tags/:tag", put(put_tag).get(get_tag).delete(delete_tag))
        .route("/v1/builds/:id", get(get_build))
        .route("/v1/builds/:id/logs", get(build_logs))
        .route("/v1/builds/:id/artifact", get(build_artifact))
        .route("/v1/template-warm-pools", post(create_pool).get(list_pools))
        .route("/v1/template-warm-pools/:id", get(get_pool).patch(update_pool).delete(delete_pool))
        .route("/v1/template-warm-pools/:id/status", get(pool_status))
        .route("/v1/template-warm-pools/:id/leases", get(list_leases))
        .route("/v1/template-warm-pools/:id/leases/*key", put(put_lease).delete(release_lease))
        .route("/v1/template-warm-pools/:id/:action", post(pool_action))
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/:id", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/:id/exec", post(exec))
        .route("/v1/sandboxes/:id/probes/:kind", get(probe))
        .route("/v1/sandboxes/:id/logs", get(logs))
}

fn list<T>(items: Vec<T>) -> Json<List<T>> {
    Json(List { items })
}

/// Ready while the store takes writes: a real (tiny) write, so a full disk or a read-only database shows here.
async fn readyz(State(app): S) -> impl IntoResponse {
    let write = app.store.check_writable();
    let store_ok = write.is_ok();
    let body = serde_json::json!({
        "status": if store_ok { "ready" } else { "not_ready" },
        "store": app.store.describe(),
        "store_error": write.err().map(|e| crate::app::AppError::from(e).to_string()),
        "runtime": app.runtime.details(),
        "reconciler": if app.config.reconciler_enabled { "on" } else { "off" },
        "replica": {"id": app.replica, "pools": app.owned_pools()},
    });
    (if store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}

async fn metrics(State(app): S) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], app.metrics.render())
}

async fn create_account(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<AccountCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_account(&c, req)?)))
}
async fn list_accounts(State(app): S, Auth(c): Auth) -> ApiResult<Json<List<Account>>> {
    Ok(list(app.list_accounts(&c)?))
}
async fn update_account(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<AccountPatch>,
) -> ApiResult<Json<Account>> {
    Ok(Json(app.update_account(&c, &id, req)?))
}
async fn create_token(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<TokenCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_token(&c, req)?)))
}
async fn delete_token(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_token(&c, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_template(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<TemplateSpec>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_template(&c, req)?)))
}
async fn list_templates(State(app): S, Auth(c): Auth) -> ApiResult<Json<List<Template>>> {
    Ok(list(app.list_templates(&c)?))
}
async fn get_template(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Template>> {
    Ok(Json(app.get_template(&c, &id)?.template))
}
async fn update_template(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<TemplatePatch>,
) -> ApiResult<Json<Template>> {
    Ok(Json(app.update_template(&c, &id, req)?))
}
async fn delete_template(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_template(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
async fn create_build(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<BuildCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::ACCEPTED, Json(app.create_build(&c, &id, req)?)))
}
async fn list_builds(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<Build>>> {
    Ok(list(app.list_builds(&c, &id)?))
}
async fn get_build(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Build>> {
    Ok(Json(app.get_build(&c, &id)?.build))
}
async fn build_logs(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    Ok(([("content-type", "text/plain; charset=utf-8")], app.build_logs(&c, &id)?))
}
/// Streams the artifact (`application/zstd`, a tar); answers an artifact token as well as an account token.
async fn build_artifact(
    State(app): S,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let path = app.build_artifact_file(super::bearer(&headers), &id)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| AppError::Internal(format!("opening {}: {e}", path.display())))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([("content-type", "application/zstd")], body))
}
async fn list_tags(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<Tag>>> {
    Ok(list(app.list_tags(&c, &id)?))
}
async fn put_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
    Body(req): Body<TagPut>,
) -> ApiResult<Json<Tag>> {
    Ok(Json(app.put_tag(&c, &id, &tag, &req.build_id)?))
}
async fn get_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<Json<Tag>> {
    Ok(Json(app.get_tag(&c, &id, &tag)?))
}
async fn delete_tag(
    State(app): S,
    Auth(c): Auth,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    app.delete_tag(&c, &id, &tag)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_pool(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<WarmPoolSpec>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_pool(&c, req)?)))
}
async fn list_pools(State(app): S, Auth(c): Auth) -> ApiResult<Json<List<WarmPool>>> {
    Ok(list(app.list_pools(&c)?))
}
async fn get_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.get_pool(&c, &id)?.pool))
}
async fn update_pool(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<WarmPoolPatch>,
) -> ApiResult<Json<WarmPool>> {
    Ok(Json(app.update_pool_spec(&c, &id, req)?))
}
async fn delete_pool(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_pool(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
async fn pool_status(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<PoolStatus>> {
    Ok(Json(app.pool_status(&c, &id)?))
}
async fn pool_action(
    State(app): S,
    Auth(c): Auth,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<WarmPool>> {
    let pool = match action.as_str() {
        "enable" => app.set_pool_state(&c, &id, PoolState::Enabled)?,
        "disable" => app.set_pool_state(&c, &id, PoolState::Disabled)?,
        "drain" => app.set_pool_state(&c, &id, PoolState::Draining)?,
        "reconcile" => app.reconcile_now(&c, &id).await?,
        other => {
            return Err(crate::app::not_found("route", &format!("template-warm-pools/{id}/{other}")).into())
        }
    };
    Ok(Json(pool))
}
async fn list_leases(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<Lease>>> {
    Ok(list(app.list_leases(&c, &id)?))
}
async fn put_lease(
    State(app): S,
    Auth(c): Auth,
    Path((id, key)): Path<(String, String)>,
    Body(req): Body<LeaseSpec>,
) -> ApiResult<Json<Lease>> {
    Ok(Json(app.put_lease(&c, &id, key.trim_start_matches('/'), req)?))
}

#[derive(Deserialize)]
struct ReleaseQuery {
    #[serde(default)]
    drain_if_last: bool,
}

async fn release_lease(
    State(app): S,
    Auth(c): Auth,
    Path((id, key)): Path<(String, String)>,
    Query(q): Query<ReleaseQuery>,
) -> ApiResult<Json<LeaseRelease>> {
    Ok(Json(app.release_lease(&c, &id, key.trim_start_matches('/'), q.drain_if_last)?))
}

async fn create_sandbox(
    State(app): S,
    Auth(c): Auth,
    Body(req): Body<SandboxCreate>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(app.create_sandbox(&c, req).await?)))
}
async fn list_sandboxes(State(app): S, Auth(c): Auth) -> ApiResult<Json<List<Sandbox>>> {
    Ok(list(app.list_sandboxes(&c)?))
}
async fn get_sandbox(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<Sandbox>> {
    Ok(Json(app.get_sandbox(&c, &id)?))
}
async fn delete_sandbox(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<StatusCode> {
    app.delete_sandbox(&c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
async fn exec(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResult>> {
    Ok(Json(app.exec(&c, &id, req).await?))
}
async fn probe(
    State(app): S,
    Auth(c): Auth,
    Path((id, kind)): Path<(String, String)>,
) -> ApiResult<Json<ProbeResult>> {
    let kind: ProbeKind = kind.parse().map_err(|m: String| FieldError::new("kind", m))?;
    Ok(Json(app.probe(&c, &id, kind).await?))
}
async fn logs(State(app): S, Auth(c): Auth, Path(id): Path<String>) -> ApiResult<Json<List<LogLine>>> {
    Ok(list(app.logs(&c, &id).await?))
}
