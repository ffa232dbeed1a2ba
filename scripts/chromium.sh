#!/usr/bin/env bash
# Debian's Chromium, for the live page's browser test, and CJK fonts, so its
# screenshots show Korean keywords: installed with apt-get when missing.
# `make test` runs this first.
set -euo pipefail

PACKAGES=(chromium fonts-noto-cjk)

command -v chromium > /dev/null && fc-list 2>/dev/null | grep -q "Noto Sans CJK" && exit 0
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
echo "chromium: installing ${PACKAGES[*]} with apt-get" >&2
apt=(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}")
"${apt[@]}" >&2 || { as_root apt-get update >&2 && "${apt[@]}" >&2; } || {
    echo "chromium: could not install ${PACKAGES[*]}; install them and re-run" >&2
    exit 1
}
