#!/usr/bin/env bash
# Data-parallel overlap (issue 12): dp = 2 tokens/s on gpt-tiny (bench/configs/dp2.yaml) for
# an OLD strata build (all-reduce after the backward) and a NEW one (bucket all-reduces
# started during the backward), the new one at several bucket caps (parallel.dp_bucket_mb),
# interleaved run by run. Prints the median over repetitions of each run's median step
# tokens/s (first step dropped) and the load average before and after.
#
#   bench/dp_overlap.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]
#   BUCKETS="25 4 1" LAYOUT=dp2 bench/dp_overlap.sh /tmp/strata-old target/release/strata 3 12
#
# Run it on a quiet machine: the numbers are wall-clock (it warns above load 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/dp_overlap.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]}
NEW=${2:?usage: bench/dp_overlap.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]}
REPS=${3:-3}
STEPS=${4:-12}
LAYOUT=${LAYOUT:-dp2}
read -r -a buckets <<< "${BUCKETS:-25 4 1}"
OUT=${OUT:-$(mktemp -d /tmp/strata-dp-overlap.XXXXXX)}
for b in "$OLD" "$NEW"; do
  [ -x "$b" ] || { echo "bench/dp_overlap.sh: $b is not an executable strata" >&2; exit 2; }
done
before=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${before%% *}" 'BEGIN { exit !(l > 0.5) }' && echo "warning: load average $before: timings are not meaningful" >&2
data=$(realpath data/tinyshakespeare.txt)

# run LABEL BINARY [strata launch ARGS...]: one run; appends its median tokens/s to OUT/LABEL.
run() {
  local label=$1 bin=$2
  shift 2
  local dir="$OUT/$label" cfg="$OUT/$label.yaml"
  rm -rf "$dir"
  sed -e "s|^  steps: .*|  steps: $STEPS|" -e "s|^  data: .*|  data: $data|" \
      -e "s|^  dir: .*|  dir: $dir|" "bench/configs/$LAYOUT.yaml" > "$cfg"
  "$bin" launch "$cfg" "$@" > "$dir.log" 2>&1 || { echo "failed: $label (see $dir.log)" >&2; exit 1; }
  python3 - "$dir/metrics.jsonl" >> "$OUT/$label.tps" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(r["tokens_per_s"] for r in rows[1:]))
PY
}

labels=(old)
for b in "${buckets[@]}"; do labels+=("new-${b}MiB"); done
for rep in $(seq "$REPS"); do
  run old "$OLD"
  for b in "${buckets[@]}"; do
    run "new-${b}MiB" "$NEW" --set "parallel.dp_bucket_mb=$b"
  done
done
echo "layout $LAYOUT, $REPS reps x $STEPS steps; load average before: $before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT" "${labels[@]}" <<'PY'
import statistics, sys
out, labels = sys.argv[1], sys.argv[2:]
m = {k: statistics.median(float(x) for x in open(f"{out}/{k}.tps")) for k in labels}
print(f"{'build':<12} {'tokens/s':>10} {'vs old':>8}")
for k in labels:
    print(f"{k:<12} {m[k]:>10.0f} {m[k] / m['old']:>8.3f}")
PY
echo "runs in $OUT"
