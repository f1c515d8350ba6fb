#!/usr/bin/env bash
# The container test, CI's second step after `make test`: builds the image of the demo model as
# `make image` does (with podman), runs it bound to 127.0.0.1 and checks /readyz, a
# /v1/completions answer, /metrics, that the server runs as a non-root uid, that the image is no
# larger than MAX_IMAGE_MB (default 600, in MB of 10^6 bytes as `podman images` counts them), and
# that the container's resident memory fits the memory k8s/base/deployment.yaml requests. It
# removes the container and the image it made, whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
. scripts/podman-env.sh

image=localhost/tailorgpt-imagetest:$$
name=tailorgpt-imagetest-$$
fail() {
  echo "test-image: FAIL: $*" >&2
  exit 1
}
cleanup() {
  podman rm -f "$name" >/dev/null 2>&1 || true
  podman rmi -f "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT

BACKEND=podman IMAGE=$image VENV=$venv bash scripts/build-image.sh
# The image's size, its layers' uncompressed content, against the target (README, Containers).
max_mb=${MAX_IMAGE_MB:-600}
size=$(podman image inspect --format '{{.Size}}' "$image")
[ "$size" -le $((max_mb * 1000000)) ] || fail "the image is $((size / 1000000)) MB, over the $max_mb MB target"
# Bind to a free port of the loopback only: the server is not for the network.
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
podman run -d --name "$name" -p "127.0.0.1:$port:3000" "$image" >/dev/null
url=http://127.0.0.1:$port

for _ in $(seq 180); do
  curl -fsS "$url/readyz" >/dev/null 2>&1 && break
  [ "$(podman inspect -f '{{.State.Running}}' "$name")" = true ] || { podman logs "$name" | tail -n 20; fail "the container exited before /readyz answered"; }
  sleep 1
done
curl -fsS "$url/readyz" >/dev/null || { podman logs "$name" | tail -n 20; fail "/readyz did not answer 200 within 180 s"; }

answer=$(curl -fsS "$url/v1/completions" -H 'Content-Type: application/json' \
  -d '{"prompt": "The", "max_tokens": 8, "temperature": 0}') || fail "/v1/completions did not answer 200"
"$venv/bin/python" -c '
import json, sys
answer = json.loads(sys.argv[1])
assert answer["choices"][0]["text"], answer
assert answer["usage"]["completion_tokens"] > 0, answer
' "$answer" || fail "/v1/completions answered without a completion: $answer"

curl -fsS "$url/metrics" | grep -q '^tailorgpt_requests_total' || fail "/metrics has no tailorgpt_requests_total"

# The uid of the server process (pid 1 and every other process in the container).
uids=$(podman exec "$name" sh -c 'for s in /proc/[0-9]*/status; do awk "/^Uid:/ {print \$2}" "$s"; done' | sort -u)
grep -qx 0 <<<"$uids" && fail "a process in the container runs as root (uids: $(echo $uids))"

# Resident memory of all its processes, after a request, against the manifest's request.
rss_kib=$(podman exec "$name" sh -c 'cat /proc/[0-9]*/status' | awk '/^VmRSS:/ {s += $2} END {print s}')
request=$("$venv/bin/python" -c '
import yaml
with open("k8s/base/deployment.yaml") as f:
    deployment = yaml.safe_load(f)
print(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"])')
request_kib=$("$venv/bin/python" -c '
import re, sys
number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", sys.argv[1]).groups()
scale = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
print(int(float(number) * scale[unit] / 1024))' "$request")
[ "$rss_kib" -le "$request_kib" ] || fail "resident memory $((rss_kib / 1024)) MiB is over the $request the Deployment requests"

echo "test-image: OK: $image ($((size / 1000000)) MB of the $max_mb MB target) answered /readyz, /v1/completions and /metrics on 127.0.0.1:$port as uid $(echo $uids), resident memory $((rss_kib / 1024)) MiB of the $request requested"
