#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian/Ubuntu machine: installs the system packages
# (scripts/install-deps.sh), then builds and tests in release (the numerics are unusably slow in a
# debug build), and checks that the `spirv` build compiles: it cannot run here, since lavapipe
# crashes on SPIR-V pipelines. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --release --workspace "$@"
cargo check --release -p studio -p studio_tests --features spirv --all-targets
