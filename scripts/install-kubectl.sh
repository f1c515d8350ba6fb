#!/usr/bin/env bash
# Installs kubectl from Debian's packages (kubernetes-client) for the k8s manifest tests.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "kubectl is missing: install it (e.g. 'sudo apt-get install kubernetes-client') and rerun." >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
kubectl version --client
