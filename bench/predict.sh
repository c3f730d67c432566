#!/usr/bin/env bash
# Predicted vs measured step time and peak memory for every layout of gpt-tiny on 2
# ranks (gpipe, 1f1b, interleaved v=2, zb-h1 at pp=2; tp=2; dp=2) and the auto-planner's
# top candidates, from a fresh `strata profile`. Run on a quiet machine.
#   bench/predict.sh [--steps 8] [--only gpipe tp=2] [--profile PATH]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace >/dev/null
exec python3 bench/predict.py "$@"
