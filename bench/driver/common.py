"""What the train and decode comparisons share: running a command with a log and a time
limit, writing a run's copy of a bench config, the machine-quiet check, the sgemm peak,
and Markdown tables.

Invariant: every command's output goes to a log file under the run directory; a failed
command is reported with the tail of its log and never stops the other rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
DEFAULT_PYTHON = os.path.expanduser("~/.cache/strata/torch-2.11.0/bin/python")


@dataclasses.dataclass
class Result:
    ok: bool
    seconds: float
    log: str
    stdout: str

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def run(cmd: list[str], log: str, timeout: float, env: dict | None = None,
        cwd: str = REPO) -> Result:
    """Runs `cmd` (stdout and stderr into `log`, stdout also returned) within `timeout` s."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                  stderr=f, text=True, timeout=timeout,
                                  start_new_session=True)
            ok, out = proc.returncode == 0, proc.stdout
            if not ok:
                f.write(f"\n[exit code {proc.returncode}]\n")
        except subprocess.TimeoutExpired as e:
            ok, out = False, e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            f.write(f"\n[killed after {timeout:.0f} s]\n")
        f.write(out)
    return Result(ok, time.perf_counter() - t0, log, out)


def rewrite_config(src: str, dst: str, steps: int, output_dir: str) -> str:
    """Writes `src` to `dst` with `train.steps`, an absolute `train.data` and `output.dir`
    replaced (each key must occur exactly once), so Strata and its peer read one file."""
    with open(src, encoding="utf-8") as f:
        text = f.read()
    data_dir = os.path.dirname(os.path.abspath(src))

    def sub(key: str, repl, text: str) -> str:
        pattern = re.compile(rf"^(\s+{key}:\s*)(\S+)(.*)$", re.M)
        if len(pattern.findall(text)) != 1:
            raise SystemExit(f"{src}: expected exactly one `{key}:` line to override")
        return pattern.sub(lambda m: m.group(1) + repl(m.group(2)) + m.group(3), text)

    text = sub("steps", lambda _: str(steps), text)
    text = sub("data", lambda v: os.path.normpath(os.path.join(data_dir, v)), text)
    text = sub("dir", lambda _: output_dir, text)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(text)
    return dst


def quiet_check(limit: float = 0.5) -> dict:
    """The 1-minute load average; warns when other work shares the machine."""
    load1 = os.getloadavg()[0]
    quiet = load1 <= limit
    if not quiet:
        print(f"WARNING: load average {load1:.2f} > {limit}: other processes share the "
              "machine; these numbers are a smoke test, not a measurement", file=sys.stderr)
    return {"load1": load1, "quiet": quiet}


def sgemm_peak(python: str, procs: int, threads: int, n: int, log: str) -> float | None:
    """GFLOP/s of `procs` concurrent torch.mm processes with `threads` threads each."""
    cmd = [python, os.path.join(BENCH, "sgemm_peak.py"), "--procs", str(procs),
           "--threads", str(threads), "--n", str(n)]
    res = run(cmd, log, timeout=600)
    if not res.ok:
        print(f"sgemm peak ({procs} x {threads} threads) failed:\n{res.tail()}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["gflops"]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def fmt_spread(xs: list[float], digits: int = 0) -> str:
    """`median (min–max)` over repetitions, or the one value."""
    if not xs:
        return "failed"
    if len(xs) == 1:
        return fmt_num(xs[0], digits)
    lo, mid, hi = (fmt_num(x, digits) for x in (min(xs), median(xs), max(xs)))
    return f"{mid} ({lo}–{hi})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
