//! `warmpool-action`: the logic of the Warmpool GitHub Action. `main` raises each pool with a lease, waits until
//! the burst's capacity is ready, and checks sandboxes out in `require` mode; `post` deletes them, releases the
//! lease and drains the pools no other lease holds. `scale-up`, `checkout` and `drain` are the same steps for
//! bursts that span jobs.

pub mod commands;
pub mod github;
pub mod runner;
pub mod work;

pub use commands::{run, Command};
