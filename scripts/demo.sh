#!/usr/bin/env bash
# The demo: set up on first use (apt packages, cached libtorch), build, and train a GPT on
# tinyshakespeare over 2 MPI ranks (pipeline-parallel). Pass another config to run it instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release -p launcher
exec target/release/strata launch "${1:-configs/demo.yaml}"
