//! The routes that work inside a sandbox: processes, their output as `application/x-ndjson`, files and archives.
//! Bodies go through as streams both ways (never collected), up to `--max-upload-bytes`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use warmpool_api::*;

use super::{ApiResult, Auth, Body as JsonBody};
use crate::app::io::{Compression, Upload};
use crate::app::{App, AppError};

type S = State<Arc<App>>;

pub const NDJSON: &str = "application/x-ndjson";

pub fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(start_process, list_processes))
        .routes(routes!(get_process))
        .routes(routes!(process_output))
        .routes(routes!(process_stdin))
        .routes(routes!(process_signal))
        .routes(routes!(put_file, get_file, delete_file))
        .routes(routes!(put_archive, get_archive))
}

/// Whether the client asked for the streamed form (`Accept: application/x-ndjson`).
pub fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().any(|v| v.to_str().is_ok_and(|s| s.contains(NDJSON)))
}

/// Events as one JSON object per line, sent as they come.
pub fn ndjson(events: BoxStream<'static, StreamEvent>) -> Response {
    let body = events.map(|event| {
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(line))
    });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(body)).into_response()
}

fn bytes_response(data: crate::app::io::Download, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], Body::from_stream(data)).into_response()
}

/// The request body as a stream, refused at once when its declared length is past the limit.
fn upload(app: &App, headers: &HeaderMap, body: Body) -> ApiResult<Upload> {
    let limit = app.config.max_upload_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(AppError::PayloadTooLarge(format!(
            "the body is larger than {limit} bytes (the server's --max-upload-bytes)"
        ))
        .into());
    }
    Ok(body.into_data_stream().map(|r| r.map_err(std::io::Error::other)).boxed())
}

fn flag(name: &str, value: Option<&str>) -> Result<bool, FieldError> {
    match value {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(other) => Err(FieldError::new(name, format!("{other:?} is not true or false"))),
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "sandboxes",
    summary = "Start a process that outlives the request",
    description = "Its output is kept in the sandbox's ring buffer with byte offsets; read it with `…/output`.",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)")),
    request_body = ProcessCreate, responses((status = 201, body = Process)))]
async fn start_process(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ProcessCreate>,
) -> ApiResult<(StatusCode, Json<Process>)> {
    Ok((StatusCode::CREATED, Json(app.start_process(&c, &id, req).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "sandboxes",
    summary = "The sandbox's processes, warm processes included (by their name)",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)")),
    responses((status = 200, body = List<Process>)))]
async fn list_processes(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> ApiResult<Json<List<Process>>> {
    Ok(Json(List::all(app.list_processes(&c, &id).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "sandboxes",
    summary = "One process",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"),
        ("pid" = String, Path, description = "Process id (`proc_…`) or a warm process's name")),
    responses((status = 200, body = Process)))]
async fn get_process(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Json<Process>> {
    Ok(Json(app.get_process(&c, &id, &pid).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct OutputQuery {
    /// Byte offset into the process's combined output to start from (default 0).
    #[param(value_type = Option<u64>)]
    offset: Option<String>,
    /// Go on until the process exits, then send its exit event (default false).
    #[param(value_type = Option<bool>)]
    follow: Option<String>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{pid}/output", tag = "sandboxes",
    summary = "A process's output from an offset, as it happens",
    description = "One JSON object per line: `output` events (`stream`, `offset`, base64 `data`), a `dropped` event \
        when part of the range already left the ring, and with `follow=true` the `exit` event last. Reconnecting \
        with the last `offset` + the length of its data loses and repeats nothing.",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"),
        ("pid" = String, Path, description = "Process id (`proc_…`) or a warm process's name"), OutputQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = StreamEvent)))]
async fn process_output(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
    Query(q): Query<OutputQuery>,
) -> ApiResult<Response> {
    let offset = match q.offset.as_deref() {
        None => 0,
        Some(o) => o.parse().map_err(|_| FieldError::new("offset", format!("{o:?} is not a byte offset")))?,
    };
    let follow = flag("follow", q.follow.as_deref())?;
    Ok(ndjson(app.process_output(&c, &id, &pid, offset, follow).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StdinQuery {
    /// Close the process's stdin after the body (default false).
    #[param(value_type = Option<bool>)]
    close: Option<String>,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "sandboxes",
    summary = "Write raw bytes to a process's stdin",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"),
        ("pid" = String, Path, description = "Process id (`proc_…`)"), StdinQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204, description = "Written")))]
async fn process_stdin(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
    Query(q): Query<StdinQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<StatusCode> {
    let close = flag("close", q.close.as_deref())?;
    let body = upload(&app, &headers, body)?;
    app.process_stdin(&c, &id, &pid, body, close, app.config.max_upload_bytes).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "sandboxes",
    summary = "Send a signal to a process's group",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"),
        ("pid" = String, Path, description = "Process id (`proc_…`)")),
    request_body = SignalRequest, responses((status = 204, description = "Sent")))]
async fn process_signal(
    State(app): S,
    Auth(c): Auth,
    Path((id, pid)): Path<(String, String)>,
    JsonBody(req): JsonBody<SignalRequest>,
) -> ApiResult<StatusCode> {
    app.signal_process(&c, &id, &pid, req.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FileQuery {
    /// Absolute inside the sandbox, or relative to the template's `cwd`.
    #[param(value_type = String, required = true, min_length = 1)]
    path: Option<String>,
    /// Permission bits in octal (`0644`, the default) for `PUT`.
    mode: Option<String>,
    /// `GET`: list the directory instead of reading a file.
    #[param(value_type = Option<bool>)]
    list: Option<String>,
    /// `DELETE`: a directory with everything in it.
    #[param(value_type = Option<bool>)]
    recursive: Option<String>,
}

/// The `path` query parameter of the files and archive routes, which they all require.
fn required_path(path: &Option<String>) -> Result<&str, FieldError> {
    path.as_deref().filter(|p| !p.is_empty()).ok_or_else(|| FieldError::new("path", "is required"))
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "sandboxes",
    summary = "Write a file (parents created), whole or not at all",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = FileWritten)))]
async fn put_file(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<FileWritten>)> {
    let path = required_path(&q.path)?;
    let mode =
        match q.mode.as_deref() {
            None => None,
            Some(m) => Some(u32::from_str_radix(m, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| {
                FieldError::new("mode", format!("{m:?} is not an octal mode such as 0644"))
            })?),
        };
    let body = upload(&app, &headers, body)?;
    let written = app.put_file(&c, &id, path, mode, body, app.config.max_upload_bytes).await?;
    Ok((StatusCode::CREATED, Json(written)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "sandboxes",
    summary = "Read a file's bytes, or list a directory with `list=true`",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 200, description = "With `list=true`", body = List<FileEntry>)))]
async fn get_file(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Response> {
    let path = required_path(&q.path)?;
    if flag("list", q.list.as_deref())? {
        return Ok(Json(List::all(app.list_files(&c, &id, path).await?)).into_response());
    }
    Ok(bytes_response(app.get_file(&c, &id, path).await?, "application/octet-stream"))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "sandboxes",
    summary = "Delete a file, a link, an empty directory, or a tree with `recursive=true`",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), FileQuery),
    responses((status = 204, description = "Deleted")))]
async fn delete_file(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<StatusCode> {
    let recursive = flag("recursive", q.recursive.as_deref())?;
    app.delete_file(&c, &id, required_path(&q.path)?, recursive).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ArchiveQuery {
    /// `PUT`: the directory to unpack under (created if missing); `GET`: what to pack. Absolute inside the
    /// sandbox, or relative to the template's `cwd`.
    #[param(value_type = String, required = true, min_length = 1)]
    path: Option<String>,
    /// `GET`: `none` (default), `gzip` or `zstd`.
    compression: Option<String>,
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/archive", tag = "sandboxes",
    summary = "Unpack a tar stream under a directory",
    description = "The body is a tar stream (any `Content-Type`, e.g. `application/x-tar`); `Content-Encoding: gzip` \
        or `zstd` is accepted. Entries may not leave the directory; setuid bits are dropped; files belong to the \
        sandbox's user.",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), ArchiveQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ArchiveWritten)))]
async fn put_archive(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<ArchiveQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<ArchiveWritten>)> {
    let dir = required_path(&q.path)?;
    let encoding =
        headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let compression = match encoding.as_deref() {
        None | Some("") | Some("identity") => Compression::None,
        Some("gzip") | Some("x-gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        Some(other) => {
            return Err(FieldError::new(
                "Content-Encoding",
                format!("{other:?} is not gzip, zstd or identity"),
            )
            .into())
        }
    };
    let body = upload(&app, &headers, body)?;
    let written = app.put_archive(&c, &id, dir, compression, body, app.config.max_upload_bytes).await?;
    Ok((StatusCode::CREATED, Json(written)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/archive", tag = "sandboxes",
    summary = "A tar stream of a path",
    description = "A directory's contents (entries relative to it), or one file under its own name; symlinks stay \
        links.",
    params(("id" = String, Path, description = "Sandbox id (`sbx_…`)"), ArchiveQuery),
    responses((status = 200, content_type = "application/x-tar", body = Vec<u8>)))]
async fn get_archive(
    State(app): S,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<ArchiveQuery>,
) -> ApiResult<Response> {
    let path = required_path(&q.path)?;
    let compression = match q.compression.as_deref() {
        None | Some("none") => Compression::None,
        Some("gzip") => Compression::Gzip,
        Some("zstd") => Compression::Zstd,
        Some(other) => {
            return Err(FieldError::new("compression", format!("{other:?} is not none, gzip or zstd")).into())
        }
    };
    let data = app.get_archive(&c, &id, path, compression).await?;
    let content_type = match compression {
        Compression::None => "application/x-tar",
        Compression::Gzip => "application/gzip",
        Compression::Zstd => "application/zstd",
    };
    Ok(bytes_response(data, content_type))
}
