"""`compare.py train`: Strata against its PyTorch peers on gpt-tiny, layout by layout,
interleaved (Strata, PyTorch, Strata, PyTorch, ...), with the ratio table of issue 12.

Per run: tokens/s = tokens per step × kept steps / Σ step_s over the steps after the
warm-up (step_s: the slowest rank's training part of the step, evaluation excluded, for
both sides). A row reports the median over repetitions (and the range); ratio = Strata
median / PyTorch median; MFU = tokens/s × FLOPs per token / the sgemm peak measured with
as many processes and threads as the layout uses.

Equal work: every run's losses are compared with a one-process PyTorch reference (the
first single-1t peer run, or a run made for the purpose): step 1 (same weights, same 64
rows) to `--loss-rtol`, later steps (after optimizer updates, so they see the gradients)
to `--loss-rtol-later`. A PyTorch peer that differs fails the command; a Strata run that
differs is flagged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from . import common


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # bench/configs/<name>.yaml
    label: str
    world: int
    threads: int
    tunable: bool  # whole batch or chunks is the peer's choice (no pipeline)


LAYOUTS = [
    Layout("single-1t", "one process, 1 thread", 1, 1, True),
    Layout("single-2t", "one process, 2 threads", 1, 2, True),
    Layout("pp2-1f1b", "pp=2 1F1B (Schedule1F1B)", 2, 1, False),
    Layout("pp2-interleaved", "pp=2 interleaved v=2 (ScheduleInterleaved1F1B)", 2, 1, False),
    Layout("tp2", "tp=2 (Megatron layers over gloo, whole batch)", 2, 1, True),
    Layout("tp2-sp", "tp=2, Strata with sequence parallelism (peer: tp=2 as above)", 2, 1, True),
    Layout("dp2", "dp=2 (DDP over gloo)", 2, 1, True),
]


def add_args(ap) -> None:
    ap.add_argument("--strata", required=True, help="the strata binary (built beforehand)")
    ap.add_argument("--layouts", default=",".join(l.name for l in LAYOUTS),
                    help="comma-separated subset of: " + ", ".join(l.name for l in LAYOUTS))
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every run")
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="leading steps discarded per run")
    ap.add_argument("--out", help="run directory (default runs/bench/train-<time>)")
    ap.add_argument("--python", default=common.DEFAULT_PYTHON, help="Python with torch 2.11")
    ap.add_argument("--mpiexec", help="mpiexec for strata launch (default: on PATH)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--torch-mbs", default="",
                    help="per-layout PyTorch micro-batch size, e.g. single-1t=32,tp2=64 "
                         "(default: the config's)")
    ap.add_argument("--tune-torch", action="store_true",
                    help="first pick each non-pipeline peer's fastest micro-batch size "
                         "(whole batch, halves, quarters, eighths) in short runs")
    ap.add_argument("--torch-compile", action="store_true",
                    help="torch.compile the PyTorch peers (default eager); raise --warmup to "
                         "discard the compiling steps")
    ap.add_argument("--skip-strata", action="store_true",
                    help="run only the PyTorch peers (checks the peers' losses)")
    ap.add_argument("--peak-n", type=int, default=2048, help="sgemm matrix size")
    ap.add_argument("--loss-rtol", type=float, default=1e-5, help="step-1 loss tolerance")
    ap.add_argument("--loss-rtol-later", type=float, default=1e-4,
                    help="tolerance of the later steps' losses (after optimizer updates)")


def _strata_run(args, cfg: str, run_dir: str) -> dict:
    cmd = [args.strata, "launch", cfg] + (["--mpiexec", args.mpiexec] if args.mpiexec else [])
    res = common.run(cmd, os.path.join(run_dir, "strata.log"), args.timeout)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not res.ok or not os.path.exists(metrics):
        return {"ok": False, "log": res.log, "tail": res.tail()}
    with open(metrics) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    tokens = steps[0]["tokens_per_s"] * steps[0]["step_s"]
    return {"ok": True, "loss": [s["loss"] for s in steps], "step_s": [s["step_s"] for s in steps],
            "tokens_per_step": round(tokens), "log": res.log}


def _torch_run(args, lay: Layout, cfg: str, run_dir: str, mbs: int | None,
               steps: int | None = None) -> dict:
    out = os.path.join(run_dir, "peer.json")
    script = os.path.join(common.BENCH, "torch_train.py")
    launcher = [args.python] if lay.world == 1 else [
        args.python, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(lay.world)]
    cmd = launcher + [script, "--config", cfg, "--out", out]
    cmd += ["--micro-batch-size", str(mbs)] if mbs else []
    cmd += ["--steps", str(steps)] if steps else []
    cmd += ["--compile"] if args.torch_compile else []
    env = {"OMP_NUM_THREADS": str(lay.threads), "MKL_NUM_THREADS": str(lay.threads)}
    res = common.run(cmd, os.path.join(run_dir, "torch.log"), args.timeout, env)
    retried = False
    if not res.ok and _terminated(res.log):
        # A torch.distributed.run rank now and then dies in C++ ("terminate called without
        # an active exception", SIGABRT), seen right after start-up, before any result.
        # That says nothing of the peer's speed: run it once more, and say so.
        print(f"  {lay.name}: the PyTorch peer died in std::terminate ({res.log}); "
              "running it once more", flush=True)
        res = common.run(cmd, os.path.join(run_dir, "torch-retry.log"), args.timeout, env)
        retried = True
    if not res.ok or not os.path.exists(out):
        return {"ok": False, "log": res.log, "tail": res.tail()}
    with open(out) as f:
        peer = json.load(f)
    return dict(peer, ok=True, log=res.log, retried=retried)


def _terminated(log: str) -> bool:
    """The peer's log shows a rank ended by libstdc++'s std::terminate."""
    with open(log, errors="replace") as f:
        return "terminate called without an active exception" in f.read()


def tokens_per_s(run: dict, warmup: int) -> float | None:
    kept = run["step_s"][warmup:] if run.get("ok") else []
    return run["tokens_per_step"] * len(kept) / sum(kept) if kept else None


def _tune(args, lay: Layout, cfg: str, out: str) -> int | None:
    per_rank = 64 // (2 if lay.name == "dp2" else 1)
    timed = {}
    for mbs in (per_rank, per_rank // 2, per_rank // 4, per_rank // 8):
        run = _torch_run(args, lay, cfg, os.path.join(out, "tune", lay.name, f"mbs{mbs}"),
                         mbs, steps=args.warmup + 3)
        timed[mbs] = tokens_per_s(run, args.warmup)
        print(f"  tune {lay.name}: micro-batch {mbs}: {common.fmt_num(timed[mbs])} tokens/s")
    ok = {m: t for m, t in timed.items() if t}
    return max(ok, key=ok.get) if ok else None


def _config(out: str, name: str, steps: int, strata_dir: str) -> str:
    """This command's copy of bench/configs/<name>.yaml (read by both sides)."""
    return common.rewrite_config(os.path.join(common.BENCH, "configs", f"{name}.yaml"),
                                 os.path.join(out, "configs", f"{name}.yaml"), steps, strata_dir)


def _peaks(args, kinds, out: str, when: str) -> dict:
    return {k: common.sgemm_peak(args.python, k[0], k[1], args.peak_n,
                                 os.path.join(out, "peak", f"{k[0]}x{k[1]}-{when}.log"))
            for k in kinds}


def _merge_peaks(before: dict, after: dict) -> dict:
    """The larger of the two measurements; a drift means the machine was not quiet."""
    merged = {}
    for k, b in before.items():
        a = after.get(k)
        if a and b and abs(a - b) > 0.05 * b:
            print(f"WARNING: sgemm peak {k[0]}x{k[1]} moved {b:.1f} -> {a:.1f} GFLOP/s "
                  "during the run", file=sys.stderr)
        merged[k] = max((x for x in (a, b) if x), default=None)
    return merged


def _interleaved(args, layouts, mbs: dict, out: str) -> dict:
    """Every repetition runs each layout's Strata run, then its PyTorch run."""
    runs = {l.name: {"strata": [], "torch": []} for l in layouts}
    for rep in range(1, args.reps + 1):
        for lay in layouts:
            sdir = os.path.join(out, "strata", lay.name, f"rep{rep}")
            cfg = _config(out, lay.name, args.steps, sdir)
            s = {"ok": False, "skipped": True, "log": "", "tail": "skipped"} \
                if args.skip_strata else _strata_run(args, cfg, sdir)
            t = _torch_run(args, lay, cfg, os.path.join(out, "torch", lay.name, f"rep{rep}"),
                           mbs.get(lay.name))
            runs[lay.name]["strata"].append(s)
            runs[lay.name]["torch"].append(t)
            _progress(rep, lay, s, t, args.warmup)
    return runs


def main(args) -> int:
    by_name = {l.name: l for l in LAYOUTS}
    unknown = [n for n in args.layouts.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {list(by_name)}")
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    layouts = [by_name[n] for n in args.layouts.split(",")]
    out = os.path.abspath(args.out or os.path.join(
        common.REPO, "runs", "bench", time.strftime("train-%Y%m%d-%H%M%S")))
    mbs = {k: int(v) for k, v in (kv.split("=") for kv in args.torch_mbs.split(",") if kv)}
    print(f"bench: run directory {out}")
    machine = {"before": common.quiet_check()}
    kinds = sorted({(l.world, l.threads) for l in layouts})
    peaks = _peaks(args, kinds, out, "before")
    if args.tune_torch:
        for lay in layouts:
            if lay.tunable and lay.name not in mbs:
                cfg = _config(out, lay.name, args.steps, os.path.join(out, "strata", lay.name))
                mbs[lay.name] = _tune(args, lay, cfg, out)
    # The equal-work check needs one-process losses: single-1t's first run, or this one.
    reference = None
    if "single-1t" not in args.layouts.split(","):
        ref_cfg = _config(out, "single-1t", args.steps, os.path.join(out, "strata", "single-1t"))
        reference = _torch_run(args, by_name["single-1t"], ref_cfg,
                               os.path.join(out, "torch", "reference"), None)
    runs = _interleaved(args, layouts, mbs, out)
    peaks = _merge_peaks(peaks, _peaks(args, kinds, out, "after"))
    machine["after"] = common.quiet_check()
    reference = reference or runs["single-1t"]["torch"][0]
    return _report(args, layouts, runs, reference, peaks, machine, mbs, out)


def _progress(rep: int, lay: Layout, s: dict, t: dict, warmup: int) -> None:
    def one(r):
        if r.get("skipped"):
            return "skipped"
        if not r["ok"]:
            return f"FAILED (log {r['log']})\n{r['tail']}"
        again = " (run twice: the first died in std::terminate)" if r.get("retried") else ""
        return (f"{common.fmt_num(tokens_per_s(r, warmup))} tok/s, "
                f"step-1 loss {r['loss'][0]:.6f}{again}")
    print(f"rep {rep} {lay.name}: strata {one(s)} | torch {one(t)}", flush=True)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check_losses(args, layouts, runs, reference) -> tuple[list[list[str]], bool]:
    """Per layout: each side's step-1 loss against the one-process PyTorch reference, the
    worst later-step difference, and the worst Strata/PyTorch difference over all steps.
    PyTorch peers must match the reference (step 1 to `loss_rtol`, later steps to
    `loss_rtol_later`); Strata is only flagged."""
    if not reference.get("ok"):
        print(f"bench: the one-process PyTorch reference failed (log {reference['log']})",
              file=sys.stderr)
        return [], False
    ref = reference["loss"]
    rows, peers_ok = [], True

    def worst(rs, steps):
        return max((_rel(r["loss"][i], ref[i]) for r in rs for i in steps), default=None)

    for lay in layouts:
        cells = [lay.name]
        for side in ("strata", "torch"):
            ok = [r for r in runs[lay.name][side] if r["ok"]]
            first, later = worst(ok, [0]), worst(ok, range(1, len(ref)))
            bad = first is None or first > args.loss_rtol or \
                (later is not None and later > args.loss_rtol_later)
            peers_ok &= not (side == "torch" and bad)
            cells.append("—" if not ok else f"{ok[0]['loss'][0]:.7f}")
            later_text = "—" if later is None else f"{later:.1e}"
            cells.append("—" if first is None else
                         f"{first:.1e} / {later_text}" + (" MISMATCH" if bad else ""))
        pairs = [(s, t) for s, t in zip(runs[lay.name]["strata"], runs[lay.name]["torch"])
                 if s["ok"] and t["ok"]]
        drift = max((_rel(a, b) for s, t in pairs for a, b in zip(s["loss"], t["loss"])),
                    default=None)
        cells.append("—" if drift is None else f"{drift:.1e}")
        rows.append(cells)
    return rows, peers_ok


def _report(args, layouts, runs, reference, peaks, machine, mbs, out) -> int:
    rows, summary = [], {}
    flops = next((r["flops_per_token"] for l in layouts for r in runs[l.name]["torch"]
                  if r["ok"]), None)
    for lay in layouts:
        s = [x for x in (tokens_per_s(r, args.warmup) for r in runs[lay.name]["strata"]) if x]
        t = [x for x in (tokens_per_s(r, args.warmup) for r in runs[lay.name]["torch"]) if x]
        peak = peaks.get((lay.world, lay.threads))

        def mfu(xs):
            m = common.median(xs)
            return "—" if not (m and peak and flops) else f"{100 * m * flops / (peak * 1e9):.1f}%"
        ratio = (common.median(s) / common.median(t)) if s and t else None
        skipped = all(r.get("skipped") for r in runs[lay.name]["strata"])
        rows.append([lay.label, "skipped" if skipped else common.fmt_spread(s),
                     common.fmt_spread(t),
                     "—" if ratio is None else f"{ratio:.2f}", mfu(s), mfu(t)])
        summary[lay.name] = {"strata_tokens_per_s": s, "torch_tokens_per_s": t, "ratio": ratio,
                             "peak_gflops": peak, "torch_micro_batch_size": mbs.get(lay.name)}
    loss_rows, peers_ok = _check_losses(args, layouts, runs, reference)
    print()
    print(common.table(["layout", "Strata tokens/s", "PyTorch tokens/s", "ratio",
                        "Strata MFU", "PyTorch MFU"], rows))
    print()
    peak_text = ", ".join(f"{p} proc x {t} thr {common.fmt_num(g, 1)}"
                          for (p, t), g in sorted(peaks.items()))
    print(f"gpt-tiny, 8192 tokens/step; {args.reps} reps x {args.steps} steps, first "
          f"{args.warmup} discarded; median (min–max). FLOPs/token "
          f"{common.fmt_num(flops and flops / 1e6, 1)}M = 6·N_matmul + 12·L·s·d. "
          f"sgemm peak GFLOP/s (torch.mm): {peak_text}. Load average before/after: "
          f"{machine['before']['load1']:.2f}/{machine['after']['load1']:.2f}.")
    print()
    print(common.table(["layout", "Strata step-1 loss", "vs reference: step 1 / later",
                        "PyTorch step-1 loss", "vs reference: step 1 / later",
                        "max Strata/PyTorch loss diff (all steps)"], loss_rows))
    print(f"reference: one PyTorch process ({reference['log']}); tolerances: step 1 "
          f"{args.loss_rtol:g}, later steps {args.loss_rtol_later:g} (relative)")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"rows": summary, "peaks_gflops": {f"{p}x{t}": g for (p, t), g in peaks.items()},
                   "flops_per_token": flops, "machine": machine, "args": vars(args),
                   "reference": reference, "runs": runs}, f, indent=1)
    print(f"\nbench: details in {out}/summary.json")
    failed = [l.name for l in layouts for side in ("strata", "torch")
              for r in runs[l.name][side] if not r["ok"] and not r.get("skipped")]
    if failed or not peers_ok:
        print(f"bench: FAILED runs {sorted(set(failed))} or a PyTorch peer computed a "
              "different loss", file=sys.stderr)
        return 1
    return 0
