"""Strata's deterministic random streams (engine/src/rng.rs), ported to Python and torch.

A stream is SplitMix64 seeded by a hash of a key (seed, layer, parameter, step, row); its
i-th output is `mix(s0 + i·γ)`, so a whole stream is computed at once on int64 tensors.
Invariants: `Rng` (scalar, exact integers) and `normals` (vectorised) give Strata's values;
int64 tensor arithmetic wraps modulo 2^64 like Rust's `wrapping_*`, and logical right shifts
are arithmetic shifts masked to the low `64 - k` bits.
"""

from __future__ import annotations

import math

import torch

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
C1 = 0xBF58476D1CE4E5B9
C2 = 0x94D049BB133111EB
KEY_START = 0x5354_5241_5441


def mix(z: int) -> int:
    """SplitMix64 finaliser on Python ints."""
    z = (z + GAMMA) & MASK
    z = ((z ^ (z >> 30)) * C1) & MASK
    z = ((z ^ (z >> 27)) * C2) & MASK
    return z ^ (z >> 31)


def hash_str(s: str) -> int:
    """FNV-1a of the UTF-8 bytes."""
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def key_state(key: list[int]) -> int:
    h = KEY_START
    for k in key:
        h = mix(h ^ mix(k & MASK))
    return h


class Rng:
    """Scalar stream, for the few draws batch sampling needs."""

    def __init__(self, key: list[int]):
        self.state = key_state(key)

    def next_u64(self) -> int:
        self.state = (self.state + GAMMA) & MASK
        return mix((self.state - GAMMA) & MASK)

    def below(self, n: int) -> int:
        return (self.next_u64() * n) >> 64


def _signed(x: int) -> int:
    x &= MASK
    return x - (1 << 64) if x >> 63 else x


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix_t(z: torch.Tensor) -> torch.Tensor:
    z = z + _signed(GAMMA)
    z = (z ^ _lsr(z, 30)) * _signed(C1)
    z = (z ^ _lsr(z, 27)) * _signed(C2)
    return z ^ _lsr(z, 31)


def stream_u64(key: list[int], n: int) -> torch.Tensor:
    """The first `n` outputs of the stream keyed by `key`, as int64 bit patterns."""
    idx = torch.arange(n, dtype=torch.int64)
    return _mix_t(idx * _signed(GAMMA) + _signed(key_state(key)))


def normals(key: list[int], n: int) -> torch.Tensor:
    """`n` standard normals (float64) exactly as `Rng::normal` draws them: Box-Muller on
    consecutive pairs (u1 = 1 - uniform, u2 = uniform)."""
    u = _lsr(stream_u64(key, 2 * n), 11).to(torch.float64) * (1.0 / (1 << 53))
    u1, u2 = 1.0 - u[0::2], u[1::2]
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def init_normal(seed: int, layer: str, name: str, shape: list[int], std: float) -> torch.Tensor:
    """`engine::model::init_param(seed, layer, name, shape, Normal(std))` as float32."""
    n = math.prod(shape)
    values = normals([seed, hash_str(layer), hash_str(name)], n) * std
    return values.to(torch.float32).reshape(shape)
