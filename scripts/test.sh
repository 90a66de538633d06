#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: builds the binaries the end-to-end tests start (warmpool,
# procd), then runs the suite with cargo-nextest (cargo test where nextest is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is required (rustup.rs)" >&2; exit 1; }
export RUST_LIB_BACKTRACE=0

# runc, nftables, protoc, PostgreSQL, schemathesis (see the script).
./scripts/host-deps.sh --tests
command -v terraform >/dev/null || echo "warning: terraform is not on PATH; the provider's tests will fail saying so" >&2
command -v node >/dev/null || echo "warning: node is not on PATH; the action's shim test will fail saying so" >&2

cargo build --workspace --bins --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
