//! Warmpool's wire types: what the HTTP API accepts and returns, shared by the server, the client, procd, the
//! Terraform provider and the GitHub Action so the wire format is written once. No I/O lives here; validation that
//! needs only the value itself (names, refs, probe specs, `cwd` rules) does, so every caller rejects the same input
//! with the same field path.

pub mod account;
pub mod error;
pub mod pool;
pub mod probe;
pub mod refs;
pub mod sandbox;
pub mod template;

pub use account::*;
pub use error::*;
pub use pool::*;
pub use probe::*;
pub use refs::*;
pub use sandbox::*;
pub use template::*;

use serde::{Deserialize, Serialize};

/// Every list endpoint returns `{"items": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
}

/// Id prefixes, one per kind of resource.
pub mod id_prefix {
    pub const TEMPLATE: &str = "tpl_";
    pub const BUILD: &str = "bld_";
    pub const SANDBOX: &str = "sbx_";
    pub const WARM_POOL: &str = "twp_";
    pub const ACCOUNT: &str = "acc_";
    pub const TOKEN: &str = "tok_";
}
