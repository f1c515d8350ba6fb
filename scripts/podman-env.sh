# Sourced by build-image.sh and test-image.sh when there is no Docker engine: installs podman and
# what it needs from Debian's packages when missing, and points podman at a containers.conf of
# its own (CONTAINERS_CONF), so that the machine's configuration is left as it is.
missing=()
for tool in podman buildah mmdebstrap runc iptables; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing container tools: install ${missing[*]} (e.g. 'sudo apt-get install ${missing[*]}') and rerun." >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# runc: the runtime Debian ships with podman. The limits podman gives a container by default
# (nofile 1048576) can be above what may be set, and some sandboxes refuse raising them: give
# containers this shell's nofile, and nproc no higher than podman build's default (32768), the
# most such a sandbox was seen to allow.
nproc=$(ulimit -Hu)
[ "$nproc" != unlimited ] && [ "$nproc" -lt 32768 ] || nproc=32768
mkdir -p build/image
cat >build/image/containers.conf <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$PWD/build/image/containers.conf
if ! podman info >/dev/null 2>build/image/podman-info.err; then
  echo "podman cannot run here: $(tail -n 1 build/image/podman-info.err)" >&2
  exit 1
fi
