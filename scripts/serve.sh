#!/usr/bin/env bash
# Builds Warmpool and runs the control plane on its embedded defaults: SQLite and the local runtime (runc) in
# ./.warmpool, listening on 127.0.0.1:7070. Runs as root (sandboxes are OCI containers). Extra arguments go to
# `warmpool serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/host-deps.sh
echo "building warmpool and procd (release; the first build takes several minutes on a small machine)" >&2
cargo build --release -p warmpool-server -p warmpool-procd --bins
exec target/release/warmpool serve "$@"
