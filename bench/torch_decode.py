#!/usr/bin/env python3
"""PyTorch decode baseline for issue 10: eager KV-cache greedy decoding of the GPT of a
Strata config, fp32 or int8 (`quantize_dynamic`), at a given batch of prompts.

    python bench/torch_decode.py --config configs/demo.yaml --batch 1 --precision fp32
    python bench/torch_decode.py --config bench/configs/gpt-100m.yaml --batch 32 --precision int8
    python bench/torch_decode.py --checkpoint runs/demo/checkpoints --batch 1 --verify

With --config the weights are Strata's initial weights for the config's seed (speed does
not depend on their values); with --checkpoint, a trained Strata checkpoint's. Prompts are
`--prompt-len` characters of validation lines (torchpeers/prompts.py), the same that
bench/compare.py gives `strata generate`. Prints one JSON object (see torchpeers/decode.py
for the timing definitions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchpeers import checkpoint, config, data, decode, gpt, prompts  # noqa: E402


def build(args):
    """(config, dataset, fp32 model) from --config (initial weights) or --checkpoint."""
    if args.config:
        cfg = config.load(args.config)
        ds = data.Dataset(cfg.train.data, cfg.train.seed)
        model = gpt.full_model(config.shape_of(cfg, ds.vocab))
        return cfg, ds, gpt.init_from_strata(model, cfg.train.seed).eval()
    manifest, tensors = checkpoint.load(args.checkpoint)
    cfg = config.loads(manifest["config"], os.path.join(args.checkpoint, "manifest.json"))
    ds = data.Dataset(cfg.train.data, cfg.train.seed)
    if manifest.get("vocab") not in (None, ds.chars):
        raise SystemExit(f"{args.checkpoint}: its vocabulary differs from {cfg.train.data}'s")
    model = gpt.full_model(config.shape_of(cfg, ds.vocab))
    return cfg, ds, gpt.load_from_checkpoint(model, tensors).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="Strata experiment YAML: its model, Strata's initial weights")
    src.add_argument("--checkpoint", help="Strata checkpoint (step-N directory or root): its "
                                          "model, config and trained weights")
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--runs", type=int, default=1, help="timed generations (after a warm-up)")
    ap.add_argument("--verify", action="store_true",
                    help="fp32: check that the cached tokens equal a full recompute's (int8: "
                         "report the share that agree; dynamic activation scales depend on "
                         "the rows quantised together, so they may differ)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, ds, model = build(args)
    model_params = sum(p.numel() for p in model.parameters())
    if args.precision == "int8":
        model = decode.quantize_int8(model)
    texts = prompts.prompts(cfg.train.data, args.batch, args.prompt_len)
    prompt_ids = torch.stack([ds.encode(t) for t in texts])
    decode.greedy(model, prompt_ids, min(4, args.new_tokens))  # warm-up
    runs = [decode.greedy(model, prompt_ids, args.new_tokens) for _ in range(args.runs)]
    best = max(runs, key=lambda r: r["decode_tok_s"])
    agree = None
    if args.verify:
        reference = decode.greedy_recompute(model, prompt_ids, args.new_tokens)
        agree = (reference == best["tokens"]).double().mean().item()
        if args.precision == "fp32" and agree < 1.0:
            raise SystemExit("torch_decode: KV-cache tokens differ from a full recompute")
    text = texts[0] + "".join(ds.chars[int(t)] for t in best["tokens"][0])
    print(json.dumps({
        "source": os.path.abspath(args.config or args.checkpoint), "torch": torch.__version__,
        "params": model_params, "batch": args.batch, "precision": args.precision,
        "threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prefill_tok_s": best["prefill_tok_s"], "decode_tok_s": best["decode_tok_s"],
        "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"], "sample": text,
        "runs_decode_tok_s": [r["decode_tok_s"] for r in runs], "recompute_agreement": agree}))


if __name__ == "__main__":
    main()
