"""`compare.py decode`: `strata generate` against the eager PyTorch KV-cache baseline
(fp32 and int8) for issue 10, interleaved per repetition, on the demo model and a 114M
GPT, at batch 1 and 32.

Strata's side runs only where `strata generate` exists and a checkpoint is given with
`--checkpoint MODEL:PRECISION=DIR`; otherwise its cells read `skipped` and say why. The
PyTorch side decodes the `MODEL:fp32` checkpoint when one is given (for int8 too, through
`quantize_dynamic`), else the model config's initial weights. Its
output must end with a line such as

    prefill 12,345.6 tok/s | decode 678.9 tok/s | per token p50 1.47 ms p99 2.10 ms | ...

(the parser finds `prefill`, `decode`, `p50`, `p99` and the numbers after them; `p50/p99
1.47/2.10 ms` is read as well).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from . import common

sys.path.insert(0, common.BENCH)
from torchpeers.prompts import prompts as make_prompts  # noqa: E402


def add_args(ap) -> None:
    ap.add_argument("--strata", required=True, help="the strata binary")
    ap.add_argument("--models", default="demo=configs/demo.yaml,100m=bench/configs/gpt-100m.yaml",
                    help="NAME=CONFIG pairs (configs relative to the repository)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="MODEL:PRECISION=DIR, a Strata checkpoint for `strata generate` "
                         "(e.g. demo:fp32=runs/demo/checkpoints); repeatable")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads of both sides (`strata generate --threads`, "
                         "torch.set_num_threads)")
    ap.add_argument("--out", help="run directory (default runs/bench/decode-<time>)")
    ap.add_argument("--python", default=common.DEFAULT_PYTHON)
    ap.add_argument("--mpiexec", help="mpiexec for strata (passed as STRATA_MPIEXEC)")
    ap.add_argument("--timeout", type=float, default=1800)


def strata_has_generate(strata: str) -> bool:
    try:
        proc = subprocess.run([strata, "generate", "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


_NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)"
_TIME = _NUM + r"\s*(ms|us|µs|s)\b"
_TO_MS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _percentiles(low: str) -> tuple[float, float] | None:
    """(p50, p99) in ms from `p50 A ms ... p99 B ms` or `p50/p99 A/B ms`."""
    pair = re.search(r"p50\s*/\s*p99\D*?" + _NUM + r"\s*/\s*" + _TIME, low)
    if pair:
        unit = _TO_MS[pair.group(3)]
        return _num(pair.group(1)) * unit, _num(pair.group(2)) * unit
    m50, m99 = re.search(r"p50\D*?" + _TIME, low), re.search(r"p99\D*?" + _TIME, low)
    if m50 and m99:
        return (_num(m50.group(1)) * _TO_MS[m50.group(2)],
                _num(m99.group(1)) * _TO_MS[m99.group(2)])
    return None


def parse_generate_line(text: str) -> dict | None:
    """The figures of the last line of `text` that gives prefill, decode, p50 and p99."""
    for line in reversed(text.splitlines()):
        low = line.lower()
        pre = re.search(r"prefill\D*?" + _NUM, low)
        dec = re.search(r"decode\D*?" + _NUM, low)
        pct = _percentiles(low)
        if pre and dec and pct:
            return {"prefill_tok_s": _num(pre.group(1)), "decode_tok_s": _num(dec.group(1)),
                    "p50_ms": pct[0], "p99_ms": pct[1]}
    return None


def _strata(args, ckpt, texts, run_dir) -> dict:
    cmd = [args.strata, "generate", ckpt, "--max-new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    if len(texts) == 1:
        cmd += ["--prompt", texts[0]]
    else:
        path = os.path.join(run_dir, "prompts.txt")
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(texts) + "\n")
        cmd += ["--prompts", path]
    env = {"STRATA_MPIEXEC": args.mpiexec} if args.mpiexec else {}
    res = common.run(cmd, os.path.join(run_dir, "strata.log"), args.timeout, env)
    with open(res.log, encoding="utf-8", errors="replace") as f:
        figures = parse_generate_line(res.stdout) or parse_generate_line(f.read())
    if not res.ok or not figures:
        why = "failed" if not res.ok else "no prefill/decode line in its output"
        return {"ok": False, "why": why, "log": res.log, "tail": res.tail()}
    return dict(figures, ok=True, log=res.log)


def _torch(args, source: list[str], batch, precision, run_dir) -> dict:
    cmd = [args.python, os.path.join(common.BENCH, "torch_decode.py"), *source,
           "--batch", str(batch), "--precision", precision, "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    res = common.run(cmd, os.path.join(run_dir, "torch.log"), args.timeout, env)
    if not res.ok:
        return {"ok": False, "why": "failed", "log": res.log, "tail": res.tail()}
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), ok=True, log=res.log)


def main(args) -> int:
    models = dict(kv.split("=", 1) for kv in args.models.split(","))
    ckpts = {}
    for spec in args.checkpoint:
        key, _, path = spec.partition("=")
        if ":" not in key or not path:
            raise SystemExit(f"--checkpoint {spec}: expected MODEL:PRECISION=DIR")
        ckpts[tuple(key.split(":", 1))] = os.path.abspath(path)
    out = os.path.abspath(args.out or os.path.join(
        common.REPO, "runs", "bench", time.strftime("decode-%Y%m%d-%H%M%S")))
    print(f"bench: run directory {out}")
    machine = {"before": common.quiet_check()}
    has_gen = strata_has_generate(args.strata)
    if not has_gen:
        print(f"bench: `{args.strata} generate` is not available: Strata's cells are skipped")
    cases = [(m, int(b), p) for m in models for b in args.batches.split(",")
             for p in args.precisions.split(",")]
    results = {c: {"strata": [], "torch": []} for c in cases}
    for rep in range(1, args.reps + 1):
        for model, batch, prec in cases:
            cfg = os.path.join(common.REPO, models[model])
            data = _data_path(cfg)
            texts = make_prompts(data, batch, args.prompt_len)
            run_dir = os.path.join(out, model, f"b{batch}-{prec}", f"rep{rep}")
            if has_gen and (model, prec) in ckpts:
                s = _strata(args, ckpts[(model, prec)], texts, os.path.join(run_dir, "strata"))
            else:
                why = "no strata generate" if not has_gen else f"no --checkpoint {model}:{prec}=DIR"
                s = {"ok": False, "why": why, "skipped": True}
            # PyTorch decodes the fp32 checkpoint where there is one (int8: quantised by
            # quantize_dynamic), else the config's initial weights.
            source = ["--checkpoint", ckpts[(model, "fp32")]] if (model, "fp32") in ckpts \
                else ["--config", cfg]
            t = _torch(args, source, batch, prec, os.path.join(run_dir, "torch"))
            results[(model, batch, prec)]["strata"].append(s)
            results[(model, batch, prec)]["torch"].append(t)
            _progress(rep, model, batch, prec, s, t)
    machine["after"] = common.quiet_check()
    return _report(args, cases, results, machine, out)


def _data_path(cfg: str) -> str:
    from torchpeers.config import load
    return load(cfg).train.data


def _progress(rep, model, batch, prec, s, t) -> None:
    def one(r):
        if r.get("skipped"):
            return f"skipped ({r['why']})"
        if not r["ok"]:
            return f"FAILED: {r['why']} (log {r['log']})\n{r.get('tail', '')}"
        return (f"prefill {r['prefill_tok_s']:,.0f} decode {r['decode_tok_s']:,.1f} tok/s "
                f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms")
    print(f"rep {rep} {model} b{batch} {prec}: strata {one(s)} | torch {one(t)}", flush=True)


def _report(args, cases, results, machine, out) -> int:
    rows, failed = [], False
    for case in cases:
        cells = [case[0], str(case[1]), case[2]]
        medians = {}
        for side in ("strata", "torch"):
            ok = [r for r in results[case][side] if r["ok"]]
            if not ok:
                first = results[case][side][0]
                failed |= not first.get("skipped", False)
                cells += ["skipped" if first.get("skipped") else "failed", "—", "—"]
                continue
            pre = [r["prefill_tok_s"] for r in ok]
            dec = [r["decode_tok_s"] for r in ok]
            p50 = common.median([r["p50_ms"] for r in ok])
            p99 = common.median([r["p99_ms"] for r in ok])
            medians[side] = common.median(dec)
            cells += [common.fmt_spread(pre), common.fmt_spread(dec, 1), f"{p50:.2f} / {p99:.2f}"]
        ratio = medians["strata"] / medians["torch"] if len(medians) == 2 else None
        cells.append("—" if ratio is None else f"{ratio:.2f}")
        rows.append(cells)
    print()
    print(common.table(["model", "batch", "weights", "Strata prefill tok/s",
                        "Strata decode tok/s", "Strata p50 / p99 ms", "PyTorch prefill tok/s",
                        "PyTorch decode tok/s", "PyTorch p50 / p99 ms", "decode ratio"], rows))
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new (greedy); {args.reps} reps, "
          f"median (min–max); PyTorch eager KV cache, {args.threads} thread(s), int8 = "
          f"quantize_dynamic (per-channel). Load average before/after: "
          f"{machine['before']['load1']:.2f}/{machine['after']['load1']:.2f}.")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"machine": machine, "args": vars(args),
                   "results": [{"model": m, "batch": b, "precision": p, **results[(m, b, p)]}
                               for m, b, p in cases]}, f, indent=1)
    print(f"bench: details in {out}/summary.json")
    return 1 if failed else 0
