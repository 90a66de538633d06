//! The HTTP API: translates requests into `app` calls and `AppError`s into the error body. Error
//! codes map to statuses here and nowhere else.

pub mod handlers;
pub mod io;
mod metrics;
pub mod openapi;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;
use warmpool_api::{join_path, ErrorBody, ErrorCode, ErrorDetail, FieldError};

use crate::app::{App, AppError, Caller};

/// Request bodies above this are rejected with `payload_too_large`.
pub const BODY_LIMIT: usize = 1 << 20;

/// An error as the API reports it.
#[derive(Debug)]
pub enum ApiError {
    App(AppError),
    PayloadTooLarge,
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        ApiError::App(e)
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::App(AppError::Invalid(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, message, details) = match self {
            ApiError::PayloadTooLarge => (
                ErrorCode::PayloadTooLarge,
                format!("request body is larger than {BODY_LIMIT} bytes"),
                serde_json::json!({}),
            ),
            ApiError::App(e) => match e {
                AppError::Invalid(f) => {
                    (ErrorCode::InvalidRequest, f.to_string(), serde_json::json!({"field": f.field}))
                }
                AppError::Unauthorized => (ErrorCode::Unauthorized, e.to_string(), serde_json::json!({})),
                AppError::OidcRefused { check, message } => {
                    (ErrorCode::Unauthorized, message, serde_json::json!({"reason": check}))
                }
                AppError::Forbidden { field, message } => {
                    let details = match field {
                        Some(f) => serde_json::json!({"field": f}),
                        None => serde_json::json!({}),
                    };
                    (ErrorCode::Forbidden, message, details)
                }
                AppError::NotFound { .. } => (ErrorCode::NotFound, e.to_string(), serde_json::json!({})),
                AppError::Conflict(m) => (ErrorCode::Conflict, m, serde_json::json!({})),
                AppError::Quota(m) => (ErrorCode::QuotaExceeded, m, serde_json::json!({})),
                AppError::PayloadTooLarge(m) => (ErrorCode::PayloadTooLarge, m, serde_json::json!({})),
                AppError::WarmPoolUnavailable { reason, field, message } => {
                    let mut d = serde_json::json!({"reason": reason});
                    if let Some(f) = field {
                        d["field"] = f.into();
                    }
                    (ErrorCode::WarmPoolUnavailable, message, d)
                }
                AppError::ServiceUnavailable(m) => {
                    tracing::warn!(message = %m, "Answering service_unavailable");
                    (ErrorCode::ServiceUnavailable, m, serde_json::json!({}))
                }
                AppError::Runtime { ref message, ref source } => {
                    tracing::warn!(error = &e as &dyn std::error::Error, "The runtime failed");
                    let code = if source.is_out_of_space() {
                        ErrorCode::ServiceUnavailable
                    } else {
                        ErrorCode::Conflict
                    };
                    (code, message.clone(), serde_json::json!({}))
                }
                AppError::Store(_) | AppError::Internal(_) => {
                    tracing::error!(error = &e as &dyn std::error::Error, "Internal error");
                    (ErrorCode::Internal, "internal error (see the server log)".into(), serde_json::json!({}))
                }
            },
        };
        let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody { error: ErrorDetail { code: code.as_str().into(), message, details } };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The caller, from `Authorization: Bearer <token>`.
pub struct Auth(pub Caller);

#[axum::async_trait]
impl FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        Ok(Auth(app.authenticate(bearer(&parts.headers)).await?))
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

/// A JSON body: unknown fields and type errors are `invalid_request` naming the field path.
pub struct Body<T>(pub T);

#[axum::async_trait]
impl<T: DeserializeOwned + ToSchema> FromRequest<Arc<App>> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &Arc<App>) -> Result<Self, ApiError> {
        parse_body(&body_bytes(req, state).await?).map(Body)
    }
}

/// A JSON body that may be left out (an empty body is `T::default()`).
pub struct OptionalBody<T>(pub T);

#[axum::async_trait]
impl<T: DeserializeOwned + ToSchema + Default> FromRequest<Arc<App>> for OptionalBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &Arc<App>) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        let text = bytes.trim_ascii();
        if text.is_empty() || text == b"null" {
            return Ok(OptionalBody(T::default()));
        }
        parse_body(&bytes).map(OptionalBody)
    }
}

async fn body_bytes(req: Request, state: &Arc<App>) -> ApiResult<axum::body::Bytes> {
    axum::body::Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            FieldError::new("body", r.body_text()).into()
        }
    })
}

/// Parses JSON, naming the failing field (`warm_processes[1].cwd`, or the unknown field itself). A number
/// with a zero fraction (`15.0`) is an integer, as JSON Schema has it; integers stop at int64, as the schema
/// documents; an array is never an object (which serde would take field by field).
pub fn parse_body<T: DeserializeOwned + ToSchema>(bytes: &[u8]) -> ApiResult<T> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        let message = e.to_string();
        FieldError::new("body", message.split(" at line ").next().unwrap_or(&message))
    })?;
    if !value.is_object() {
        return Err(FieldError::new("body", "must be a JSON object").into());
    }
    normalize_numbers(&mut value, "")?;
    no_nul(&value, "")?;
    let schemas = &openapi::json()["components"]["schemas"];
    objects_are_objects(&value, &schemas[T::name().as_ref()], schemas, "")?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let message = inner.split(" at line ").next().unwrap_or(&inner).to_string();
        // The path already ends with an unknown field's name; at the root, take the name from the message.
        let unknown = message.strip_prefix("unknown field `").and_then(|r| r.split('`').next());
        let field = match unknown {
            _ if path != "." => path,
            Some(name) => name.to_string(),
            None => "body".to_string(),
        };
        let message = if message.starts_with("unknown field") {
            message.split(", expected").next().unwrap_or(&message).to_string()
        } else {
            message
        };
        ApiError::App(AppError::Invalid(FieldError::new(field, message)))
    })
}

/// Makes `15.0` the integer 15 and refuses integers beyond int64, the largest the schema documents.
fn normalize_numbers(value: &mut serde_json::Value, path: &str) -> Result<(), FieldError> {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 2f64.powi(63) {
                *value = (f as i64).into();
            }
        }
        Value::Number(n) if n.as_i64().is_none() => {
            return Err(FieldError::new(
                if path.is_empty() { "body" } else { path },
                format!("must be at most {}", i64::MAX),
            ));
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                normalize_numbers(item, &format!("{path}[{i}]"))?;
            }
        }
        Value::Object(fields) => {
            for (key, v) in fields.iter_mut() {
                normalize_numbers(v, &join_path(path, key))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Refuses a NUL character in any string or key of a body, naming where: no name, key, label or command of the
/// API may hold one (PostgreSQL cannot store it, a C string ends at it, and it hides what follows from logs).
fn no_nul(value: &serde_json::Value, path: &str) -> Result<(), FieldError> {
    use serde_json::Value;
    let at =
        |path: &str| FieldError::new(if path.is_empty() { "body" } else { path }, "must not contain NUL");
    match value {
        Value::String(text) if text.contains('\0') => Err(at(path)),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| no_nul(item, &format!("{path}[{i}]")))
        }
        Value::Object(fields) => fields.iter().try_for_each(|(key, v)| {
            let field = join_path(path, key);
            if key.contains('\0') {
                return Err(at(&field));
            }
            no_nul(v, &field)
        }),
        _ => Ok(()),
    }
}

/// Refuses a NUL character (`%00`; a raw one never makes it through HTTP parsing) in a path parameter or a query
/// value, naming the parameter, before any handler runs.
async fn no_nul_in_uri(req: Request, next: axum::middleware::Next) -> Response {
    let uri = req.uri();
    let is_nul = |text: &str| text.to_ascii_lowercase().contains("%00");
    let field = if is_nul(uri.path()) {
        Some(path_parameter(uri.path(), is_nul))
    } else if let Some(query) = uri.query().filter(|q| is_nul(q)) {
        let key = query.split('&').find(|pair| is_nul(pair)).and_then(|p| p.split('=').next()).unwrap_or("");
        Some(if key.is_empty() || is_nul(key) { "query".to_string() } else { key.to_string() })
    } else {
        None
    };
    match field {
        Some(field) => ApiError::from(FieldError::new(field, "must not contain NUL")).into_response(),
        None => next.run(req).await,
    }
}

/// The name of the documented path parameter (`{key}`) holding the first segment `bad` finds, else `path`.
fn path_parameter(path: &str, bad: impl Fn(&str) -> bool) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let Some(at) = segments.iter().position(|s| bad(s)) else { return "path".into() };
    for template in openapi::json()["paths"].as_object().into_iter().flatten().map(|(t, _)| t) {
        let parts: Vec<&str> = template.split('/').collect();
        // The lease key is the one parameter that takes the rest of the path (it may hold slashes).
        let rest = parts.last().is_some_and(|p| *p == "{key}") && template.contains("/leases/");
        let fits = parts.len() == segments.len() || (rest && segments.len() > parts.len());
        let literal_ok = parts.iter().zip(&segments).all(|(p, s)| p.starts_with('{') || p == s);
        if fits && literal_ok {
            let part = parts.get(at).copied().unwrap_or_else(|| parts.last().copied().unwrap_or(""));
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                return name.to_string();
            }
        }
    }
    "path".into()
}

/// Checks that every value its schema declares an object is one, naming the first that is not.
fn objects_are_objects(
    value: &serde_json::Value,
    schema: &serde_json::Value,
    schemas: &serde_json::Value,
    path: &str,
) -> Result<(), FieldError> {
    use serde_json::Value;
    if let Some(name) = schema["$ref"].as_str().and_then(|r| r.rsplit('/').next()) {
        return objects_are_objects(value, &schemas[name], schemas, path);
    }
    // `Option<T>` is `oneOf: [null, T]`; other unions are serde's to check.
    if let Some(Value::Array(variants)) = schema.get("oneOf") {
        let typed: Vec<&Value> = variants.iter().filter(|v| v["type"] != "null").collect();
        return match (value, typed.as_slice()) {
            (Value::Null, _) => Ok(()),
            (_, [only]) => objects_are_objects(value, only, schemas, path),
            _ => Ok(()),
        };
    }
    let is = |kind: &str| {
        schema["type"] == kind || schema["type"].as_array().is_some_and(|t| t.iter().any(|t| t == kind))
    };
    match value {
        Value::Array(_) if is("object") && !is("array") => Err(FieldError::new(
            if path.is_empty() { "body" } else { path },
            "invalid type: array, expected an object",
        )),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, item)| {
            objects_are_objects(item, &schema["items"], schemas, &format!("{path}[{i}]"))
        }),
        Value::Object(fields) => fields.iter().try_for_each(|(key, v)| match schema["properties"].get(key) {
            Some(property) => objects_are_objects(v, property, schemas, &join_path(path, key)),
            None => objects_are_objects(v, &schema["additionalProperties"], schemas, &join_path(path, key)),
        }),
        _ => Ok(()),
    }
}

pub fn router(app: Arc<App>) -> axum::Router {
    handlers::routes()
        .0
        .route_layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .route_layer(axum::middleware::from_fn(no_nul_in_uri))
        .route_layer(axum::middleware::from_fn(request_span))
        .route_layer(axum::middleware::from_fn(metrics::tag_route))
        .fallback(unknown_route)
        .layer(axum::middleware::from_fn_with_state(app.clone(), metrics::count))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// A handler that panicked answers 500 `internal` (logged) instead of dropping the connection; the server goes on.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> Response {
    let what = match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(panic) => panic.downcast_ref::<&str>().map_or("a panic", |s| s).to_string(),
    };
    ApiError::App(AppError::Internal(format!("a handler panicked: {what}"))).into_response()
}

/// Every request runs in a span naming its method and route (the route's template, so ids stay out of it); what
/// the handler and the domain log below it carries both.
async fn request_span(
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use tracing::Instrument;
    let route = matched.as_ref().map_or("unknown", |m| m.as_str()).to_string();
    let span = tracing::info_span!("request", method = %request.method(), route);
    next.run(request).instrument(span).await
}

async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::App(AppError::NotFound { kind: "route", id: format!("{method} {}", uri.path()) })
}

/// Every error leaves in the JSON envelope, also the ones axum answers by itself (a method a route does not
/// take, a path segment that does not decode, a missing content type).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let allow = response.headers().get(axum::http::header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let (code, message, details) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = allow.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let message = format!("this route does not take that method (allowed: {allowed})");
            (ErrorCode::InvalidRequest, message, serde_json::json!({"field": "method", "allowed": allowed}))
        }
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such route".to_string(), serde_json::json!({})),
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            format!("request body is larger than {BODY_LIMIT} bytes"),
            serde_json::json!({}),
        ),
        s if s.is_client_error() => (ErrorCode::InvalidRequest, text, serde_json::json!({"field": "path"})),
        _ => (ErrorCode::Internal, "internal error (see the server log)".to_string(), serde_json::json!({})),
    };
    let body = ErrorBody { error: ErrorDetail { code: code.as_str().into(), message, details } };
    let mut response = (status, Json(body)).into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(axum::http::header::ALLOW, allow);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_handler_that_panics_answers_500_in_the_envelope() {
        use tower::ServiceExt;
        let router = axum::Router::new()
            .route("/boom", axum::routing::get(|| async { panic!("boom") as &str }))
            .route_layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
            .layer(axum::middleware::map_response(json_errors));
        let request = axum::http::Request::get("/boom").body(axum::body::Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert!(!body.to_string().contains("boom"), "the panic stays in the server log: {body}");
    }

    #[test]
    fn body_errors_name_the_field() {
        let err = parse_body::<warmpool_api::TemplateSpec>(br#"{"name":"a","colour":1}"#).unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "colour");
        let err = parse_body::<warmpool_api::TemplateSpec>(
            br#"{"name":"a","warm_processes":[{"type":"cmd","command":["x"]},{"type":"cmd","oops":1}]}"#,
        )
        .unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "warm_processes[1].oops");
        let err = parse_body::<warmpool_api::WarmPoolSpec>(
            br#"{"name":"a","template":"t","min_ready":-1,"max_ready":1}"#,
        )
        .unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "min_ready");
    }

    #[test]
    fn integers_may_carry_a_zero_fraction_and_arrays_are_not_objects() {
        let spec: warmpool_api::WarmPoolSpec =
            parse_body(br#"{"name":"a","template":"t","min_ready":2.0,"max_ready":3}"#).unwrap();
        assert_eq!((spec.min_ready, spec.max_ready), (2, 3));
        let err = parse_body::<warmpool_api::WarmPoolSpec>(
            br#"{"name":"a","template":"t","min_ready":2.5,"max_ready":3}"#,
        )
        .unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "min_ready");
        let err = parse_body::<warmpool_api::AccountCreate>(br#"{"name":"a","quotas":[1, 2]}"#).unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "quotas");
        let err = parse_body::<warmpool_api::WarmPoolSpec>(
            br#"{"name":"a","template":"t","min_ready":0,"max_ready":1,"idle_timeout_seconds":9223372036854775808}"#,
        )
        .unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "idle_timeout_seconds");
        let err = parse_body::<warmpool_api::TemplateSpec>(
            br#"{"name":"a","warm_processes":[{"type":"cmd","command":["x"],"probes":[]}]}"#,
        )
        .unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "warm_processes[0].probes");
        let err = parse_body::<warmpool_api::WarmPoolSpec>(b"{\"name\":").unwrap_err();
        let ApiError::App(AppError::Invalid(f)) = err else { panic!() };
        assert_eq!(f.field, "body");
    }
}
