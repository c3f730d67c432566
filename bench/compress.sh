#!/usr/bin/env bash
# Issue 10's compression table from one dense checkpoint (a command, not a test):
#   1. int8 (strata quantize) and magnitude / 2:4 / sensitivity pruning at 50% (strata
#      prune), neurons too when this build has it; each pruned checkpoint fine-tuned
#      FT_STEPS (300) steps with train.resume (its masks keep pruned weights at zero);
#      strata compress-report over all of them (losses are exact; speeds batch 1);
#   2. a 113M-parameter GPT (bench/gpt-113m.yaml, random weights: 1 training step to get a
#      checkpoint) fp32 vs int8 decode tokens/s at batch 1;
#   3. Strata against the PyTorch baseline (bench/torch_decode.py: eager KV cache, fp32 and
#      torch.ao dynamic int8) on both models, interleaved, with the load average per round;
#   4. pipelined generation of 32 prompts on pp = 2 against pp = 1 (1 and 2 threads).
#
#   bench/compress.sh DENSE_CHECKPOINT DENSE_CONFIG [OUT]
#   bench/compress.sh runs/demo/checkpoints configs/demo.yaml
#   FT_STEPS=300 REPS=5 STRATA=target/release/strata bench/compress.sh /tmp/soak/run/checkpoints/step-002000 /tmp/hfw/demo-2000.yaml
#
# DENSE_CONFIG is the config the dense checkpoint was trained with (read, never written:
# the fine-tunes override it with --set). Everything lands in OUT (default
# runs/bench/compress-<time>); the Markdown table goes to stdout and OUT/table.md.
# Rerunning with the same OUT reuses the variants, fine-tunes and 113M checkpoints already
# there (their losses do not depend on the machine's load) and measures the speeds again:
# make the variants on a busy machine, then rerun on a quiet one.
# Timings are only meaningful on a quiet machine: each speed row prints the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
DENSE=${1:?usage: bench/compress.sh DENSE_CHECKPOINT DENSE_CONFIG [OUT]}
CONFIG=${2:?usage: bench/compress.sh DENSE_CHECKPOINT DENSE_CONFIG [OUT]}
OUT=${3:-runs/bench/compress-$(date +%Y%m%d-%H%M%S)}
STRATA=${STRATA:-target/release/strata}
PY=${PY:-$HOME/.cache/strata/torch-2.11.0/bin/python}
FT_STEPS=${FT_STEPS:-300}
REPS=${REPS:-5}
NEW=${NEW_TOKENS:-48}
PLEN=${PROMPT_LEN:-16}
BIG=${BIG_CONFIG:-bench/gpt-113m.yaml}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TABLE=$OUT/table.md
: >"$TABLE"
say() { printf '%s\n' "$*" | tee -a "$TABLE"; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
# The step-N directory of a checkpoint root or step directory.
stepdir() { if [ -f "$1/manifest.json" ]; then echo "$1"; else echo "$1/$(cat "$1/latest")"; fi; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

DSTEP=$(stepdir "$DENSE")
STEP=$(json 'd["step"]' <"$DSTEP/manifest.json")
say "# Compression table ($(date -u '+%Y-%m-%d %H:%M UTC'), $(git rev-parse --short HEAD))"
say ""
say "dense: $DSTEP (step $STEP), config $CONFIG; load average at start: $(load)"
say ""

# ---------------------------------------------------------------- variants
[ -d "$OUT/int8" ] || "$STRATA" quantize "$DSTEP" --out "$OUT/int8" | tee "$OUT/quantize.log"
METHODS="magnitude 2:4 sensitivity"
if [ -d "$OUT/prune-neurons" ]; then
  METHODS="$METHODS neurons"
elif "$STRATA" prune "$DSTEP" --out "$OUT/probe-neurons" --method neurons --sparsity 0.5 >"$OUT/prune-neurons.log" 2>&1; then
  mv "$OUT/probe-neurons" "$OUT/prune-neurons"
  METHODS="$METHODS neurons"
else
  say "neurons: not in this build ($(tail -1 "$OUT/prune-neurons.log"))"
fi
rm -rf "$OUT/probe-neurons"
VARIANTS=("$OUT/int8/step-$(printf %06d "$STEP")")
FT=()
for m in $METHODS; do
  name=${m/:/-}
  if [ "$m" != neurons ] && [ ! -d "$OUT/prune-$name" ]; then
    "$STRATA" prune "$DSTEP" --out "$OUT/prune-$name" --method "$m" --sparsity 0.5 | tee "$OUT/prune-$name.log"
  fi
  pdir=$(stepdir "$OUT/prune-$name")
  # A neuron-pruned checkpoint has its own per-layer d_ff: the fine-tune must say so.
  widths=$(json 'json.dumps(d["plan"]["model"]["d_ff"]).replace(" ", "")' <"$pdir/manifest.json")
  [ -d "$OUT/ft-$name/checkpoints" ] ||
  "$STRATA" launch "$CONFIG" --set train.resume="$pdir" --set train.steps=$((STEP + FT_STEPS)) \
    --set output.dir="$OUT/ft-$name" --set train.eval_every=0 --set model.d_ff="$widths" \
    >"$OUT/ft-$name.log" 2>&1 || { echo "fine-tune $m failed: see $OUT/ft-$name.log" >&2; exit 1; }
  VARIANTS+=("$pdir")
  FT+=("$(stepdir "$OUT/ft-$name/checkpoints")")
done
if grep -q "per-weight\|sparsity" "$OUT/prune-sensitivity.log"; then
  say ""
  say "sensitivity scan (strata prune --method sensitivity --sparsity 0.5):"
  say '```'
  sed '$d' "$OUT/prune-sensitivity.log" | tee -a "$TABLE" >/dev/null
  say '```'
fi

# ---------------------------------------------------------------- the table
say ""
say "## Dense, int8, pruned at 50% and fine-tuned $FT_STEPS steps (load average before: $(load))"
say ""
"$STRATA" compress-report "$DSTEP" "${VARIANTS[@]}" "${FT[@]}" --runs "$REPS" --threads 1 \
  --prompt-len "$PLEN" --max-new-tokens "$NEW" --json >"$OUT/report.json"
python3 - "$OUT" "$FT_STEPS" <<'EOF' | tee -a "$TABLE"
import json, os, sys
out, ft_steps = sys.argv[1], int(sys.argv[2])
r = json.load(open(os.path.join(out, "report.json")))
rows = r["rows"]
def step_s(path):
    """Mean training step_s of the fine-tune whose checkpoint is `path` (0 when not one)."""
    run = os.path.dirname(os.path.dirname(path))
    m = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(m):
        return 0.0
    s = [json.loads(l).get("step_s", 0.0) for l in open(m) if l.strip()]
    s = s[len(s) // 10:]  # drop the first tenth (warm-up)
    return sum(s) / max(1, len(s))
print(f"val loss over {r['eval_tokens']} tokens of {r['data']}; batch 1, prompt {r['prompt_tokens']} tokens, "
      f"{r['new_tokens']} new, 1 thread, median of {r['runs']} interleaved rounds\n")
print("| variant | step | val loss | delta | weight bytes | of dense | decode tok/s | prefill tok/s | train step_s |")
print("|---|---|---|---|---|---|---|---|---|")
dense = rows[0]
for x in rows:
    s = step_s(x["path"])
    print(f"| {x['variant']}{' +ft' if x['step'] > dense['step'] else ''} | {x['step']} | {x['val_loss']:.4f} | "
          f"{x['delta']:+.4f} | {x['weight_bytes']} | {100 * x['weight_bytes'] / dense['weight_bytes']:.1f}% | "
          f"{x['decode_tokens_per_s']:.1f} | {x['prefill_tokens_per_s']:.1f} | {s:.4f} |" if s else
          f"| {x['variant']}{' +ft' if x['step'] > dense['step'] else ''} | {x['step']} | {x['val_loss']:.4f} | "
          f"{x['delta']:+.4f} | {x['weight_bytes']} | {100 * x['weight_bytes'] / dense['weight_bytes']:.1f}% | "
          f"{x['decode_tokens_per_s']:.1f} | {x['prefill_tokens_per_s']:.1f} | |")
print()
by = {}
for x in rows[1:]:
    by.setdefault(x["variant"], {})["ft" if x["step"] > dense["step"] else "pruned"] = x
checks = []
q = by.get("int8", {}).get("pruned")
if q:
    checks.append((f"int8 delta {q['delta']:+.4f} <= 0.01 nats", abs(q["delta"]) <= 0.01))
    checks.append((f"int8 weight bytes {100 * q['weight_bytes'] / dense['weight_bytes']:.1f}% <= 30% of fp32",
                   q["weight_bytes"] <= 0.3 * dense["weight_bytes"]))
def find(prefix, kind):
    return next((v[kind] for k, v in by.items() if k.startswith(prefix) and kind in v), None)
mag, sens = find("magnitude", "pruned"), find("sensitivity", "pruned")
if mag and sens:
    checks.append((f"sensitivity {sens['val_loss']:.4f} < magnitude {mag['val_loss']:.4f} before fine-tuning",
                   sens["val_loss"] < mag["val_loss"]))
for k, v in by.items():
    if "ft" in v:
        checks.append((f"{k} after {ft_steps} steps: delta {v['ft']['delta']:+.4f} <= 0.05",
                       v["ft"]["delta"] <= 0.05))
for text, ok in checks:
    print(f"- [{'x' if ok else ' '}] {text}")
EOF

# ---------------------------------------------------------------- the 113M model
say ""
say "## 113M-parameter GPT ($BIG, random weights, 1 training step), fp32 vs int8 at batch 1"
[ -d "$OUT/big/checkpoints" ] ||
"$STRATA" launch "$BIG" --set train.steps=1 --set output.dir="$OUT/big" --set train.eval_every=0 \
  >"$OUT/big-train.log" 2>&1
BIGD=$(stepdir "$OUT/big/checkpoints")
[ -d "$OUT/big-int8" ] || "$STRATA" quantize "$BIGD" --out "$OUT/big-int8" | tee -a "$TABLE"
BIGQ=$(stepdir "$OUT/big-int8")

# ---------------------------------------------------------------- Strata vs PyTorch
say ""
say "## Decode tokens/s at batch 1: Strata vs PyTorch (1 thread each, $PLEN-token prompt, $NEW new tokens)"
say ""
PROMPT=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from torchpeers import config, prompts
print(prompts.prompts(config.load(sys.argv[1]).train.data, 1, $PLEN)[0], end='')" "$BIG")
say "prompt: \`$(printf %q "$PROMPT")\`"
say ""
say "| round | load avg | model | Strata fp32 | Strata int8 | PyTorch fp32 | PyTorch int8 |"
say "|---|---|---|---|---|---|---|"
strata_tps() { "$STRATA" generate "$1" --threads 1 --prompt "$PROMPT" --max-new-tokens "$NEW" --json | json '"%.1f" % d["report"]["decode_tokens_per_s"]'; }
torch_tps() { "$PY" bench/torch_decode.py --checkpoint "$1" --batch 1 --precision "$2" --threads 1 \
  --prompt-len "$PLEN" --new-tokens "$NEW" --runs 1 | json '"%.1f" % d["decode_tok_s"]'; }
: >"$OUT/decode.tsv"
for rep in $(seq "$REPS"); do
  for model in demo big; do
    if [ $model = demo ]; then d=$DSTEP; q=${VARIANTS[0]}; else d=$BIGD; q=$BIGQ; fi
    l=$(load)
    row="$(strata_tps "$d")	$(strata_tps "$q")	$(torch_tps "$d" fp32)	$(torch_tps "$d" int8)"
    printf '%s\t%s\n' "$model" "$row" >>"$OUT/decode.tsv"
    say "| $rep | $l | $model | $(echo "$row" | tr '\t' '|' | sed 's/|/ | /g') |"
  done
done
python3 - "$OUT/decode.tsv" <<'EOF' | tee -a "$TABLE"
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\n| model | Strata fp32 | Strata int8 | int8/fp32 | PyTorch fp32 | PyTorch int8 | Strata/PyTorch fp32 | Strata/PyTorch int8 |")
print("|---|---|---|---|---|---|---|---|")
for model in ("demo", "big"):
    cols = list(zip(*[[float(v) for v in r[1:]] for r in rows if r[0] == model]))
    if not cols:
        continue
    sf, si, tf, ti = (statistics.median(c) for c in cols)
    print(f"| {model} (median) | {sf:.1f} | {si:.1f} | {si / sf:.2f}x | {tf:.1f} | {ti:.1f} | {sf / tf:.2f}x | {si / ti:.2f}x |")
EOF

# ---------------------------------------------------------------- pipelined generation
say ""
say "## Pipelined generation: 32 prompts x $NEW new tokens, pp = 2 vs pp = 1 (demo model)"
say ""
"$PY" -c "import sys; sys.path.insert(0, 'bench'); from torchpeers import config, prompts
print('\n'.join(prompts.prompts(config.load(sys.argv[1]).train.data, 32, $PLEN)))" "$BIG" >"$OUT/prompts32.txt"
say "| layout | threads/rank | load avg | decode tok/s | prefill tok/s | p50 ms | idle share per rank |"
say "|---|---|---|---|---|---|---|"
for rep in $(seq 2); do
  for lay in "pp=1 1" "pp=1 2" "pp=2 1"; do
    set -- $lay
    l=$(load)
    "$STRATA" generate "$DSTEP" --threads "$2" --prompts "$OUT/prompts32.txt" --max-new-tokens "$NEW" \
      --layout "$1" --json >"$OUT/pipe.json"
    say "$(json '"| '"$1"' | '"$2"' | '"$l"' | %.1f | %.1f | %.2f | %s |" % (d["report"]["decode_tokens_per_s"], d["report"]["prefill_tokens_per_s"], d["report"]["token_ms_p50"], ", ".join("rank %d %.0f%%" % (x["rank"], 100 * (1 - x["busy_s"] / x["wall_s"])) for x in d["report"]["ranks"]))' <"$OUT/pipe.json")"
  done
done
say ""
say "load average at the end: $(load); everything is in $OUT"
