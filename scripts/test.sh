#!/usr/bin/env bash
# The whole test suite: set up on first use, build the `strata` binary the multi-process
# tests launch, then run every crate's tests (unit, in-process, and mpiexec end-to-end).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --workspace
cargo test --release --workspace "$@"
