"""Strata's character-level dataset and batch sampling (engine/src/data.rs).

The vocabulary is the file's sorted distinct characters; the first 90% of the tokens train,
the rest validate. Row `r` of step `t` starts at `Rng([seed, split, t, r]).below(span)`, so
every layout and every peer sees the same rows without exchanging them.
"""

from __future__ import annotations

import torch

from .rng import Rng

TRAIN, VAL = 0, 1


class Dataset:
    def __init__(self, path: str, seed: int):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        tokens = torch.tensor([index[c] for c in text], dtype=torch.int64)
        cut = len(tokens) * 9 // 10
        self.splits = {TRAIN: tokens[:cut], VAL: tokens[cut:]}
        self.seed = seed

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, split: int, step: int, first_row: int, rows: int, seq_len: int):
        """Inputs and targets `[rows, seq_len]` for global rows `first_row..+rows` of `step`."""
        data = self.splits[split]
        span = max(len(data) - (seq_len + 1), 1)
        starts = [Rng([self.seed, split, step, r]).below(span)
                  for r in range(first_row, first_row + rows)]
        x = torch.stack([data[s:s + seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + seq_len + 1] for s in starts])
        return x, y

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text], dtype=torch.int64)
