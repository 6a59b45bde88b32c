#!/usr/bin/env bash
# 70B-scale on 8 emulated devices: a random-weight Llama-3-70B-shape GGUF (Q4_K_M, made by
# `tpi-testbed synth`, reused when present) on `--local-cluster 8 --mem-budget 1GiB`, on
# loopback and over 1 ms / 300 Mbit links. Reports TTFT, token latency, per-rank compute,
# disk wait, allreduce wait, bytes read and peak RSS, the disk-read limit (bytes per token
# / the sequential read bandwidth measured in the same run), the links' cost, and the
# simulator's predictions for this machine and for 8 real devices.
#
#   LAYERS=80 scripts/bench-70b.sh        # the real depth: 42.5 GB of shards (and of GGUF,
#                                         # if the disk holds both)
#   LAYERS=16 scripts/bench-70b.sh        # a scaled run with the real tensor sizes (~9 + 9 GB)
#
# Environment: FROM (gguf or shards; default: gguf if the disk holds both), LAYERS (80), RANKS (8), BUDGET (1GiB), PROMPT (32 tokens), TOKENS (16),
# LINKS ("1ms,300mbit"), COMPUTE_GBS (per-core GEMV rate for the simulator, 20),
# DIR (${TPI_CACHE:-$HOME/.cache/tpi}/bench-70b). Not part of CI: it needs tens of GB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAYERS=${LAYERS:-80}
RANKS=${RANKS:-8}
BUDGET=${BUDGET:-1GiB}
PROMPT=${PROMPT:-32}
TOKENS=${TOKENS:-16}
LINKS=${LINKS:-1ms,300mbit}
COMPUTE_GBS=${COMPUTE_GBS:-20}
CACHE=${TPI_CACHE:-$HOME/.cache/tpi}
DIR=${DIR:-$CACHE/bench-70b}
T=target/release
mkdir -p "$DIR"
cargo build --workspace --release --bins --tests >&2

# Where the weights come from: a GGUF sharded on the first run (GGUF and shards both on
# disk), or, when the disk cannot hold both, the ranks' shards written directly by
# `synth --shards-out` beside a header-only model file (FROM=shards forces it, FROM=gguf
# the other).
need=$($T/tpi-testbed synth --shape llama3-70b --layers "$LAYERS" --quant q4_k_m --size-only)
free=$(df -B1 --output=avail "$DIR" | tail -1)
GGUF="$DIR/llama3-70b-${LAYERS}l-q4_k_m.gguf"
SHARDS="$DIR/llama3-70b-${LAYERS}l-q4_k_m-$RANKS-shards"
if [[ -z ${FROM:-} ]]; then
    if [[ -f $GGUF ]] || (( free > 2 * need + (1 << 30) )); then FROM=gguf; else FROM=shards; fi
fi
common_tail=()
if [[ $FROM == gguf ]]; then
    MODEL=$GGUF
    if [[ ! -f $MODEL ]]; then
        $T/tpi-testbed synth --shape llama3-70b --layers "$LAYERS" --quant q4_k_m --out "$MODEL"
    fi
else
    MODEL="$SHARDS/model.gguf"
    if [[ ! -f $SHARDS/rank-$((RANKS - 1))/manifest.json ]]; then
        echo "== writing the shards for $RANKS ranks directly (synth --shards-out)"
        t0=$(date +%s.%N)
        $T/tpi-testbed synth --shape llama3-70b --layers "$LAYERS" --quant q4_k_m \
            --shards-out "$SHARDS" --nodes "$RANKS"
        t1=$(date +%s.%N)
        python3 -c "print(f'shards written in {$t1 - $t0:.1f} s')"
    fi
    common_tail=(--shards "$SHARDS")
fi
echo "model: $MODEL ($(du -h "$MODEL" | cut -f1) on disk)"

ids=$(python3 -c "print(','.join(['128000'] + [str((i * 7919 + 13) % 128000) for i in range($PROMPT - 1)]))")
common=(run --model "$MODEL" --tokens "$ids" --ignore-eos --json --local-cluster "$RANKS"
        --mem-budget "$BUDGET" --threads 1 --node-threads 1 "${common_tail[@]}")

if [[ $FROM == gguf ]]; then
    echo "== sharding for $RANKS ranks (first run, one token)"
    t0=$(date +%s.%N)
    TPI_CACHE=$CACHE $T/tpi "${common[@]}" --max-tokens 1 > "$DIR/shard-run.json"
    t1=$(date +%s.%N)
    python3 -c "print(f'shard + first token: {$t1 - $t0:.1f} s')"
    shard=$(find "$CACHE/shards" -name shard.bin -newer "$MODEL" -size +100M | head -1)
else
    shard="$SHARDS/rank-1/shard.bin"
fi
echo "== sequential read bandwidth (O_DIRECT, $shard)"
read_gbs=$(dd if="$shard" of=/dev/null bs=8M count=256 iflag=direct 2>&1 \
    | python3 -c "import sys,re; t=sys.stdin.read(); m=re.search(r'(\d+) bytes.*?, ([\d.]+) s', t); print(int(m.group(1))/float(m.group(2))/1e9)")
echo "read: $read_gbs GB/s"

runs=()
for link in loopback ${LINKS//,/_COMMA_}; do
    link=${link//_COMMA_/,}
    extra=()
    [[ $link != loopback ]] && extra=(--link "$link")
    echo "== $link"
    TPI_CACHE=$CACHE $T/tpi "${common[@]}" --max-tokens "$TOKENS" "${extra[@]}" > "$DIR/$link.json"
    runs+=("$DIR/$link.json")
done
python3 testbed/bench/70b/report.py "$read_gbs" "$LAYERS" "${runs[@]}"

# The simulator's prediction for every link in $LINKS at per-device disk and GEMV rates.
predict() {
    local disk=$1 compute=$2 link
    for link in ${LINKS//,/_COMMA_}; do
        link=${link//_COMMA_/,}
        $T/tpi-sim predict --preset llama3-70b --layers "$LAYERS" --devices "$RANKS" --link "$link" \
            --quant q4_k --mem-budget "$BUDGET" --disk-gbs "$disk" --compute-gbs "$compute" \
            --prompt "$PROMPT" --gen "$TOKENS" --algo all | head -7
    done
}
echo
echo "== simulator: this machine ($RANKS ranks share 2 cores and one disk)"
predict "$(python3 -c "print($read_gbs / $RANKS)")" "$(python3 -c "print($COMPUTE_GBS * 2 / $RANKS)")"
echo "== simulator: $RANKS real devices, each with its own disk ($read_gbs GB/s) and core ($COMPUTE_GBS GB/s)"
predict "$read_gbs" "$COMPUTE_GBS"
