#!/usr/bin/env bash
# Transport (issue 12): tokens/s of the communication-bound layouts (tp = 2, dp = 2,
# pp = 2 1F1B on gpt-tiny, bench/configs/) for two strata builds, interleaved run by run
# (old, new, old, new, ...), and for the new build under each wait policy (STRATA_WAIT:
# hybrid is the default, sleep is the previous build's 1 ms back-off loop). Prints the
# median over repetitions of each run's median step tokens/s (first step dropped).
#
#   bench/transport.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]
#
# e.g. the build before the zero-copy transport against this one:
#   git worktree add /tmp/strata-prev <commit> && (cd /tmp/strata-prev &&
#     cp -a "$OLDPWD/target" . && cargo build --release -p launcher)
#   bench/transport.sh /tmp/strata-prev/target/release/strata target/release/strata 3 12
#
# Run it on a quiet machine: the numbers are wall-clock (it warns above load 0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: bench/transport.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]}
NEW=${2:?usage: bench/transport.sh OLD_STRATA NEW_STRATA [REPS] [STEPS]}
REPS=${3:-3}
STEPS=${4:-12}
OUT=${OUT:-$(mktemp -d /tmp/strata-transport-bench.XXXXXX)}
for b in "$OLD" "$NEW"; do
  [ -x "$b" ] || { echo "bench/transport.sh: $b is not an executable strata" >&2; exit 2; }
done
load=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load" 'BEGIN { exit !(l > 0.5) }' && echo "warning: load average $load: timings are not meaningful" >&2
data=$(realpath data/tinyshakespeare.txt)

# run LABEL BINARY LAYOUT [ENV...]: one run; appends its median tokens/s to OUT/LABEL-LAYOUT.
run() {
  local label=$1 bin=$2 layout=$3
  shift 3
  local dir="$OUT/$label-$layout" cfg="$OUT/$label-$layout.yaml"
  rm -rf "$dir"
  sed -e "s|^  steps: .*|  steps: $STEPS|" -e "s|^  data: .*|  data: $data|" \
      -e "s|^  dir: .*|  dir: $dir|" "bench/configs/$layout.yaml" > "$cfg"
  env "$@" "$bin" launch "$cfg" > "$dir.log" 2>&1 || { echo "failed: $label $layout (see $dir.log)" >&2; exit 1; }
  python3 - "$dir/metrics.jsonl" >> "$OUT/$label-$layout.tps" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(r["tokens_per_s"] for r in rows[1:]))
EOF
}

read -r -a layouts <<< "${LAYOUTS:-tp2 dp2 pp2-1f1b}"
for rep in $(seq "$REPS"); do
  for layout in "${layouts[@]}"; do
    run old "$OLD" "$layout"
    run new "$NEW" "$layout"
    for policy in sleep yield spin; do
      run "new-$policy" "$NEW" "$layout" STRATA_WAIT=$policy
    done
  done
done
printf '%-10s %12s %12s %8s %12s %12s %12s\n' layout old new new/old "new sleep" "new yield" "new spin"
for layout in "${layouts[@]}"; do
  python3 - "$OUT" "$layout" <<'EOF'
import statistics, sys
out, layout = sys.argv[1:]
m = {k: statistics.median(float(x) for x in open(f"{out}/{k}-{layout}.tps"))
     for k in ["old", "new", "new-sleep", "new-yield", "new-spin"]}
print(f"{layout:<10} {m['old']:>12.0f} {m['new']:>12.0f} {m['new'] / m['old']:>8.3f} "
      f"{m['new-sleep']:>12.0f} {m['new-yield']:>12.0f} {m['new-spin']:>12.0f}")
EOF
done
echo "runs in $OUT"
