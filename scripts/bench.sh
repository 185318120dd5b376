#!/usr/bin/env bash
# Runs the benchmark twice on this machine, ours and diffusers', and prints ours / torch side by side.
# Needs Python with torch and diffusers (see tools/reference/make_fixtures.py) in $PYTHON, and about
# 9 GB of free disk for the two random SD1.5 checkpoints. On an NVIDIA GPU:
#   TORCH_DEVICE=cuda scripts/bench.sh --backend wgpu
#   scripts/bench.sh [extra studio bench arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${BENCH_OUT:-bench-results}
mkdir -p "$out"
threads=$(nproc)
cargo build --release -p studio
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target/release/studio" bench --json "$out/ours.json" --scratch "$out" "$@"
HF_HUB_OFFLINE=1 "$PYTHON" tools/reference/bench_torch.py --json "$out/torch.json" --threads "$threads" --scratch "$out" \
    --device "${TORCH_DEVICE:-cpu}"
echo
"$target/release/studio" bench --compare "$out/ours.json" "$out/torch.json"
