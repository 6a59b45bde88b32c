#!/bin/bash
# tpi against llama.cpp on the same Q4_K_M file, side by side: a random-weight 1B-class
# Llama (dim 2048, 16 layers, 32/8 heads of 64, FFN 8192, vocab 32000) quantised by
# llama.cpp's own llama-quantize; decode tok/s from `tpi bench model` and `llama-bench`,
# interleaved, at 1 and 2 threads. Usage:
#   testbed/bench/kquant/run.sh [TYPE] [REPS]        default: Q4_K_M 3
# Environment: WORK (default /tmp/kq-bench; needs ~6 GB), TPI_CACHE (as for the tests), TPI_BIN (default: this
# checkout's target/release). llama.cpp is the llama-cpp-python sdist that
# scripts/make-kquant-models.sh fetches, built here with -march=native (its best).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TYPE=${1:-Q4_K_M}
REPS=${2:-3}
WORK=${WORK:-/tmp/kq-bench}
TPI_BIN=${TPI_BIN:-$ROOT/target/release}
mkdir -p "$WORK"
[[ -x $TPI_BIN/tpi ]] || (cd "$ROOT" && cargo build --workspace --release --bins)

# The test models' script fetches llama.cpp and a venv with gguf; reuse both.
models=$("$ROOT/scripts/make-kquant-models.sh")
cache=$(dirname "$models")
src=$(ls -d "$cache"/llama-cpp-python-*/ | head -1)
native=$src/build-native
if [[ ! -x $native/bin/llama-bench ]]; then
  PATH="$cache/kquant-venv/bin:$PATH" cmake -S "$src" -B "$native" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
  PATH="$cache/kquant-venv/bin:$PATH" cmake --build "$native" --target llama-bench llama-quantize -j "$(nproc)" >&2
fi
file=$WORK/b1-$(echo "$TYPE" | tr 'A-Z' 'a-z').gguf
if [[ ! -f $file ]]; then
  "$cache/kquant-venv/bin/python" "$ROOT/testbed/fixtures/kquant/make_models.py" \
    --quantize "$native/bin/llama-quantize" --out "$WORK" --shapes b1 --types "$TYPE" --no-twins
  rm -f "$WORK/b1-f32.gguf"
fi
echo "# $file ($(du -h "$file" | cut -f1)), $(nproc) cores, $(date -u +%FT%TZ)"
for rep in $(seq "$REPS"); do
  for t in 1 2; do
    tpi=$("$TPI_BIN/tpi" bench model --model "$file" --threads "$t" --prompt 16 --decode 64 --reps 1 2>/dev/null |
      sed -n 's/.*decode[^0-9]*\([0-9.]*\) tok\/s.*/\1/p' | head -1)
    lcpp=$("$native/bin/llama-bench" -m "$file" -p 0 -n 64 -t "$t" -r 1 -o csv 2>/dev/null |
      tail -1 | awk -F, '{gsub(/"/,"",$0); print $(NF-1)}')
    echo "rep $rep threads $t: tpi $tpi tok/s, llama.cpp $lcpp tok/s, ratio $(python3 -c "print(round($tpi/$lcpp,2))")"
  done
done
