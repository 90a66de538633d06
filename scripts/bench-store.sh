#!/usr/bin/env bash
# Measures warm checkouts on each store, in one run: SQLite, PostgreSQL, and three replicas on one PostgreSQL,
# each at 1 and 32 clients (`warmpool bench checkout`). Starts and removes everything it uses (a PostgreSQL
# cluster in a temp dir, the servers, their sandboxes). Runs as root, with release binaries:
#   cargo build --release -p warmpool-server -p warmpool-procd && scripts/bench-store.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release
warm=${WARM:-200}
work=$(mktemp -d /tmp/warmpool-bench-store.XXXXXX)
chmod 755 "$work"
pids=()
# The PostgreSQL server tools (Debian keeps them off PATH, under /usr/lib/postgresql/<version>/bin).
pg_bin=$(dirname "$(ls /usr/lib/postgresql/*/bin/createdb 2>/dev/null | tail -1 || true)")
[ -x "$pg_bin/createdb" ] || pg_bin=$(dirname "$(command -v createdb)")

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Sandboxes outlive their server (by design); a run cut short leaves its containers, so they go here.
  for root in "$work"/data-*/runc; do
    for id in $(runc --root "$root" list -q 2>/dev/null); do runc --root "$root" delete --force "$id" || true; done
  done
  grep -F "$work" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  # Each data dir's layer filesystem stays mounted after its server exits (sandboxes survive restarts).
  for dir in "$work"/data-*; do
    umount "$dir/layers" 2>/dev/null || true
    losetup -j "$dir/layers.img" 2>/dev/null | cut -d: -f1 | xargs -r losetup -d 2>/dev/null || true
  done
  [ -d "$work/pg" ] && runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_server() { # data-dir port [database]
  local args=(serve --data-dir "$1" --listen "127.0.0.1:$2")
  [ -n "${3:-}" ] && args+=(--database "$3")
  "$bin/warmpool" "${args[@]}" >"$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$2/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "the server on port $2 did not start; see $1.log" >&2; exit 1
}

prepare() { # endpoint token: a template whose sandboxes are ready at once, built and tagged
  export WARMPOOL_ENDPOINT=$1 WARMPOOL_TOKEN=$2
  cat >"$work/template.json" <<'EOF'
{"name": "bench", "start_cmd": "exec sleep infinity"}
EOF
  "$bin/warmpool" template create -f "$work/template.json" >/dev/null
  "$bin/warmpool" template build bench --tag stable --wait >/dev/null
}

summary='
import json, sys
r = json.load(sys.stdin)
w, s = r["warm"], r["server_side_warm"]
print("client p50 %.2f ms, p99 %.2f ms; server p50 <= %s ms, p99 <= %s ms; %.0f checkouts/s (%d misses)" % (
    w["p50_ms"], w["p99_ms"], s["p50_ms_at_most"], s["p99_ms_at_most"], r["warm_throughput_per_s"], r["warm_misses"]))
'

measure() { # label [bench args...]
  local label=$1; shift
  for clients in 1 32; do
    echo "== $label, $clients client(s)"
    "$bin/warmpool" bench checkout --template bench:stable --warm "$warm" --clients "$clients" --cold 0 "$@" \
      | python3 -c "$summary"
  done
}

# SQLite
mkdir -p "$work/data-sqlite"
start_server "$work/data-sqlite" 7171
prepare http://127.0.0.1:7171 "$(cat "$work/data-sqlite/admin.token")"
measure "SQLite, 1 replica"

# PostgreSQL
mkdir -p "$work/pg" && chown postgres: "$work/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$work/pg/data" -U postgres -A trust >/dev/null
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" \
  -o "-k $work/pg -c listen_addresses=127.0.0.1 -p 55432" -w start >/dev/null
runuser -u postgres -- "$pg_bin/createdb" -h 127.0.0.1 -p 55432 -U postgres one
runuser -u postgres -- "$pg_bin/createdb" -h 127.0.0.1 -p 55432 -U postgres three
mkdir -p "$work/data-pg"
start_server "$work/data-pg" 7172 postgres://postgres@127.0.0.1:55432/one
prepare http://127.0.0.1:7172 "$(cat "$work/data-pg/admin.token")"
measure "PostgreSQL, 1 replica"

# The same server, as an account with a quota: each checkout counts the account's sandboxes under its lock.
api() { # path body: POST as the admin, print the answer's field $3
  curl -fsS -H "Authorization: Bearer $(cat "$work/data-pg/admin.token")" -H 'Content-Type: application/json' \
    -d "$2" "http://127.0.0.1:7172$1" | python3 -c "import json, sys; print(json.load(sys.stdin)['$3'])"
}
account=$(api /v1/accounts '{"name": "quota", "quotas": {"max_sandboxes": 100000, "max_warm_sandboxes": 100000}}' id)
prepare http://127.0.0.1:7172 "$(api /v1/tokens "{\"account_id\": \"$account\"}" token)"
measure "PostgreSQL, 1 replica, an account with a quota"

# Three replicas on one PostgreSQL, sharing a data dir (as replicas on one host do).
mkdir -p "$work/data-three"
for port in 7173 7174 7175; do
  start_server "$work/data-three" $port postgres://postgres@127.0.0.1:55432/three
done
prepare http://127.0.0.1:7173 "$(cat "$work/data-three/admin.token")"
measure "PostgreSQL, 3 replicas" --endpoints http://127.0.0.1:7173,http://127.0.0.1:7174,http://127.0.0.1:7175
