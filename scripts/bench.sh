#!/usr/bin/env bash
# Runs the benchmark twice on this machine, ours and diffusers', and prints ours / torch side by side.
# Needs Python with torch and diffusers (see tools/reference/make_fixtures.py) in $PYTHON, and about
# 9 GB of free disk for the two random SD1.5 checkpoints. On an NVIDIA GPU:
#   TORCH_DEVICE=cuda scripts/bench.sh --backend wgpu
#   scripts/bench.sh [extra studio bench arguments]
# BENCH_ROUNDS=3 alternates ours and diffusers three times and compares each measurement's best run
# (the shortest time, the highest rate): on a shared machine whose speed moves, a slow spell then
# does not land on one side only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=${BENCH_OUT:-bench-results}
mkdir -p "$out"
threads=$(nproc)
cargo build --release -p studio
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
rounds=${BENCH_ROUNDS:-1}
ours=() torch=()
for round in $(seq "$rounds"); do
    "$target/release/studio" bench --json "$out/ours-$round.json" --scratch "$out" "$@"
    HF_HUB_OFFLINE=1 "$PYTHON" tools/reference/bench_torch.py --json "$out/torch-$round.json" --threads "$threads" \
        --scratch "$out" --device "${TORCH_DEVICE:-cpu}"
    ours+=("$out/ours-$round.json") torch+=("$out/torch-$round.json")
done
"$target/release/studio" bench --best-of "$out/ours.json" "${ours[@]}" > /dev/null
"$target/release/studio" bench --best-of "$out/torch.json" "${torch[@]}" > /dev/null
echo
"$target/release/studio" bench --compare "$out/ours.json" "$out/torch.json"
