"""Reads a Strata checkpoint (engine/src/checkpoint: `manifest.json` + safetensors files)
into full, layout-free tensors, for the PyTorch decode baseline.

A path may be a `step-NNNNNN/` directory or a checkpoint root (its `latest` file, else the
newest step directory). Each tensor is assembled from its pieces: a piece is a
hyper-rectangle (global offset and shape) stored row-major at a byte range of one file.
Invariant: only model tensors are read (optimizer state, `optim.*`, is skipped).
"""

from __future__ import annotations

import json
import os
import re

import torch

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def resolve(path: str) -> str:
    """The step directory that `path` names."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    steps = sorted(d for d in os.listdir(path) if re.fullmatch(r"step-\d+", d)) \
        if os.path.isdir(path) else []
    if not steps:
        raise SystemExit(f"{path}: no manifest.json, `latest` or step-* directory; fix: pass "
                         "a Strata checkpoint (e.g. runs/demo/checkpoints)")
    return os.path.join(path, steps[-1])


def load(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, model tensors by global name) of the checkpoint at `path`."""
    step_dir = resolve(path)
    with open(os.path.join(step_dir, "manifest.json")) as f:
        manifest = json.load(f)
    tensors = {}
    for name, entry in manifest["tensors"].items():
        if name.startswith("optim."):
            continue
        dtype = DTYPES[entry["dtype"]]
        full = torch.empty(entry["shape"], dtype=dtype)
        for piece in entry["pieces"]:
            begin, end = piece["bytes"]
            with open(os.path.join(step_dir, piece["file"]), "rb") as f:
                f.seek(begin)
                raw = bytearray(f.read(end - begin))
            value = torch.frombuffer(raw, dtype=dtype).reshape(piece["shape"])
            region = tuple(slice(o, o + s) for o, s in zip(piece["offset"], piece["shape"]))
            full[region] = value
        tensors[name] = full
    return manifest, tensors
