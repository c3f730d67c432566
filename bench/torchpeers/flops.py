"""How every row of the benchmark counts model FLOPs, and the sgemm peak MFU divides by.

Training FLOPs per token, for Strata and PyTorch alike (PaLM, appendix B; the same terms as
Strata's partitioner cost model, partitioner/src/graph.rs):

    6 · N_matmul + 12 · L · s · d,   N_matmul = L · (4d² + 2·d·d_ff) + d·V

6 = 2 (multiply-add) × 3 (forward, input gradient, weight gradient) per matmul weight; the
attention term is QKᵀ and AV over the full s × s square (no causal discount), forward and
backward. Embedding lookups, norms, biases, GELU, softmax and the optimizer are not counted.
gpt-tiny: 41.0 MFLOP per token.

Decode is not charged FLOPs: it is bound by memory bandwidth and reported as tokens/s.
"""

from __future__ import annotations

from .config import Shape


def matmul_params(shape: Shape) -> int:
    d, f = shape.d_model, shape.d_ff
    return shape.n_layers * (4 * d * d + 2 * d * f) + d * shape.vocab


def per_token(shape: Shape) -> float:
    return 6.0 * matmul_params(shape) + 12.0 * shape.n_layers * shape.seq_len * shape.d_model
