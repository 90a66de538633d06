//! HTTP request metrics as middleware: `warmpool_http_requests_total{route,method,status}` and
//! `warmpool_http_request_seconds{route}`, where `route` is the route's template (`/v1/sandboxes/:id`), never the
//! raw path, so a series per sandbox id cannot appear. Requests no route matched count as `unmatched`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::app::App;

/// The matched route's template, carried from the route layer out to [`count`] on the response.
#[derive(Debug, Clone)]
struct RouteTag(String);

/// On every matched route: tags the response with the route's template.
pub async fn tag_route(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map(|m| m.as_str().to_string());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteTag(route));
    }
    response
}

/// Around the whole router: counts and times each request (until its response head).
pub async fn count(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let route = response.extensions().get::<RouteTag>().map(|r| r.0.as_str()).unwrap_or("unmatched");
    app.metrics.http_request(route, method, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// The standard methods by name; anything else is `other` (a client cannot invent label values).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
