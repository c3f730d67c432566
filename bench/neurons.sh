#!/usr/bin/env bash
# Neuron pruning of the README demo model (issue 10): dense vs 50%-of-d_ff pruned.
#
#   bench/neurons.sh [DENSE_CHECKPOINT] [OUT_DIR]
#
# DENSE_CHECKPOINT: the demo model trained to convergence (default
# /tmp/soak/run/checkpoints/step-002000, a 2000-step run of configs/demo.yaml's shape);
# it is copied, never modified. Prints, in order:
#   1. the prune table (strata prune --method neurons --sparsity 0.5);
#   2. val loss (strata eval: the training text's last 10%) dense, pruned, and pruned
#      after 300 fine-tuning steps (bench/neurons-finetune.yaml via train.resume);
#   3. ROUNDS (default 3) interleaved rounds of: training tokens/s (median of steps
#      6..STEPS of a fresh run of the demo layout, pp = 2, 1f1b, no checkpoint) and decode
#      tokens/s at batch 1 (strata generate, greedy, 56 new tokens), dense then pruned,
#      each round with the load average. Run it on a quiet machine: timings on a shared
#      one are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
S=${STRATA:-target/release/strata}
SRC=${1:-/tmp/soak/run/checkpoints/step-002000}
OUT=${2:-runs/neurons-bench}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-30}
rm -rf "$OUT" && mkdir -p "$OUT"
cp -r "$SRC" "$OUT/dense"
STEP=$(basename "$SRC")

echo "== prune"
$S prune "$OUT/dense" --out "$OUT/pruned" --method neurons --sparsity 0.5

echo "== val loss"
echo "dense:            $($S eval "$OUT/dense" --json)"
echo "pruned:           $($S eval "$OUT/pruned" --json)"
$S launch bench/neurons-finetune.yaml --set "train.resume=$OUT/pruned/$STEP" \
    --set "output.dir=$OUT/finetune" > "$OUT/finetune.log" 2>&1
echo "pruned + 300 ft:  $($S eval "$OUT/finetune/checkpoints" --json)"

# Training tokens/s: median over steps 6..STEPS of metrics.jsonl.
train_tps() { # NAME D_FF
    local dir="$OUT/speed-$1"
    rm -rf "$dir"
    $S launch bench/neurons-finetune.yaml --set "model.d_ff=$2" --set "train.steps=$STEPS" \
        --set train.eval_every=0 --set checkpoint.enabled=false --set "output.dir=$dir" \
        > "$dir.log" 2>&1
    python3 -c "import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1]) if '\"tokens_per_s\"' in l]; print(round(statistics.median(x['tokens_per_s'] for x in r if x.get('step',0)>5)))" "$dir/metrics.jsonl"
}
decode_tps() { # CHECKPOINT
    $S generate "$1" --prompt "ROMEO:" --max-new-tokens 56 2>&1 | grep -o 'decode [0-9.]* tokens/s' | grep -o '[0-9.]*'
}
echo "== speed (training tokens/s, pp = 2; decode tokens/s, batch 1, pp = 1)"
for r in $(seq "$ROUNDS"); do
    echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "  train  dense $(train_tps dense 512)  pruned $(train_tps pruned '[256,256,256,256]')"
    echo "  decode dense $(decode_tps "$OUT/dense")  pruned $(decode_tps "$OUT/pruned")"
done
