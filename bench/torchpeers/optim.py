"""AdamW and gradient clipping as a PyTorch user sets them up for Strata's recipe.

AdamW (decoupled decay on matrices and embeddings, eps 1e-8) uses libtorch's fused CPU
kernel, the fastest PyTorch offers; clipping uses the foreach norm. Distributed clipping
sums each rank's share of the squared norm in one all-reduce: a rank counts the parameters
it owns (its pipeline stages; its tp shards, plus the replicated ones on tp rank 0 only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import Train
from .gpt import decay_groups


def adamw(params, train: Train) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(params, train.weight_decay), lr=train.lr,
                             betas=(train.beta1, train.beta2), eps=1e-8, fused=True)


def set_lr(optim: torch.optim.Optimizer, lr: float) -> None:
    for group in optim.param_groups:
        group["lr"] = lr


def clip_local(params, max_norm: float | None) -> float | None:
    """Whole-model clipping on one process (or DDP, where every replica holds the same
    gradients); returns the pre-clip norm."""
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True).item()


def clip_distributed(counted, all_params, max_norm: float | None, group=None) -> float | None:
    """Clips `all_params` by the global norm of the gradients that the ranks count
    (`counted`, disjoint across ranks and together the whole model)."""
    if max_norm is None:
        return None
    grads = [p.grad for p in counted if p.grad is not None]
    sq = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).square() if grads \
        else torch.zeros(())
    sq = sq.reshape(1).clone()
    dist.all_reduce(sq, group=group)
    norm = sq.sqrt()[0]
    torch.nn.utils.clip_grads_with_norm_(all_params, max_norm, norm, foreach=True)
    return norm.item()
