#!/usr/bin/env bash
# Makes the local base image (argument: its name) from Debian packages, for machines that reach
# no container registry: mmdebstrap builds the root file system from this machine's own apt
# sources, `podman import` turns it into an image. Skipped when the image already exists.
# Two kinds: the build base (default), with pip for BentoML's build stage; and with --runtime the
# base of the image's runtime stage (scripts/containerize.py): Python and CA certificates only,
# without pip and without documentation, manual pages and translations.
# usage: debian-base.sh IMAGE [PIP_INDEX_URL] | debian-base.sh --runtime IMAGE
set -euo pipefail
runtime=false
if [ "${1:-}" = --runtime ]; then
  runtime=true
  shift
fi
image=$1
podman image exists "$image" && exit 0

# The Debian suites apt on this machine uses, as "deb URI SUITE COMPONENT" lines: read from
# `apt-cache policy`, so that the mirror is this machine's, whatever file format declares it.
arch=$(dpkg --print-architecture)
mapfile -t sources < <(apt-cache policy | awk -v arch="$arch" '
  $2 ~ /^https?:/ && $NF == "Packages" { uri = $2; split($3, sc, "/"); next }
  uri && /release/ && /o=Debian,/ && $0 ~ ("b=" arch) { print "deb " uri " " sc[1] " " sc[2] }
  { uri = "" }' | sort -u)
[ ${#sources[@]} -gt 0 ] || { echo "debian-base: no Debian suite in this machine's apt sources" >&2; exit 1; }
. /etc/os-release

# The image build reaches the package index as this machine does: with its CA bundle (mounted by
# build-image.sh over the system's), so uv is told to use the system's certificates; and pip,
# which installs uv, with the index of this machine's pip configuration when it names one.
index=${2:-}
conf=$(mktemp -d)
rootfs=$conf/rootfs.tar
trap 'rm -rf "$conf"' EXIT
printf 'native-tls = true\n' >"$conf/uv.toml"
printf '[global]\n%s\n' "${index:+index-url = $index}" >"$conf/pip.conf"
# BentoML's Dockerfile installs uv with pip into the system Python, as on python:3.11-slim:
# Debian marks its Python externally managed (PEP 668), which would refuse that.
if $runtime; then
  # dpkg leaves these paths out of every package it installs (copyright files are kept).
  excludes=()
  for path in '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
    '/usr/share/lintian/*'; do
    excludes+=(--dpkgopt="path-exclude=$path")
  done
  mmdebstrap --quiet --variant=minbase --include=python3,ca-certificates \
    "${excludes[@]}" --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$VERSION_CODENAME" "$rootfs" "${sources[@]}"
else
  mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook="mkdir -p \"\$1/etc/uv\" && cp $conf/uv.toml \"\$1/etc/uv/\" && cp $conf/pip.conf \"\$1/etc/\"" \
    "$VERSION_CODENAME" "$rootfs" "${sources[@]}"
fi
podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' "$rootfs" "$image" >/dev/null
