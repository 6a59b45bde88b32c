#!/bin/bash
# tpi against distributed-llama (commit 8d624a7), side by side: the same random 1B-class
# Llama (dim 2048, 16 layers, 32/8 heads, FFN 8192), 4-bit weights in both, one thread per
# process, over the same emulated links. See README.md here. Usage:
#   testbed/bench/dllama/run.sh [OUT.jsonl] [REPS] [N:LINK ...]
# Environment: P4 (work dir, default /tmp/p4), TPI_BIN (default: this checkout's
# target/release, built if missing), DLLAMA_SRC (a git dir or URL of distributed-llama;
# default: the fetch tool's mirror, else GitHub), VARIANTS and SYSTEMS (see bench.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
export P4=${P4:-/tmp/p4}
export TPI_BIN=${TPI_BIN:-$ROOT/target/release}
OUT=${1:-$P4/results.jsonl}
REPS=${2:-2}
shift $(($# < 2 ? $# : 2))
CONFIGS=("$@")
[[ ${#CONFIGS[@]} -gt 0 ]] || CONFIGS=(2:lo 4:lo 2:0ms 4:0ms 2:1ms,300mbit 4:1ms,300mbit 2:5ms,100mbit 4:5ms,100mbit)
COMMIT=8d624a7
mkdir -p "$P4"

[[ -x $TPI_BIN/tpi && -x $TPI_BIN/tpi-sim && -x $TPI_BIN/tpi-node ]] ||
  (cd "$ROOT" && cargo build --workspace --release --bins)

if [[ ! -x $P4/dllama/dllama ]]; then
  src=${DLLAMA_SRC:-}
  if [[ -z $src ]]; then
    if [[ -d /work/.mirror/b4rtaz+distributed-llama/repo ]]; then
      src=/work/.mirror/b4rtaz+distributed-llama/repo
    else
      src=https://github.com/b4rtaz/distributed-llama
    fi
  fi
  rm -rf "$P4/dllama" "$P4/dllama.git"
  mkdir -p "$P4/dllama"
  if [[ -d $src && ! -d $src/.git ]]; then
    git --git-dir="$src" archive "$COMMIT" | tar -x -C "$P4/dllama"
  else
    git clone -q --bare "$src" "$P4/dllama.git"
    git --git-dir="$P4/dllama.git" archive "$COMMIT" | tar -x -C "$P4/dllama"
  fi
  make -C "$P4/dllama" -j2 dllama
fi

python3 -c 'import numpy, safetensors' 2>/dev/null || pip install -q numpy safetensors
cd "$HERE"
if [[ ! -f $P4/hf/model.safetensors && ! -f $P4/hf/config.json ]]; then
  mkdir -p "$P4/hf"
  python3 make_model.py "$P4/hf"
fi
for n in 1 2 4; do
  # The layout default (packed only where the AVX-512 VNNI kernel runs) suits this machine.
  [[ -d $P4/shards$n ]] ||
    "$TPI_BIN/tpi" shard --model "$P4/hf" --nodes $n --quant q4_0 --out "$P4/shards$n"
done
[[ -f $P4/dllama_model_rand1b_q40.m ]] || python3 convert_dllama.py "$P4/hf" q40 "$P4/dllama_model_rand1b_q40.m"
[[ -f $P4/dllama_tokenizer_rand.t ]] || python3 make_tokenizer.py "$P4/dllama_tokenizer_rand.t"
[[ ${SETUP_ONLY:-0} == 1 ]] && exit 0

python3 bench.py "$OUT" "$REPS" "${CONFIGS[@]}"
python3 summarize.py "$OUT"
