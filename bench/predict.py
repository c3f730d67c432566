#!/usr/bin/env python3
"""Predicted against measured step time and peak memory for every 2-rank layout.

Profiles the machine once (`strata profile`), then for each layout asks `strata plan
--json`-free `strata plan` for its prediction and runs it (`strata launch`) to measure:
the median `step_s` over the steps after warm-up, and each rank's `peak_rss_mib`. Also
runs `strata plan --auto --world 2` and measures its top candidates, to check that the
one ranked first is the measured fastest. Prints two tables and the errors.

Run it on a quiet machine (nothing else using the cores): it is a benchmark, and the
numbers mean nothing on a shared machine.

With --breakdown each run also writes a trace (`output.trace_steps: 3`) and the script
prints, per rank and action kind, the measured median seconds of one action against the
plan's (`strata plan --json`: a stage's fwd_s, bwd_s, weight_grad_s, input_grad_s), the
idle gaps between actions, the time from the schedule's last action to the optimizer (the
data-parallel reduction and waiting for a slower replica) and the optimizer span: where a
step's error comes from.

usage: bench/predict.py [--config configs/gpt-tiny.yaml] [--steps 8] [--out DIR]
                        [--profile PATH (reuse instead of profiling)] [--auto-top 3]
                        [--only NAME ...] [--strata BIN] [--breakdown]
"""
import argparse, json, os, re, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATA = os.path.join(ROOT, "target", "release", "strata")
TRACE = False

# name -> parallel overrides (the global batch stays 64 sequences of the config)
LAYOUTS = [
    ("gpipe", dict(pp=2, tp=1, dp=1, schedule="gpipe")),
    ("1f1b", dict(pp=2, tp=1, dp=1, schedule="1f1b")),
    ("interleaved", dict(pp=2, tp=1, dp=1, schedule="interleaved-1f1b", virtual_stages=2)),
    ("zb-h1", dict(pp=2, tp=1, dp=1, schedule="zb-h1")),
    ("tp=2", dict(pp=1, tp=2, dp=1, schedule="1f1b")),
    ("dp=2", dict(pp=1, tp=1, dp=2, schedule="1f1b", microbatches="half")),
]


def sh(args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def config_text(base, out_dir, name, steps, overrides):
    text = open(base).read()
    cfg_dir = os.path.dirname(os.path.abspath(base))
    text = re.sub(r"^(\s*data:\s*)(\S+)", lambda m: m.group(1) + (m.group(2) if m.group(2) == "random" or m.group(2).startswith("/") else os.path.normpath(os.path.join(cfg_dir, m.group(2)))), text, flags=re.M)
    text = re.sub(r"^(\s*dir:\s*)\S+", lambda m: m.group(1) + os.path.join(out_dir, "run-" + name), text, flags=re.M)
    text = re.sub(r"^(\s*steps:\s*)\S+", lambda m: m.group(1) + str(steps), text, flags=re.M)
    text = re.sub(r"^(\s*eval_every:\s*)\S+", r"\g<1>0", text, flags=re.M)
    traced = 3 if TRACE else 0
    if re.search(r"^\s*trace_steps:", text, flags=re.M):
        text = re.sub(r"^(\s*trace_steps:\s*)\S+", rf"\g<1>{traced}", text, flags=re.M)
    elif TRACE:
        text = re.sub(r"^output:\n", "output:\n  trace_steps: 3\n", text, flags=re.M)
    m_match = re.search(r"^\s*microbatches:\s*(\d+)", text, flags=re.M)
    for k, v in overrides.items():
        if v == "half":
            v = int(m_match.group(1)) // 2
        pat = rf"^(\s*{k}:\s*)\S+"
        if re.search(pat, text, flags=re.M):
            text = re.sub(pat, lambda m: m.group(1) + str(v), text, flags=re.M)
        else:
            text = re.sub(r"^parallel:\n", f"parallel:\n  {k}: {v}\n", text, flags=re.M)
    return text


def predict(cfg, profile):
    out = sh([STRATA, "plan", cfg, "--profile", profile])
    step = re.search(r"predicted step ([\d.]+)(ms|s|us)", out)
    unit = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[step.group(2)]
    mem = {}
    for m in re.finditer(r"rank (\d+) peak memory ([\d.]+)(MiB|GiB)", out):
        mem[int(m.group(1))] = float(m.group(2)) * (1024 if m.group(3) == "GiB" else 1)
    return float(step.group(1)) * unit, mem


def breakdown(cfg, profile, run_dir):
    """Prints measured per-action medians against the plan's, gaps and the optimizer."""
    plan = json.loads(sh([STRATA, "plan", cfg, "--profile", profile, "--json"]))
    want = {"F": "fwd_s", "B": "bwd_s", "W": "weight_grad_s"}
    doc = json.load(open(os.path.join(run_dir, "trace.json")))
    ev = [e for e in doc["traceEvents"] if "cat" in e]
    per = {}
    for e in ev:
        m = re.match(r"(wait )?(\S+) mb=\d+ chunk=(\d+)", e["name"])
        key = (e["tid"], (m.group(1) or "") + m.group(2), int(m.group(3))) if m else (e["tid"], e["name"], -1)
        per.setdefault(key, []).append(e)
    for (rank, kind, chunk), es in sorted(per.items()):
        if kind.startswith("step"):
            continue
        med = statistics.median(x["dur"] for x in es) / 1e6
        st = plan["stages"][chunk] if chunk >= 0 else None
        p = st.get(want.get(kind, ""), None) if st else None
        if kind == "B" and plan["schedule"] == "zb-h1":
            p = None
        if kind == "I" and st:
            p = st.get("input_grad_s") or st["bwd_s"] - st["weight_grad_s"]
        cmp = f"  plan {p * 1e3:8.2f} ms ({100 * (p - med) / med:+.1f}%)" if p else ""
        print(f"    rank {rank} {kind:>10} chunk {chunk:>2}: {len(es):3d} x median {med * 1e3:8.2f} ms{cmp}")
    for rank in sorted({e["tid"] for e in ev}):
        acts = sorted((e for e in ev if e["tid"] == rank and e["cat"] in ("compute", "comm") and e["name"] != "optimizer"), key=lambda e: e["ts"])
        gaps, end = 0.0, None
        for a in acts:
            if end is not None and a["ts"] > end:
                gap = a["ts"] - end
                gaps += gap if gap < 50e3 else 0.0  # longer: between steps
            end = max(end or 0.0, a["ts"] + a["dur"])
        steps = max(1, sum(1 for e in ev if e["tid"] == rank and e["cat"] == "step"))
        print(f"    rank {rank} gaps under 50 ms between actions: {gaps / steps / 1e3:.1f} ms per step")
        # From the schedule's last action to the optimizer span: the data-parallel
        # reduction's finish and waiting there for a slower replica.
        opt = [e for e in ev if e["tid"] == rank and e["name"] == "optimizer"]
        before = []
        for o in opt:
            done = [a["ts"] + a["dur"] for a in acts if a["ts"] + a["dur"] <= o["ts"]]
            if done:
                before.append(o["ts"] - max(done))
        if before:
            print(f"    rank {rank} last action to optimizer: median {statistics.median(before) / 1e3:.1f} ms per step (each: {', '.join(f'{b / 1e3:.0f}' for b in before)})")


def measure(cfg, out_dir, name, warmup):
    sh([STRATA, "launch", cfg])
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "run-" + name, "metrics.jsonl"))]
    steps = [r["step_s"] for r in rows[warmup:]]
    rss = {}
    for r in rows:
        for x in r["ranks"]:
            rss[x["rank"]] = max(rss.get(x["rank"], 0.0), x["peak_rss_mib"])
    return statistics.median(steps), rss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "gpt-tiny.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--out", default="/tmp/strata-predict")
    ap.add_argument("--profile", help="reuse this profile instead of measuring one")
    ap.add_argument("--auto-top", type=int, default=3, help="auto-plan candidates to measure")
    ap.add_argument("--only", nargs="*", help="layouts to run (names of the table)")
    ap.add_argument("--strata", help="the strata binary (default target/release/strata)")
    ap.add_argument("--breakdown", action="store_true", help="trace each run and print measured against planned action times")
    a = ap.parse_args()
    global STRATA, TRACE
    TRACE = a.breakdown
    STRATA = a.strata or STRATA
    if not os.path.exists(STRATA):
        sys.exit(f"{STRATA} is missing: cargo build --release --workspace")
    os.makedirs(a.out, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores" + ("  (NOT QUIET: numbers are not meaningful)" if load > 0.5 else ""))
    profile = a.profile
    if not profile:
        profile = os.path.join(a.out, "profile.json")
        base = os.path.join(a.out, "profile.yaml")
        open(base, "w").write(config_text(a.config, a.out, "profile", a.steps, {}))
        t0 = time.time()
        print(sh([STRATA, "profile", base, "--out", profile, "--world", "2"]), end="")
        print(f"profiled in {time.time() - t0:.0f} s")
    layouts = [l for l in LAYOUTS if not a.only or l[0] in a.only]
    # The auto-planner's ranking, and its top candidates as layouts to measure.
    auto_cfg = os.path.join(a.out, "auto.yaml")
    open(auto_cfg, "w").write(config_text(a.config, a.out, "auto", a.steps, {}))
    auto = json.loads(sh([STRATA, "plan", auto_cfg, "--auto", "--world", "2", "--json", "--profile", profile, "--top", str(max(a.auto_top, 1))]))
    ranked = []
    for i, c in enumerate(auto["candidates"][: a.auto_top]):
        name = f"auto#{i + 1}"
        ov = dict(pp=c["pp"], tp=c["tp"], dp=c["dp"], schedule=c["schedule"], virtual_stages=c["virtual_stages"], microbatches=c["microbatches"], micro_batch_size=c["micro_batch_size"])
        ranked.append(name)
        layouts.append((name, ov))
    rows = []
    for name, ov in layouts:
        cfg = os.path.join(a.out, name.replace("=", "").replace("#", "") + ".yaml")
        open(cfg, "w").write(config_text(a.config, a.out, name.replace("=", "").replace("#", ""), a.steps, ov))
        pred_s, pred_mem = predict(cfg, profile)
        meas_s, meas_mem = measure(cfg, a.out, name.replace("=", "").replace("#", ""), a.warmup)
        desc = " ".join(f"{k}={v}" for k, v in ov.items())
        rows.append((name, desc, pred_s, meas_s, pred_mem, meas_mem))
        print(f"  {name:<12} predicted {pred_s:7.3f} s  measured {meas_s:7.3f} s  ({100 * (pred_s - meas_s) / meas_s:+.1f}%)", flush=True)
        if TRACE:
            breakdown(cfg, profile, os.path.join(a.out, "run-" + name.replace("=", "").replace("#", "")))
    print("\nstep time (median of steps after warm-up)")
    print(f"| layout | settings | predicted s | measured s | error |")
    print(f"|---|---|---|---|---|")
    worst = 0.0
    for name, desc, p, m, _, _ in rows:
        err = 100 * (p - m) / m
        worst = max(worst, abs(err))
        print(f"| {name} | {desc} | {p:.3f} | {m:.3f} | {err:+.1f}% |")
    print(f"worst step-time error {worst:.1f}%")
    print("\npeak memory per rank (measured: VmHWM)")
    print(f"| layout | rank | predicted MiB | measured MiB | error |")
    print(f"|---|---|---|---|---|")
    worst_mem = 0.0
    for name, _, _, _, pm, mm in rows:
        for r in sorted(mm):
            p = pm.get(r * len(pm) // len(mm)) if pm else None
            if p is None:
                continue
            err = 100 * (p - mm[r]) / mm[r]
            worst_mem = max(worst_mem, abs(err))
            print(f"| {name} | {r} | {p:.0f} | {mm[r]:.0f} | {err:+.1f}% |")
    print(f"worst memory error {worst_mem:.1f}%")
    if ranked:
        measured = {n: m for n, _, _, m, _, _ in rows}
        fastest = min(measured, key=measured.get)
        print(f"\nauto-plan ranks {ranked[0]} first; measured fastest of all runs: {fastest} ({measured[fastest]:.3f} s); "
              + ("OK" if measured[ranked[0]] <= measured[fastest] * 1.0 + 1e-9 else f"{ranked[0]} measured {measured[ranked[0]]:.3f} s"))


if __name__ == "__main__":
    main()
