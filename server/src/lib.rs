//! The Warmpool control plane: HTTP API (`http`), domain (`app`), durable state (`store`), sandbox runtimes
//! (`runtime`), the pool reconciler (`reconciler`), where images may come from (`images`), OIDC identity tokens
//! (`oidc`), metrics, and the `warmpool` CLI (`cli`).

pub mod app;
pub mod cli;
pub mod docs;
pub mod http;
pub mod images;
pub mod metrics;
pub mod oidc;
pub mod runtime;
pub mod secrets;
pub mod store;
