#!/usr/bin/env python3
"""Peak memory per rank, planned (`strata plan`, the memory model) against measured
(metrics.jsonl's peak_rss_mib, the process's VmHWM), for every combination of layout x
parallel.recompute x parallel.sequence_parallel on gpt-tiny (GPipe: all 8 microbatches
of 8 x 128 tokens in flight, so activations dominate), with the loss after the last step
(the same for every mode of one layout). Runs one launch at a time. Memory and losses do
not depend on machine load, so a shared machine is fine.

The model counts live tensors, which is what a rank's resident memory is under
`train.allocator: release` (the default here). Under `retain` (the engine's default) or
`system` the heap also keeps freed activations, and the table shows by how much.

Usage: bench/memory.py [--steps N] [--layouts pp2,tp2] [--allocator release|retain|system]
                       [--bin target/release/strata]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

LAYOUTS = {
    # name: (pp, tp, sequence_parallel values)
    "pp2": (2, 1, [False]),
    "tp2": (1, 2, [False, True]),
}
RECOMPUTE = ["none", "selective", "full"]


def planned(bin_, cfg, sets):
    """The planned peak of each pipeline rank, MiB (every tp rank of a stage plans alike)."""
    out = subprocess.run([bin_, "plan", cfg, *sets], check=True, capture_output=True, text=True)
    unit = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
    return {
        int(m.group(1)): float(m.group(2)) * unit[m.group(3)]
        for m in re.finditer(r"^rank (\d+) peak memory ([\d.]+)(KiB|MiB|GiB)", out.stdout, re.M)
    }


def measured(bin_, cfg, sets, log):
    with open(log, "w") as f:
        subprocess.run([bin_, "launch", cfg, *sets], check=True, stdout=f, stderr=subprocess.STDOUT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layouts", default="pp2,tp2")
    ap.add_argument("--allocator", default="release", choices=["release", "retain", "system"],
                    help="train.allocator of the measured runs")
    ap.add_argument("--bin", default=os.environ.get("STRATA_BIN", "target/release/strata"))
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    cfg = "configs/gpt-tiny.yaml"
    tmp = tempfile.mkdtemp(prefix="strata-memory.")
    rows = []
    for name in args.layouts.split(","):
        pp, tp, sps = LAYOUTS[name]
        for sp in sps:
            for rc in RECOMPUTE:
                tag = f"{name}-{rc}-sp{int(sp)}"
                out = os.path.join(tmp, tag)
                sets = [
                    "--set", f"parallel.pp={pp}", "--set", f"parallel.tp={tp}",
                    "--set", f"parallel.recompute={rc}",
                    "--set", f"parallel.sequence_parallel={str(sp).lower()}",
                    "--set", f"train.steps={args.steps}", "--set", "train.eval_every=0",
                    "--set", "train.log_every=1", "--set", f"output.dir={out}",
                    "--set", "checkpoint.enabled=false",
                    "--set", f"train.allocator={args.allocator}",
                ]
                plan = planned(args.bin, cfg, sets)
                measured(args.bin, cfg, sets, out + ".log")
                last = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][-1]
                for r in last["ranks"]:
                    # World rank -> pipeline rank for these layouts (pp or tp, not both).
                    p, m = plan[r["rank"] // tp], r["peak_rss_mib"]
                    rows.append((name, rc, sp, r["rank"], p, m, last["loss"]))
                    print(f"{tag} rank {r['rank']}: planned {p:.0f} measured {m:.0f} MiB", file=sys.stderr)
    print(f"gpt-tiny, GPipe, 8 microbatches x 8 x 128 tokens, {args.steps} steps; MiB per rank")
    print("| layout | recompute | seq. parallel | rank | planned | measured | (planned − measured) / measured | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rc, sp, rank, p, m, loss in rows:
        print(f"| {name} | {rc} | {'on' if sp else 'off'} | {rank} | {p:.0f} | {m:.0f} | "
              f"{(p / m - 1) * 100:+.1f}% | {loss:.6f} |")


if __name__ == "__main__":
    main()
