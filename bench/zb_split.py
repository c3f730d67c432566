#!/usr/bin/env python3
"""Per-action times and bubble of finished runs, from their trace.json and metrics.jsonl.

Used for issue 11's zero-bubble check: under tp > 1, ZB-H1 must split every backward into
an input-gradient part (I) and a weight-gradient part (W) with real work in W. Give it run
directories (one per schedule) and it prints, per run: the mean F, B, I and W time per
microbatch and chunk (from the traced steps), and the mean bubble per rank (from
metrics.jsonl, steps after the first).

    python3 bench/zb_split.py runs/zb-1f1b runs/zb-zbh1
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def action_times(run: Path) -> dict:
    """Mean duration in ms of each compute action kind (F, B, I, W) over all ranks."""
    trace = json.loads((run / "trace.json").read_text())
    per_kind = defaultdict(list)
    for ev in trace["traceEvents"]:
        if ev.get("cat") != "compute":
            continue
        kind = ev["name"].split()[0]
        if kind in ("F", "B", "I", "W"):
            per_kind[kind].append(ev["dur"] / 1e3)
    return {k: (statistics.mean(v), len(v)) for k, v in sorted(per_kind.items())}


def bubbles(run: Path) -> list:
    """Mean bubble per rank over the steps after the first (warm-up)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "ranks" in r and r["step"] > 1]
    if not rows:
        return []
    n = len(rows[0]["ranks"])
    return [statistics.mean(r["ranks"][i]["bubble"] for r in rows) for i in range(n)]


def step_time(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_s" in r and r["step"] > 1]
    return statistics.mean(r["step_s"] for r in rows) if rows else float("nan")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        run = Path(arg)
        times = action_times(run)
        cells = ", ".join(f"{k} {ms:.1f} ms (n={n})" for k, (ms, n) in times.items())
        b = bubbles(run)
        print(f"{run}: step {step_time(run):.3f} s | {cells}")
        print(f"    bubble per rank: {', '.join(f'{x * 100:.1f}%' for x in b)}"
              f" | mean {statistics.mean(b) * 100:.1f}%" if b else "    no bubble data")


if __name__ == "__main__":
    main()
