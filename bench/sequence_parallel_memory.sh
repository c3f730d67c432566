#!/usr/bin/env bash
# Peak memory per rank with and without sequence parallelism (parallel.sequence_parallel)
# at tp = 2, predicted by the memory model (`strata plan`) and measured (metrics.jsonl's
# peak_rss_mib, the process's VmHWM) on gpt-tiny (pp = 1, tp = 2, GPipe: all 8
# microbatches of 8 x 128 tokens in flight, so activations dominate). Memory is not a
# timing: a shared machine is fine. Usage: bench/sequence_parallel_memory.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-2}
BIN=${STRATA_BIN:-target/release/strata}
OUT=$(mktemp -d /tmp/strata-sp.XXXX)
for sp in false true; do
  cfg="$OUT/gpt-tiny-sp-$sp.yaml"
  sed -e "s|schedule: gpipe|schedule: gpipe\n  sequence_parallel: $sp|" \
      -e "s|pp: 2|pp: 1|" -e "s|tp: 1|tp: 2|" \
      -e "s|steps: 2000|steps: $STEPS|" -e "s|eval_every: 100|eval_every: 0|" \
      -e "s|log_every: 10|log_every: 1|" \
      -e "s|data: ../data/|data: $PWD/data/|" -e "s|dir: runs/gpt-tiny|dir: $OUT/run-$sp|" \
      configs/gpt-tiny.yaml > "$cfg"
  printf 'checkpoint:\n  enabled: false\n' >> "$cfg"
  echo "== sequence_parallel: $sp"
  "$BIN" plan "$cfg" | grep -E "peak memory" || true
  "$BIN" launch "$cfg" > "$OUT/launch-$sp.log"
  python3 - "$OUT/run-$sp/metrics.jsonl" <<'PY'
import json, sys
last = [json.loads(l) for l in open(sys.argv[1])][-1]
for r in last["ranks"]:
    print(f"rank {r['rank']} measured peak RSS {r['peak_rss_mib']:.0f} MiB")
print(f"loss after the last step: {last['loss']:.6f}")
PY
done
