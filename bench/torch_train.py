#!/usr/bin/env python3
"""PyTorch training peer of one Strata config: the same GPT, initial weights, batches and
optimiser, on the layout of the config's `parallel` section.

    python bench/torch_train.py --config bench/configs/single-1t.yaml --out peer.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        bench/torch_train.py --config bench/configs/pp2-1f1b.yaml --out peer.json

Each rank runs `train.threads` intra-op threads. A step is timed on each rank from the
start of its forward to the end of its optimizer step (batches are sampled beforehand);
the step's time is the slowest rank's, as in Strata's `metrics.jsonl`. Rank 0 writes a
JSON object: per-step `loss` and `step_s`, `tokens_per_step`, layout and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchpeers import config, data, flops, peers  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="Strata experiment YAML")
    ap.add_argument("--out", help="JSON results (rank 0); default: print to stdout")
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--micro-batch-size", type=int,
                    help="sequences per forward on each rank (default: the config's)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (default: eager); compilation happens in "
                         "the first steps, which the driver's --warmup discards")
    return ap.parse_args()


def main():
    args = parse_args()
    cfg = config.load(args.config)
    par, train = cfg.parallel, cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != par.world:
        raise SystemExit(f"{args.config}: pp·tp·dp = {par.world} but {world} processes were "
                         f"started; fix: torchrun --nproc-per-node {par.world}")
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(train.threads)
    steps = args.steps or train.steps
    ds = data.Dataset(train.data, train.seed)
    shape = config.shape_of(cfg, ds.vocab)
    per_rank = par.global_batch // par.dp
    mbs = args.micro_batch_size or par.micro_batch_size
    if per_rank % mbs:
        raise SystemExit(f"--micro-batch-size {mbs} does not divide {per_rank} sequences per rank")
    peer = peers.make(shape, train, par, per_rank // mbs, args.compile)
    batches = [ds.batch(data.TRAIN, t, 0, par.global_batch, shape.seq_len)
               for t in range(1, steps + 1)]
    if world > 1:
        dist.barrier()
    losses, times = [], []
    for t, (x, y) in enumerate(batches, 1):
        t0 = time.perf_counter()
        loss = peer.step(x, y, train.lr_at(t))
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ranks = [(losses, times, rss)]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, (losses, times, rss))
    if rank == 0:
        report(args, cfg, shape, per_rank // mbs, mbs, ranks)
    if world > 1:
        dist.destroy_process_group()


def report(args, cfg, shape, microbatches, mbs, ranks):
    par = cfg.parallel
    step_s = [max(r[1][i] for r in ranks) for i in range(len(ranks[0][1]))]
    loss = []
    for i in range(len(step_s)):
        scored = [r[0][i] for r in ranks if r[0][i] is not None]
        loss.append(sum(scored) / len(scored))  # dp: the replicas' mean; tp: all equal
    out = {
        "config": os.path.abspath(cfg.path), "torch": torch.__version__,
        "layout": {"pp": par.pp, "tp": par.tp, "dp": par.dp, "v": par.virtual_stages},
        "threads_per_rank": cfg.train.threads, "microbatches_per_rank": microbatches,
        "micro_batch_size": mbs, "compiled": args.compile,
        "tokens_per_step": par.global_batch * shape.seq_len,
        "params": shape.params, "flops_per_token": flops.per_token(shape),
        "loss": loss, "step_s": step_s, "peak_rss_mib": [r[2] for r in ranks],
    }
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
