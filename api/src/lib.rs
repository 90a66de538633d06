//! Warmpool's wire types: what the HTTP API accepts and returns, shared by the server, the client, procd, the
//! Terraform provider and the GitHub Action so the wire format is written once. No I/O lives here; validation that
//! needs only the value itself (names, refs, probe specs, `cwd` rules) does, so every caller rejects the same input
//! with the same field path.

pub mod account;
pub mod demand;
pub mod error;
pub mod ids;
pub mod io;
pub mod pool;
pub mod probe;
pub mod refs;
pub mod sandbox;
pub mod template;
pub mod trust;

pub use account::*;
pub use demand::*;
pub use error::*;
pub use ids::*;
pub use io::*;
pub use pool::*;
pub use probe::*;
pub use refs::*;
pub use sandbox::*;
pub use template::*;
pub use trust::*;

use serde::{Deserialize, Serialize};

/// Every list endpoint returns `{"items": [...]}`; a paginated one adds `next_cursor` while more items follow
/// (pass it as `?cursor=` for the next page).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    pub fn all(items: Vec<T>) -> Self {
        List { items, next_cursor: None }
    }
}

/// `?limit=` of a paginated list: the default and the largest.
pub const LIST_LIMIT_DEFAULT: u32 = 100;
pub const LIST_LIMIT_MAX: u32 = 1000;
