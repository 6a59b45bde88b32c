#!/usr/bin/env bash
# Shard distribution at 70B scale, over loopback: the ranks' shards that `bench-70b.sh` wrote
# (FROM=shards), a cluster of RANKS-1 real `tpi-node` processes, of which nodes 2.. map their
# own shard and node 1 starts with an empty cache, so the coordinator sends it its ~5 GB
# shard. First a transfer interrupted after CUT seconds (the coordinator is killed), then a
# run that resumes it; reports the time and bytes of each. Needs about one shard of free disk.
#
#   LAYERS=80 scripts/bench-distribute.sh
#
# Environment: LAYERS (80), RANKS (8), CUT (2), DIR (as bench-70b.sh). Not part of CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAYERS=${LAYERS:-80}
RANKS=${RANKS:-8}
CUT=${CUT:-2}
CACHE=${TPI_CACHE:-$HOME/.cache/tpi}
DIR=${DIR:-$CACHE/bench-70b}
SHARDS="$DIR/llama3-70b-${LAYERS}l-q4_k_m-$RANKS-shards"
T=target/release
[[ -f $SHARDS/rank-$((RANKS - 1))/manifest.json ]] ||
    { echo "no shards in $SHARDS: run FROM=shards LAYERS=$LAYERS scripts/bench-70b.sh first" >&2; exit 1; }
cargo build --workspace --release --bins --tests >&2

WORK=$(mktemp -d "$DIR/distribute.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
$T/tpi cluster init --dir "$WORK/ca" > /dev/null
addrs=()
for r in $(seq 1 $((RANKS - 1))); do
    $T/tpi cluster issue --dir "$WORK/ca" --name "n$r" --out "$WORK/n$r" > /dev/null
    extra=()
    (( r > 1 )) && extra=(--shard "$SHARDS/rank-$r")
    $T/tpi-node serve --listen 127.0.0.1:0 --threads 1 --no-mdns --credential "$WORK/n$r" \
        --data-dir "$WORK/data-$r" --mem-budget 1GiB "${extra[@]}" > "$WORK/n$r.out" 2> "$WORK/n$r.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q "listening on" "$WORK/n$r.out" && break; sleep 0.1; done
    addrs+=("$(sed -n 's/^listening on //p' "$WORK/n$r.out")")
done
nodes=$(IFS=,; echo "${addrs[*]}")
run=(run --model "$SHARDS/model.gguf" --shards "$SHARDS" --nodes "$nodes" --credential "$WORK/ca/credential"
     --prompt hi --max-tokens 1 --threads 1 --mem-budget 1GiB --json)
shard_len=$(python3 -c "import json; print(json.load(open('$SHARDS/rank-1/manifest.json'))['file_len'])")

echo "== interrupted: the coordinator killed ${CUT} s into the transfer of rank 1's $((shard_len / 1000000)) MB"
$T/tpi "${run[@]}" > /dev/null 2> "$WORK/cut.log" &
cut_pid=$!
sleep "$CUT"
kill -9 "$cut_pid" 2>/dev/null || true
wait "$cut_pid" 2>/dev/null || true
echo "== resumed"
for attempt in $(seq 20); do
    t0=$(date +%s.%N)
    if $T/tpi "${run[@]}" > "$WORK/resume.json" 2> "$WORK/resume.log"; then break; fi
    grep -q busy "$WORK/resume.log" || { cat "$WORK/resume.log" >&2; exit 1; }
    sleep 2
done
t1=$(date +%s.%N)
python3 - "$WORK/resume.json" "$t0" "$t1" "$shard_len" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
t = float(sys.argv[3]) - float(sys.argv[2])
shard = int(sys.argv[4])
sent, ms = j["backend"]["shard_bytes_sent"], j["backend"]["shard_transfer_ms"]
print(f"resumed run: {t:.1f} s in all (setup, transfer, one token); bytes sent per node {sent}")
print(f"rank 1: {sent[0] / 1e6:.0f} MB sent of its {shard / 1e6:.0f} MB shard "
      f"({(shard - sent[0]) / 1e6:.0f} MB kept from the interrupted transfer) in {ms[0] / 1e3:.1f} s "
      f"(received, verified and loaded): {sent[0] / 1e9 / max(ms[0] / 1e3, 1e-9):.2f} GB/s over loopback")
PY
