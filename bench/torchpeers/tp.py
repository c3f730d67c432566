"""Megatron-style tensor parallelism written by hand, as a PyTorch user of gloo does it.

Per block: the fused q|k|v projection and `fc1` are column-parallel (rank r holds its heads'
q, k and v columns and its slice of the MLP), `proj` and `fc2` are row-parallel, and two
autograd functions join them: `copy_to` (identity forward, all-reduce of the gradient
backward) before a column-parallel layer, `reduce_from` (all-reduce forward, identity
backward) after a row-parallel one. Norms, row-parallel biases, the embedding and the head
(65 x 256: smaller than one all-reduce) are replicated; they receive identical gradients on
every rank, so no extra communication is needed.

Invariant: a `TpGpt` built from a full model computes the full model's function; the
slices are cut from the full model's initial weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .gpt import GptStage, activation


class _CopyToTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _param(t: torch.Tensor, sharded: bool) -> nn.Parameter:
    p = nn.Parameter(t.detach().clone().contiguous())
    p.tp_sharded = sharded
    return p


class TpBlock(nn.Module):
    def __init__(self, full, rank: int, tp: int, group, heads: int, act: str):
        super().__init__()
        d = full.ln1.normalized_shape[0]
        w, fl = d // tp, full.mlp.fc1.out_features // tp
        self.group, self.heads, self.act = group, heads // tp, activation(act)
        self.ln1, self.ln2 = full.ln1, full.ln2
        cols = torch.cat([torch.arange(j * d + rank * w, j * d + (rank + 1) * w) for j in range(3)])
        a, m = full.attn, full.mlp
        self.qkv_w = _param(a.qkv.weight[cols], True)
        self.qkv_b = _param(a.qkv.bias[cols], True)
        self.proj_w = _param(a.proj.weight[:, rank * w:(rank + 1) * w], True)
        self.proj_b = _param(a.proj.bias, False)
        self.fc1_w = _param(m.fc1.weight[rank * fl:(rank + 1) * fl], True)
        self.fc1_b = _param(m.fc1.bias[rank * fl:(rank + 1) * fl], True)
        self.fc2_w = _param(m.fc2.weight[:, rank * fl:(rank + 1) * fl], True)
        self.fc2_b = _param(m.fc2.bias, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = _CopyToTp.apply(self.ln1(x), self.group)
        qkv = F.linear(h, self.qkv_w, self.qkv_b)
        q, k, v = qkv.view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = F.linear(y.transpose(1, 2).reshape(b, s, -1), self.proj_w)
        x = x + _ReduceFromTp.apply(y, self.group) + self.proj_b
        h = _CopyToTp.apply(self.ln2(x), self.group)
        h = F.linear(self.act(F.linear(h, self.fc1_w, self.fc1_b)), self.fc2_w)
        return x + _ReduceFromTp.apply(h, self.group) + self.fc2_b


class TpGpt(nn.Module):
    """The tp-rank `rank` shard of a full (embed + all blocks + head) `GptStage`."""

    def __init__(self, full: GptStage, rank: int, tp: int, group=None):
        super().__init__()
        shape = full.shape
        self.embed, self.head = full.embed, full.head
        self.blocks = nn.ModuleList(
            TpBlock(b, rank, tp, group, shape.n_heads, shape.activation) for b in full.blocks)
        for p in list(self.embed.parameters()) + list(self.head.parameters()):
            p.tp_sharded = False
        for blk in self.blocks:
            for p in list(blk.ln1.parameters()) + list(blk.ln2.parameters()):
                p.tp_sharded = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
