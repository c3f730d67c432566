"""The GPT of Strata's engine (engine/src/model/, arch gpt) as a PyTorch user writes it.

Pre-LayerNorm blocks (eps `model.norm_eps`, 1e-5 by default): causal multi-head attention
through `F.scaled_dot_product_attention` on a fused q|k|v projection, GELU MLP (the config's
`activation`), residuals; learned positions; untied LM head without bias. `GptStage` holds
a contiguous run of the layers (`embed`, `block.i`, `head`), so one class serves a whole
model and a pipeline stage.

Invariant: `init_from_strata` gives every parameter Strata's initial value (Strata stores
linear weights `[in, out]`; `nn.Linear` holds the transpose), so a stage is the same
function as Strata's stage with the same layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Shape
from .rng import init_normal

INIT_STD = 0.02


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"model.activation `{name}`: expected gelu or gelu_tanh")


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, d: int, f: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        d = shape.d_model
        self.ln1 = nn.LayerNorm(d, eps=shape.norm_eps)
        self.attn = Attention(d, shape.n_heads)
        self.ln2 = nn.LayerNorm(d, eps=shape.norm_eps)
        self.mlp = Mlp(d, shape.d_ff, shape.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.d_model)
        self.wpe = nn.Parameter(torch.empty(shape.seq_len, shape.d_model))

    def forward(self, tokens: torch.Tensor, pos: int = 0) -> torch.Tensor:
        return self.wte(tokens) + self.wpe[pos:pos + tokens.shape[1]]


class Head(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.ln_f = nn.LayerNorm(shape.d_model, eps=shape.norm_eps)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GptStage(nn.Module):
    """Layers `first_block..first_block + n_blocks`, with the embedding and/or the head.
    Input: tokens `[b, s]` (with the embedding) or hidden `[b, s, d]`; output: logits
    `[b, s, V]` (with the head) or hidden."""

    def __init__(self, shape: Shape, first_block: int, n_blocks: int, embed: bool, head: bool):
        super().__init__()
        self.shape, self.first_block = shape, first_block
        self.embed = Embed(shape) if embed else None
        self.blocks = nn.ModuleList(Block(shape) for _ in range(n_blocks))
        self.head = Head(shape) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) if self.head is not None else x


def full_model(shape: Shape) -> GptStage:
    return GptStage(shape, 0, shape.n_layers, embed=True, head=True)


def strata_name(stage: GptStage, name: str) -> tuple[str, str]:
    """Maps a parameter name of `stage` to Strata's (layer, parameter) names."""
    parts = name.split(".")
    if parts[0] == "blocks":
        layer = f"block.{stage.first_block + int(parts[1])}"
        return layer, ".".join(parts[2:])
    if parts[0] == "embed":
        return "embed", parts[1]  # wte.weight -> wte, wpe -> wpe
    return "head", ".".join(parts[1:])


def strata_value(shape: Shape, seed: int, layer: str, pname: str) -> torch.Tensor:
    """Strata's initial value of `layer.pname`, in Strata's own layout ([in, out])."""
    d, f, V, s = shape.d_model, shape.d_ff, shape.vocab, shape.seq_len
    resid = INIT_STD / math.sqrt(2 * shape.n_layers)
    linears = {"attn.qkv": (d, 3 * d, INIT_STD), "attn.proj": (d, d, resid),
               "mlp.fc1": (d, f, INIT_STD), "mlp.fc2": (f, d, resid),
               "lm_head": (d, V, INIT_STD)}
    base, _, kind = pname.rpartition(".")
    if pname in ("wte", "wpe"):
        return init_normal(seed, layer, pname, [V if pname == "wte" else s, d], INIT_STD)
    if base in linears and kind == "weight":
        d_in, d_out, std = linears[base]
        return init_normal(seed, layer, pname, [d_in, d_out], std)
    if base in linears and kind == "bias":
        return torch.zeros(linears[base][1])
    if base in ("ln1", "ln2", "ln_f"):
        return torch.ones(d) if kind == "weight" else torch.zeros(d)
    raise KeyError(f"no Strata initialiser for {layer}.{pname}")


@torch.no_grad()
def _assign(stage: GptStage, value_of) -> GptStage:
    """Sets every parameter from `value_of(layer, pname)`, a tensor in Strata's layout."""
    for name, p in stage.named_parameters():
        layer, pname = strata_name(stage, name)
        value = value_of(layer, pname)
        is_linear = value.dim() == 2 and pname not in ("wte", "wpe")
        p.copy_(value.T if is_linear else value)
    return stage


def init_from_strata(stage: GptStage, seed: int) -> GptStage:
    """Strata's initial weights for `seed`."""
    return _assign(stage, lambda layer, pname: strata_value(stage.shape, seed, layer, pname))


def load_from_checkpoint(stage: GptStage, tensors: dict[str, torch.Tensor]) -> GptStage:
    """The weights of a Strata checkpoint (`checkpoint.load`), by global name."""
    def value_of(layer, pname):
        key = f"{layer}.{pname}"
        if key not in tensors:
            raise SystemExit(f"checkpoint: no tensor `{key}`; fix: a GPT checkpoint with an "
                             "untied head")
        return tensors[key].float()
    return _assign(stage, value_of)


def decay_groups(params, weight_decay: float) -> list[dict]:
    """Strata's rule: decay matrices and embeddings (dim >= 2), not biases or norms."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
