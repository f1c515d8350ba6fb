#!/usr/bin/env bash
# Start-up time of an image: seconds from `podman run` to the first 200 of /readyz, and to the
# first /v1/completions answer (8 tokens, sent as soon as /readyz answered), over RUNS runs (a
# fresh container each), then their medians. Polls every 0.1 s; the server binds 127.0.0.1 only.
# usage: bash scripts/startup-time.sh [IMAGE (default localhost/tailorgpt:latest)] [RUNS (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
. scripts/podman-env.sh

image=${1:-localhost/tailorgpt:latest}
runs=${2:-3}
name=tailorgpt-startup-$$
trap 'podman rm -f "$name" >/dev/null 2>&1 || true' EXIT
now() { date +%s.%N; }

ready_times=()
answer_times=()
for run in $(seq "$runs"); do
  port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url=http://127.0.0.1:$port
  start=$(now)
  podman run -d --name "$name" -p "127.0.0.1:$port:3000" "$image" >/dev/null
  until curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; do
    if awk -v s="$start" -v n="$(now)" 'BEGIN { exit !(n - s > 300) }'; then
      echo "startup-time: /readyz did not answer within 300 s" >&2
      exit 1
    fi
    sleep 0.1
  done
  ready=$(now)
  curl -fsS -o /dev/null "$url/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "The", "max_tokens": 8, "temperature": 0}'
  answered=$(now)
  ready_times+=("$(awk -v s="$start" -v e="$ready" 'BEGIN { printf "%.1f", e - s }')")
  answer_times+=("$(awk -v s="$start" -v e="$answered" 'BEGIN { printf "%.1f", e - s }')")
  echo "run $run: /readyz after ${ready_times[-1]} s, first answer after ${answer_times[-1]} s"
  podman rm -f "$name" >/dev/null
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "startup-time: $image ($((size / 1000000)) MB): median of $runs runs: /readyz after $(median "${ready_times[@]}") s, first answer after $(median "${answer_times[@]}") s"
