#!/usr/bin/env bash
# Installs the programs the tests drive besides Python packages, from Debian's packages:
# kubectl renders the k8s manifests, a real Prometheus scrapes the served metrics (promtool, in
# the same package, checks the alert rules), qemu-user runs the int8 model as a CPU without
# AVX-512/VNNI computes it, tmux is the terminal that `tailorgpt chat` is typed into, and a
# headless Chromium (with its driver) uses the playground.
set -euo pipefail
missing=()
command -v kubectl >/dev/null || missing+=(kubernetes-client)
{ command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
command -v qemu-x86_64 >/dev/null || missing+=(qemu-user)
command -v tmux >/dev/null || missing+=(tmux)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing test tools: install ${missing[*]} (e.g. 'sudo apt-get install ${missing[*]}') and rerun." >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
