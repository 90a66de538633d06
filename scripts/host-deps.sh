#!/usr/bin/env bash
# Installs what the local runtime and the builds need on a fresh Debian machine, when it is missing:
# runc (runs every sandbox and build as an OCI container), iproute2 (the tests look at sandbox networking with
# `ip`), nftables (what sandboxes may reach), btrfs-progs (the disk-limited layers image: mkfs.btrfs, subvolumes, qgroups),
# umoci and skopeo (template images), busybox-static (the tests' tiny image) and protoc (the Terraform provider's
# build), the PostgreSQL server binaries (the tests start their own PostgreSQL) and, with --tests, Prometheus
# (`promtool` checks deploy/prometheus/warmpool-rules.yml; a test scrapes a real server with `prometheus`) and
# schemathesis from PyPI in a virtualenv (the API's conformance test). Safe to run again.
set -euo pipefail

missing=()
command -v runc >/dev/null || missing+=(runc)
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v mkfs.btrfs >/dev/null || missing+=(btrfs-progs)
command -v umoci >/dev/null || missing+=(umoci)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v busybox >/dev/null || missing+=(busybox-static)
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v protoc >/dev/null || [ -n "${PROTOC:-}" ] || missing+=(protobuf-compiler libprotobuf-dev)
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${1:-}" = --tests ]; then
  { command -v promtool >/dev/null && command -v prometheus >/dev/null; } || missing+=(prometheus)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (install them with your package manager, as root)" >&2
    exit 1
  fi
fi

# With --tests: schemathesis, pinned, where tests/e2e/openapi.rs looks for it.
[ "${1:-}" = --tests ] || exit 0
SCHEMATHESIS_VERSION=4.32.5
venv="${XDG_CACHE_HOME:-$HOME/.cache}/warmpool/schemathesis"
if [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
