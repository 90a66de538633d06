//! End-to-end tests of the control plane: an in-process server on a temp data dir and an ephemeral port, real
//! SQLite files, real procd processes; plus the real `warmpool` binary for the CLI and crash recovery.

mod harness;

mod api;
mod cli;
mod docs;
mod domain;
mod observability;
mod oidc;
mod pools;
mod restart;
mod sandboxes;
mod stall;
