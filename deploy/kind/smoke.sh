#!/usr/bin/env bash
# Deploys warmpool on a kind cluster and runs the pool flow against it: a build (steps in a pod, artifact packed and
# served back), a pool filled with pods, a `require` checkout whose pod has the artifact, and a drain.
#
#   kind create cluster --name warmpool
#   docker build -f deploy/Dockerfile -t warmpool:dev . && kind load docker-image warmpool:dev --name warmpool
#   deploy/kind/smoke.sh warmpool:dev
set -euo pipefail
IMAGE=${1:-warmpool:dev}
NS=${NS:-warmpool}
cd "$(dirname "$0")/../.."

kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
# A throwaway PostgreSQL for the control plane (use a managed one in production).
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: postgres, labels: {app: postgres}}
spec:
  containers:
    - name: postgres
      image: postgres:15
      env:
        - {name: POSTGRES_USER, value: warmpool}
        - {name: POSTGRES_PASSWORD, value: warmpool}
      ports: [{containerPort: 5432}]
      readinessProbe: {exec: {command: [pg_isready, -U, warmpool]}}
---
apiVersion: v1
kind: Service
metadata: {name: postgres}
spec: {selector: {app: postgres}, ports: [{port: 5432}]}
YAML
kubectl -n "$NS" create secret generic warmpool-postgres \
  --from-literal=url=postgres://warmpool:warmpool@postgres:5432/warmpool --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" wait --for=condition=Ready pod/postgres --timeout=180s

kubectl -n "$NS" apply -k deploy/kubernetes
kubectl -n "$NS" patch deployment warmpool --type=json -p "[
  {\"op\": \"replace\", \"path\": \"/spec/template/spec/containers/0/image\", \"value\": \"$IMAGE\"},
  {\"op\": \"replace\", \"path\": \"/spec/template/spec/containers/0/args/3\", \"value\": \"--image=$IMAGE\"}]"
kubectl -n "$NS" rollout status deployment/warmpool --timeout=180s

kubectl -n "$NS" port-forward svc/warmpool 7070:7070 >/dev/null 2>&1 &
trap 'kill $!' EXIT
sleep 2
export WARMPOOL_ENDPOINT=http://127.0.0.1:7070
WARMPOOL_TOKEN=$(kubectl -n "$NS" exec deploy/warmpool -- cat /var/lib/warmpool/admin.token)
export WARMPOOL_TOKEN
WARMPOOL=${WARMPOOL:-warmpool}

cat > /tmp/warmpool-smoke.json <<'JSON'
{
  "name": "smoke",
  "image": "debian:12-slim",
  "build": {"steps": ["echo built > built.txt"]},
  "start_cmd": "touch /tmp/started; exec sleep infinity",
  "readiness": {"exec": {"command": ["test", "-f", "/tmp/started"]}, "timeout_ms": 120000}
}
JSON
$WARMPOOL template create -f /tmp/warmpool-smoke.json
$WARMPOOL template build smoke --tag stable --wait
$WARMPOOL pool create --name smoke --template smoke:stable --min-ready 2 --max-ready 2
$WARMPOOL pool wait smoke --ready 2 --timeout 5m
kubectl -n "$NS" get pods -l app.kubernetes.io/managed-by=warmpool
ID=$($WARMPOOL sandbox create --warm-pool smoke --warm-pool-mode require --json | sed -n 's/.*"id": *"\(sbx_[0-9a-f]*\)".*/\1/p' | head -1)
test "$($WARMPOOL sandbox exec "$ID" -- cat built.txt)" = built
$WARMPOOL sandbox delete "$ID"
$WARMPOOL pool drain smoke
echo "smoke test passed"
