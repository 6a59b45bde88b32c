#!/usr/bin/env bash
# Builds the K-quant/IQ4/Q5 test models (testbed/fixtures/kquant/make_models.py) into a cache
# directory and prints that directory on stdout (the only line on stdout; progress goes to
# stderr). Tests read it from TPI_KQUANT_MODELS.
#
#   scripts/make-kquant-models.sh [CACHE_DIR]      default: ${TPI_CACHE:-$HOME/.cache/tpi}
#
# Needs python3 with pip, a C++ compiler and network access to PyPI only: it installs
# cmake, ninja, gguf and numpy into CACHE_DIR/kquant-venv, downloads the llama-cpp-python
# source distribution (which vendors llama.cpp), builds its `llama-quantize` once
# (about 5-8 minutes on 2 cores), then writes the models (about 1 GB, under a minute).
# Reruns print the directory at once unless the script or the generator changed.
set -euo pipefail

LLAMA_CPP_PYTHON="0.3.36"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
gen="$here/testbed/fixtures/kquant/make_models.py"

log() { printf 'make-kquant-models: %s\n' "$*" >&2; }
die() { printf 'make-kquant-models: error: %s\n' "$*" >&2; exit 1; }

cache="${1:-${TPI_CACHE:-$HOME/.cache/tpi}}"
mkdir -p "$cache" || die "cannot create $cache"
cache="$(cd "$cache" && pwd -P)"
out="$cache/kquant-models"
venv="$cache/kquant-venv"
src="$cache/llama-cpp-python-$LLAMA_CPP_PYTHON"
quantize="$src/build/bin/llama-quantize"

stamp="$(cat "$gen" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$out/manifest.json" && "$(cat "$out/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "cached: $out"
    printf '%s\n' "$out"
    exit 0
fi

py="$(command -v python3 || true)"
[[ -n "$py" ]] || die "python3 is needed"
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    "$py" -m venv "$venv" 1>&2 || die "python3 -m venv failed"
fi
"$venv/bin/pip" install -q --disable-pip-version-check cmake ninja gguf==0.19.0 numpy scikit-build-core 1>&2 \
    || die "pip install of cmake, ninja, gguf, numpy failed"

if [[ ! -x "$quantize" ]]; then
    dl="$cache/llama-cpp-python-sdist"
    rm -rf "$dl" && mkdir -p "$dl"
    log "downloading llama-cpp-python $LLAMA_CPP_PYTHON (source distribution)"
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-build-isolation \
        --no-binary llama-cpp-python -d "$dl" "llama-cpp-python==$LLAMA_CPP_PYTHON" 1>&2 \
        || die "pip download of llama-cpp-python failed"
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$src.tmp" || die "cannot unpack the sdist"
    rm -rf "$src" && mv "$src.tmp/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$src"
    rm -rf "$src.tmp" "$dl"
    log "building llama-quantize (portable, no -march=native)"
    PATH="$venv/bin:$PATH" cmake -S "$src" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON 1>&2 \
        || die "cmake configure failed"
    PATH="$venv/bin:$PATH" cmake --build "$src/build" --target llama-quantize -j "$(nproc)" 1>&2 \
        || die "building llama-quantize failed"
fi

log "writing the models into $out"
rm -rf "$out.tmp"
"$venv/bin/python" "$gen" --quantize "$quantize" --out "$out.tmp" 1>&2 || die "make_models.py failed"
printf '%s\n' "$stamp" > "$out.tmp/.stamp"
rm -rf "$out" && mv "$out.tmp" "$out"
printf '%s\n' "$out"
