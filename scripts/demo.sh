#!/usr/bin/env bash
# The tpi demo: fetches SmolLM2-135M-Instruct, then runs it tensor-parallel on an
# emulated 3-device cluster on this machine (2 tpi-node processes + this one as rank 0)
# over user-space emulated 2 ms / 300 Mbit/s links, and prints where the time went.
#
#   scripts/demo.sh [extra tpi-testbed cluster flags, e.g. --nodes 4 --link 1ms,300mbit]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TPI_SMOLLM2_GGUF="$(bash scripts/fetch-model.sh)"
export TPI_SMOLLM2_GGUF
cargo build --workspace --release --bins
exec target/release/tpi-testbed cluster --nodes 3 --link 2ms,300mbit \
    --model "$TPI_SMOLLM2_GGUF" --prompt "What is the capital of France?" --max-tokens 32 "$@"
