#!/usr/bin/env bash
# Writes `--logits-out` of a fixed set of runs (SmolLM2 and two fixtures, one
# device and local clusters, star/ring/tree, f32/f16 payloads) made with the
# binaries in BIN into OUT, so two builds can be compared byte for byte:
#   scripts/ab-logits.sh OLD_BIN /tmp/a; scripts/ab-logits.sh NEW_BIN /tmp/b
#   cmp -s each pair (the script prints sha256 sums; diff them).
set -euo pipefail
bin=$1 out=$2
here=$(cd "$(dirname "$0")/.." && pwd)
gguf=${TPI_SMOLLM2_GGUF:-$("$here/scripts/fetch-model.sh")}
mkdir -p "$out"
export TPI_CACHE="$out/cache" PATH="$bin:$PATH"
run() {
  local name=$1; shift
  "$bin/tpi" run "$@" --max-tokens 24 --ignore-eos --json --logits-out "$out/$name.npy" \
    >"$out/$name.json" 2>"$out/$name.err" || { cat "$out/$name.err"; exit 1; }
}
fx="$here/testbed/fixtures/models"
run smol1 --model "$gguf" --prompt "The capital of France is" --threads 1
run smol2 --model "$gguf" --prompt "The capital of France is" --threads 2
for algo in star ring tree; do
  run smol_c3_$algo --model "$gguf" --prompt "Once upon a time" --threads 1 --node-threads 1 --local-cluster 3 --allreduce $algo
done
run smol_c2_f16 --model "$gguf" --prompt "Once upon a time" --threads 1 --node-threads 1 --local-cluster 2 --allreduce-dtype f16
for m in gqa_f32_tied llama3rope_f32; do
  run ${m}_1 --model "$fx/$m" --tokens 1,2,3,4,5 --threads 2
  run ${m}_c2 --model "$fx/$m" --tokens 1,2,3,4,5 --threads 1 --node-threads 1 --local-cluster 2
done
(cd "$out" && sha256sum ./*.npy)
