//! Attacks on the control plane from inside a sandbox (a sandbox is hostile; several accounts share one host).

mod procd;
