#!/usr/bin/env bash
# Peak memory per rank with and without full activation recomputation (parallel.recompute),
# predicted by the memory model (`strata plan`) and measured (metrics.jsonl's peak_rss_mib,
# the process's VmHWM) on gpt-tiny (pp = 2, GPipe: all 8 microbatches of 8 x 128 tokens in
# flight). Memory is not a timing: a shared machine is fine. Usage: bench/recompute_memory.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
BIN=${STRATA_BIN:-target/release/strata}
OUT=$(mktemp -d /tmp/strata-recompute.XXXX)
for mode in none full; do
  cfg="$OUT/gpt-tiny-$mode.yaml"
  sed -e "s|schedule: gpipe|schedule: gpipe\n  recompute: $mode|" \
      -e "s|steps: 2000|steps: $STEPS|" -e "s|eval_every: 100|eval_every: 0|" \
      -e "s|data: ../data/|data: $PWD/data/|" -e "s|dir: runs/gpt-tiny|dir: $OUT/run-$mode|" \
      configs/gpt-tiny.yaml > "$cfg"
  printf 'checkpoint:\n  enabled: false\n' >> "$cfg"
  echo "== recompute: $mode"
  "$BIN" plan "$cfg" | grep -E "peak memory" || true
  "$BIN" launch "$cfg" > "$OUT/launch-$mode.log"
  python3 - "$OUT/run-$mode/metrics.jsonl" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
for r in last["ranks"]:
    print(f"rank {r['rank']} measured peak RSS {r['peak_rss_mib']:.0f} MiB")
print(f"loss after the last step: {last['loss']:.6f}")
PY
done
