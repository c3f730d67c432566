"""Eager PyTorch greedy decoding with a KV cache, fp32 or int8, as a PyTorch user writes it.

The cache is preallocated per layer (`[b, heads, prompt + new, head_dim]` for k and v);
prefill runs the prompts through the model once (causal SDPA) and fills it; every decode
step embeds one token per sequence at position `pos`, writes its k and v at `pos` and
attends over `cache[:, :, :pos + 1]` (no mask needed). The head scores only the last
position. int8 is `torch.ao.quantization.quantize_dynamic` on every `nn.Linear`
(per-output-channel weight scales, activations quantised on the fly).

Timing: `prefill_s` covers the prompt pass and the first new token; each of the remaining
`new - 1` decode steps is timed on its own. Prefill tokens/s = batch · prompt_len /
prefill_s; decode tokens/s = batch · (new - 1) / sum(step times); time per token = one
decode step (one token for every sequence of the batch), p50 and p99 over the steps.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import Block, GptStage


def quantize_int8(model: GptStage) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                dtype=torch.qint8)


def _block(blk: Block, x: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: int):
    b, t, d = x.shape
    heads = blk.attn.heads
    q, k, v = blk.attn.qkv(blk.ln1(x)).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    kc[:, :, pos:pos + t] = k
    vc[:, :, pos:pos + t] = v
    y = F.scaled_dot_product_attention(q, kc[:, :, :pos + t], vc[:, :, :pos + t],
                                       is_causal=t > 1)
    x = x + blk.attn.proj(y.transpose(1, 2).reshape(b, t, d))
    return x + blk.mlp(blk.ln2(x))


def _forward(model: GptStage, tokens: torch.Tensor, caches, pos: int) -> torch.Tensor:
    x = model.embed(tokens, pos)
    for blk, (kc, vc) in zip(model.blocks, caches):
        x = _block(blk, x, kc, vc, pos)
    return model.head(x[:, -1])


def new_caches(model: GptStage, batch: int, length: int):
    s = model.shape
    dims = (batch, s.n_heads, length, s.d_model // s.n_heads)
    return [(torch.empty(dims), torch.empty(dims)) for _ in model.blocks]


@torch.inference_mode()
def greedy(model: GptStage, prompts: torch.Tensor, new: int) -> dict:
    """Greedy continuation of `prompts` `[b, p]` by `new` tokens, timed (see the module)."""
    b, p = prompts.shape
    if p + new > model.shape.seq_len:
        raise ValueError(f"prompt {p} + new {new} tokens exceed seq_len {model.shape.seq_len}")
    caches = new_caches(model, b, p + new)
    t0 = time.perf_counter()
    token = _forward(model, prompts, caches, 0).argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - t0
    out, steps = [token], []
    for pos in range(p, p + new - 1):
        t0 = time.perf_counter()
        token = _forward(model, token, caches, pos).argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - t0)
        out.append(token)
    steps_sorted = sorted(steps) or [float("nan")]

    def pct(q):
        return steps_sorted[min(len(steps_sorted) - 1, int(q * len(steps_sorted)))]

    return {"tokens": torch.cat(out, 1), "prefill_s": prefill_s, "step_s": steps,
            "prefill_tok_s": b * p / prefill_s,
            "decode_tok_s": b * len(steps) / sum(steps) if steps else float("nan"),
            "p50_ms": pct(0.50) * 1e3, "p99_ms": pct(0.99) * 1e3}


@torch.inference_mode()
def greedy_recompute(model: GptStage, prompts: torch.Tensor, new: int) -> torch.Tensor:
    """The same greedy continuation without a cache (the whole sequence every step): the
    reference that `greedy` must reproduce."""
    seq = prompts
    for _ in range(new):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[:, prompts.shape[1]:]
