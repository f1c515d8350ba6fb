#!/usr/bin/env bash
# `make image`: a Bento of the served model, then a container image of it, tagged IMAGE
# (default tailorgpt:<model version>). Settings (environment): MODEL (store tag; default the demo
# model, trained and imported first when the store has none), IMAGE, BASE_IMAGE, and the
# TAILORGPT_* engine settings to record in the Bento. The Docker engine builds the image when one
# answers, else podman; BASE_IMAGE defaults to BentoML's base with Docker, and to a local Debian
# base made from this machine's apt sources with podman (no container registry needed).
# The image has two stages (scripts/containerize.py): BentoML's build on BASE_IMAGE, then a
# runtime stage on RUNTIME_BASE_IMAGE (default: BASE_IMAGE when it is given or Docker builds,
# else a second local Debian base with Python only) holding the virtual environment and the Bento.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}

model=${MODEL:-tailorgpt-demo:latest}
# In the store and exported by this tailorgpt (an older export lacks the int8-KV-cache graph
# or its LoRA twin, and the server would refuse it at start, or refuse adapters over it).
servable() {
  "$venv/bin/python" -c '
import sys
from pathlib import Path
import bentoml
from artifacts import VARIANT_FILES, lora_file
graph = lora_file(VARIANT_FILES["int8_kv_int8"])
sys.exit(not (Path(bentoml.models.get(sys.argv[1]).path) / graph).is_file())
' "$model" >/dev/null 2>&1
}
if ! servable; then
  if [ -n "${MODEL:-}" ]; then
    echo "image: model $MODEL is not in the BentoML store (see 'bentoml models list'), or an" \
      "older tailorgpt exported it: export it again with 'tailorgpt export --name'" >&2
    exit 1
  fi
  "$venv/bin/tailorgpt" quickstart --train_file samples/corpus --name demo --output_dir runs/demo --no_serve
fi
# The exact version, not "latest": the Bento and the image name the model they hold.
version=$("$venv/bin/bentoml" models get "$model" -o json | "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["version"])')
model=${model%%:*}:$version
image=${IMAGE:-tailorgpt:$version}

# The package index of this machine's pip configuration, when it names one; local (file://)
# indexes are left out: the image build cannot read them.
index=$("$venv/bin/pip" config get global.index-url 2>/dev/null || true)
read -ra extra <<<"$("$venv/bin/pip" config get global.extra-index-url 2>/dev/null || true)"
remote_extra=()
for url in "${extra[@]}"; do
  [[ $url == http* ]] && remote_extra+=("$url")
done

# BACKEND=podman chooses podman even where Docker answers (the container test runs with podman).
if [ "${BACKEND:-}" != podman ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  backend=docker
  base=${BASE_IMAGE:-}
else
  backend=podman
  . scripts/podman-env.sh
  . /etc/os-release
  base=${BASE_IMAGE:-localhost/tailorgpt-base:$VERSION_CODENAME}
  [ -n "${BASE_IMAGE:-}" ] || bash scripts/debian-base.sh "$base" "$index"
  if [ -z "${BASE_IMAGE:-}" ] && [ -z "${RUNTIME_BASE_IMAGE:-}" ]; then
    RUNTIME_BASE_IMAGE=localhost/tailorgpt-runtime-base:$VERSION_CODENAME
    bash scripts/debian-base.sh --runtime "$RUNTIME_BASE_IMAGE"
  fi
fi
runtime_base=${RUNTIME_BASE_IMAGE:-}

mkdir -p build/image
"$venv/bin/python" scripts/bentofile.py build/image/bentofile.yaml "$model" "$base" "$index" "${remote_extra[@]}"
bento=$("$venv/bin/bentoml" build -f build/image/bentofile.yaml --label "model=$model" -o tag . | tail -n 1)
bento=${bento#__tag__:}

opts=()
if [ "$backend" = podman ]; then
  # The build reaches the package index through this machine's TLS setup: its CA bundle. (One
  # mount only: BentoML joins several --opt volume values into one.)
  ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  opts=(--opt "volume=$ca:/etc/ssl/certs/ca-certificates.crt:ro")
fi
# The default image is also tailorgpt:latest, the one k8s/base names.
tags=(-t "$image")
[ -n "${IMAGE:-}" ] || tags+=(-t tailorgpt:latest)
"$venv/bin/python" scripts/containerize.py "$runtime_base" "$bento" --backend "$backend" "${tags[@]}" "${opts[@]}" --opt "label=tailorgpt.model=$model"
echo "image: $image (Bento $bento, model $model, built with $backend${base:+ from $base}${runtime_base:+, runtime on $runtime_base})"
