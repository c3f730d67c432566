"""The training peers, one class per layout. Each `step(x, y, lr)` runs one optimizer step
on this rank's part of the global batch (`x`, `y`: the whole step's `[B, s]` tokens) and
returns this rank's mean loss over the rows it scored (None where it scores none).

* `Single`: one process; the batch in `microbatches` chunks (1 = whole batch).
* `Ddp`: `DistributedDataParallel` over gloo; replica r takes rows r·B/dp ..; gradient
  accumulation under `no_sync` when it uses more than one microbatch.
* `Pipeline`: `torch.distributed.pipelining` with the config's schedule (`ScheduleGPipe`,
  `Schedule1F1B`, or `ScheduleInterleaved1F1B` for v > 1); chunk c of pp·v holds an even
  share of the blocks (the embedding in chunk 0, the head in the last) and lives on rank
  c % pp.
* `Tensor`: the hand-written Megatron layers of `tp`, whole batch.

With `compiled`, the model (DDP: the wrapped model; pipeline: each stage module) goes
through `torch.compile` (inductor); the default is eager, as in issue 12's table.

Invariant: every peer's step-1 loss is the full model's mean cross-entropy over the same
B rows (equal-size microbatches average to the batch mean).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import optim
from .config import Parallel, Shape, Train
from .gpt import GptStage, full_model, init_from_strata
from .tp import TpGpt


def maybe_compile(module: torch.nn.Module, on: bool) -> torch.nn.Module:
    return torch.compile(module) if on else module


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Single:
    def __init__(self, shape: Shape, train: Train, microbatches: int, compiled: bool = False):
        self.model = init_from_strata(full_model(shape), train.seed)
        self.params = list(self.model.parameters())
        self.model = maybe_compile(self.model, compiled)
        self.opt, self.train, self.m = optim.adamw(self.params, train), train, microbatches

    def step(self, x, y, lr):
        optim.set_lr(self.opt, lr)
        total = 0.0
        for xm, ym in zip(x.chunk(self.m), y.chunk(self.m)):
            loss = cross_entropy(self.model(xm), ym) / self.m
            loss.backward()
            total += loss.item()
        optim.clip_local(self.params, self.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


class Ddp(Single):
    def __init__(self, shape: Shape, train: Train, microbatches: int, compiled: bool = False):
        super().__init__(shape, train, microbatches)
        self.model = maybe_compile(torch.nn.parallel.DistributedDataParallel(
            self.model, gradient_as_bucket_view=True, broadcast_buffers=False), compiled)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def step(self, x, y, lr):
        optim.set_lr(self.opt, lr)
        x, y = x.chunk(self.world)[self.rank], y.chunk(self.world)[self.rank]
        total = 0.0
        chunks = list(zip(x.chunk(self.m), y.chunk(self.m)))
        for i, (xm, ym) in enumerate(chunks):
            last = i == len(chunks) - 1
            ctx = contextlib.nullcontext() if last else self.model.no_sync()
            with ctx:
                loss = cross_entropy(self.model(xm), ym) / self.m
                loss.backward()
            total += loss.item()
        optim.clip_local(self.params, self.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def block_split(n_blocks: int, n_chunks: int) -> list[tuple[int, int]]:
    """(first block, count) per chunk: an even split, the remainder on the earliest chunks."""
    base, extra = divmod(n_blocks, n_chunks)
    out, first = [], 0
    for c in range(n_chunks):
        n = base + (1 if c < extra else 0)
        out.append((first, n))
        first += n
    return out


def _schedule_class(schedule: str, v: int):
    """torch.distributed.pipelining's schedule for Strata's `parallel.schedule`."""
    from torch.distributed import pipelining as tpp
    classes = {("gpipe", 1): tpp.ScheduleGPipe, ("1f1b", 1): tpp.Schedule1F1B,
               ("interleaved-1f1b", 2): tpp.ScheduleInterleaved1F1B,
               ("interleaved-1f1b", 3): tpp.ScheduleInterleaved1F1B,
               ("interleaved-1f1b", 4): tpp.ScheduleInterleaved1F1B}
    if (schedule, v) not in classes:
        raise SystemExit(f"torch peers: parallel.schedule `{schedule}` with virtual_stages {v} "
                         "has no peer; fix: gpipe or 1f1b (v = 1), or interleaved-1f1b (v > 1)")
    return classes[(schedule, v)]


class Pipeline:
    def __init__(self, shape: Shape, train: Train, par: Parallel, microbatches: int,
                 compiled: bool = False):
        from torch.distributed.pipelining import PipelineStage
        pp, v = par.pp, par.virtual_stages
        schedule_class = _schedule_class(par.schedule, v)
        self.rank, n_chunks = dist.get_rank(), pp * v
        split = block_split(shape.n_layers, n_chunks)
        self.modules, stages = [], []
        for c in range(self.rank, n_chunks, pp):
            first, n = split[c]
            mod = init_from_strata(
                GptStage(shape, first, n, embed=c == 0, head=c == n_chunks - 1), train.seed)
            self.modules.append(mod)
            stages.append(PipelineStage(maybe_compile(mod, compiled), c, n_chunks,
                                        torch.device("cpu")))
        self.first, self.last = self.rank == 0, self.rank == (n_chunks - 1) % pp
        self.schedule = schedule_class(stages[0] if v == 1 else stages, microbatches,
                                       loss_fn=cross_entropy)
        self.params = [p for m in self.modules for p in m.parameters()]
        self.opt, self.train = optim.adamw(self.params, train), train

    def step(self, x, y, lr):
        optim.set_lr(self.opt, lr)
        losses: list[torch.Tensor] = []
        kwargs = {"target": y, "losses": losses} if self.last else {}
        self.schedule.step(*((x,) if self.first else ()), **kwargs)
        optim.clip_distributed(self.params, self.params, self.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item() if self.last else None


class Tensor:
    def __init__(self, shape: Shape, train: Train, microbatches: int, compiled: bool = False):
        self.rank, tp = dist.get_rank(), dist.get_world_size()
        self.model = TpGpt(init_from_strata(full_model(shape), train.seed), self.rank, tp)
        self.params = list(self.model.parameters())
        self.model = maybe_compile(self.model, compiled)
        self.counted = [p for p in self.params if p.tp_sharded or self.rank == 0]
        self.opt, self.train, self.m = optim.adamw(self.params, train), train, microbatches

    def step(self, x, y, lr):
        optim.set_lr(self.opt, lr)
        total = 0.0
        for xm, ym in zip(x.chunk(self.m), y.chunk(self.m)):
            loss = cross_entropy(self.model(xm), ym) / self.m
            loss.backward()
            total += loss.item()
        optim.clip_distributed(self.counted, self.params, self.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def make(shape: Shape, train: Train, par: Parallel, microbatches: int, compiled: bool = False):
    """The peer for the config's layout (one of pp, tp, dp above 1, or none)."""
    if sum(n > 1 for n in (par.pp, par.tp, par.dp)) > 1:
        raise SystemExit("torch peers: one parallel dimension at a time (pp, tp or dp)")
    if par.pp > 1:
        return Pipeline(shape, train, par, microbatches, compiled)
    if par.tp > 1:
        return Tensor(shape, train, microbatches, compiled)
    if par.dp > 1:
        return Ddp(shape, train, microbatches, compiled)
    return Single(shape, train, microbatches, compiled)
