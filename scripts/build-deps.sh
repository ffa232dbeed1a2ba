#!/usr/bin/env bash
# The system packages the Rust build needs beyond a C toolchain, installed with
# apt-get when missing: libcurl's headers, with which librdkafka's configure turns
# on OAUTHBEARER/OIDC (rdkafka's `curl` feature). Without them the build still
# succeeds, silently without OIDC (a sink-core unit test says so). The Makefile's
# targets that build run this first; deploy/Dockerfile installs the same.
set -euo pipefail

PACKAGES=(libcurl4-openssl-dev)

pkg-config --exists libcurl 2>/dev/null && exit 0
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
echo "build-deps: installing ${PACKAGES[*]} with apt-get" >&2
apt=(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}")
"${apt[@]}" >&2 || { as_root apt-get update >&2 && "${apt[@]}" >&2; } || {
    echo "build-deps: could not install ${PACKAGES[*]}; install them and re-run" >&2
    exit 1
}
