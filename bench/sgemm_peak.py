#!/usr/bin/env python3
"""Measured fp32 sgemm peak: `procs` processes of `threads` intra-op threads each run
`torch.mm` on n x n matrices at the same time (a barrier starts every round together).
A round's rate is the sum over processes of 2n³·k / seconds; the peak is the best round.

    python bench/sgemm_peak.py --threads 1 --procs 2      # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def worker(rank, args, barrier, queue):
    import torch
    torch.set_num_threads(args.threads)
    a, b = torch.randn(args.n, args.n), torch.randn(args.n, args.n)
    c = torch.empty(args.n, args.n)
    for _ in range(2):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(args.rounds):
        barrier.wait()
        t0 = time.perf_counter()
        for _ in range(args.mms):
            torch.mm(a, b, out=c)
        rates.append(2.0 * args.n ** 3 * args.mms / (time.perf_counter() - t0))
    queue.put((rank, rates))


def main():
    ap = argparse.ArgumentParser(description="fp32 sgemm peak with torch.mm")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--procs", type=int, default=1, help="processes running at once")
    ap.add_argument("--n", type=int, default=2048, help="matrix size")
    ap.add_argument("--mms", type=int, default=8, help="matmuls per round")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (the best is kept)")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, barrier, queue))
             for r in range(args.procs)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    totals = [sum(results[r][i] for r in results) for i in range(args.rounds)]
    best = max(range(args.rounds), key=lambda i: totals[i])
    print(json.dumps({"threads": args.threads, "procs": args.procs, "n": args.n,
                      "gflops": totals[best] / 1e9,
                      "per_proc_gflops": [results[r][best] / 1e9 for r in sorted(results)],
                      "rounds_gflops": [t / 1e9 for t in totals]}))


if __name__ == "__main__":
    main()
