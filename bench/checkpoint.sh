#!/usr/bin/env bash
# Checkpoint cost (issue 8): save and load time and bytes for configs/gpt-tiny.yaml and the
# 113M-parameter bench/gpt-113m.yaml on pp = 2, each as a share of this disk's sequential
# write and read bandwidth (dd), and the peak extra memory of any rank during a save.
#
#   bench/checkpoint.sh [CONFIG ...]      # default: configs/gpt-tiny.yaml bench/gpt-113m.yaml
#   OUT=/big/disk/dir bench/checkpoint.sh # where the runs and the dd file go (default: a temp dir)
#
# Each config trains 1 step and saves (checkpoint.every: 1), then a second run resumes
# from it (train.resume: latest) and reports the load. Run it on a quiet machine: the
# numbers are wall-clock. Needs target/release/strata (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${STRATA:-target/release/strata}
OUT=${OUT:-$(mktemp -d /tmp/strata-ckpt-bench.XXXXXX)}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/gpt-tiny.yaml bench/gpt-113m.yaml)

drop_caches() { sync; { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; }
if drop_caches; then CACHE="cold (page cache dropped before each read)"; else CACHE="warm (cannot drop the page cache here)"; fi

# dd: MB/s of a 1 GiB sequential write (fdatasync included) and read.
dd_mb_s() { sed -n 's/.* copied, \([0-9.]*\) s, .*/\1/p' | awk -v b="$1" '{printf "%.0f", b / $1 / 1e6}'; }
DD_BYTES=$((1024 * 1024 * 1024))
W=$(dd if=/dev/zero of="$OUT/dd.bin" bs=16M count=64 conv=fdatasync 2>&1 | dd_mb_s $DD_BYTES)
drop_caches || true
R=$(dd if="$OUT/dd.bin" of=/dev/null bs=16M 2>&1 | dd_mb_s $DD_BYTES)
rm -f "$OUT/dd.bin"
echo "disk: sequential write $W MB/s, read $R MB/s (dd, 1 GiB); reads $CACHE"

# A copy of CONFIG with absolute data path, run dir under $OUT, STEPS steps, a checkpoint
# every step and no evaluation.
derive() { # CONFIG NAME STEPS
  local cfg=$1 dir; dir=$(cd "$(dirname "$cfg")" && pwd)
  sed -e "s#^\(  data: \)\([^ ]*\)#\1$dir/\2#" \
      -e "s#^\(  steps: \).*#\1$3#" \
      -e "s#^\(  eval_every: \).*#\10#" \
      -e "s#^\(  dir: \).*#\1$OUT/$2#" "$cfg"
  echo "checkpoint: {every: 1}"
}

printf '\n%-22s %9s %10s %8s %9s %7s %8s %9s %7s %12s\n' config params checkpoint save_s save_MB/s "of dd" load_s load_MB/s "of dd" "save extra"
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .yaml)
  rm -rf "$OUT/$name"
  derive "$cfg" "$name" 1 > "$OUT/$name-save.yaml"
  derive "$cfg" "$name" 2 | sed 's#^train:#train:\n  resume: latest#' > "$OUT/$name-load.yaml"
  save=$("$BIN" launch "$OUT/$name-save.yaml" 2>&1)
  drop_caches || true
  load=$("$BIN" launch "$OUT/$name-load.yaml" 2>&1)
  params=$(sed -n 's/^strata: \([0-9]*\) params.*/\1/p' <<<"$save" | head -1)
  sline=$(grep '^strata: saved checkpoint' <<<"$save" | tail -1)
  lline=$(grep '^strata: resumed from' <<<"$load" | tail -1)
  [ -n "$sline" ] && [ -n "$lline" ] || { echo "$save"; echo "$load"; exit 1; }
  bytes=$(sed -n 's/.*(\([0-9.]* [KMGT]*i*B\), .*/\1/p' <<<"$sline")
  ss=$(sed -n 's/.*B, \([0-9.]*\) s, \([0-9]*\) MB\/s.*/\1/p' <<<"$sline")
  sm=$(sed -n 's/.*s, \([0-9]*\) MB\/s;.*/\1/p' <<<"$sline")
  extra=$(sed -n 's/.*peak extra memory \([0-9.]*\) MiB.*/\1 MiB/p' <<<"$sline")
  ls_=$(sed -n 's/.* loaded in \([0-9.]*\) s, .*/\1/p' <<<"$lline")
  lm=$(sed -n 's/.* s, \([0-9]*\) MB\/s)$/\1/p' <<<"$lline")
  printf '%-22s %9s %10s %8s %9s %6s%% %8s %9s %6s%% %12s\n' "$name" "$params" "$bytes" "$ss" "$sm" \
    "$(awk -v a="$sm" -v b="$W" 'BEGIN{printf "%.0f", 100*a/b}')" "$ls_" "$lm" \
    "$(awk -v a="$lm" -v b="$R" 'BEGIN{printf "%.0f", 100*a/b}')" "$extra"
done
echo "(runs in $OUT)"
