// Causal self-attention for fp32 CPU tensors, forward and backward, as a libtorch autograd
// function (what `scaled_dot_product_attention(q, k, v, is_causal=True)` computes, with its
// default scale 1/sqrt(head_dim)).
//
// Why: at the small head sizes of CPU training (seq 128, head_dim 32) libtorch's flash
// kernel for CPU spends about three times its forward in its backward, in many small
// GEMMs over 32-row query blocks and 128-column key blocks. This kernel keeps one head's
// whole score matrix (s x s floats) in a per-thread scratch buffer instead, so every
// product is one BLAS call per block of rows (forward, dQ) or columns (dK, dV) that skips
// the blocks above the diagonal, and the softmax and its gradient are single passes over
// the lower triangle.
//
// Invariants:
// * what is saved for the backward is what libtorch's flash kernel saves (q, k, v, the
//   output and one log-sum-exp per query row), so the memory model does not change;
// * each head is computed by one thread from its own rows, in a fixed order, so a head's
//   result does not depend on the thread count or on which other heads share its tensor
//   (tensor parallelism splits heads across ranks bit-identically);
// * masked scores are never formed: row g only ever touches columns 0..=g.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "shim_error.h"

extern "C" void sgemm_(const char *transa, const char *transb, const int *m, const int *n,
                       const int *k, const float *alpha, const float *a, const int *lda,
                       const float *b, const int *ldb, const float *beta, float *c,
                       const int *ldc);

namespace {

// Rows (and columns) per block: each product is one BLAS call per block.
constexpr int64_t kBlock = 32;

// Row-major C[m x n] = alpha * op(A)[m x k] * op(B)[k x n] + beta * C, through the
// column-major BLAS as C^T = op(B)^T op(A)^T.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
             int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  const char opb = tb ? 'T' : 'N';
  const char opa = ta ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ila = static_cast<int>(ldb), ilb = static_cast<int>(lda), ilc = static_cast<int>(ldc);
  sgemm_(&opb, &opa, &im, &in, &ik, &alpha, b, &ila, a, &ilb, &beta, c, &ilc);
}

// Sixteen floats: GCC's vector extension, lowered to whatever the clone targets.
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
constexpr int64_t kW = 16;

__attribute__((always_inline)) inline F16 splat(float x) { return F16{} + x; }

__attribute__((always_inline)) inline F16 load(const float *p) {
  F16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store(float *p, F16 v) {
  std::memcpy(p, &v, sizeof v);
}

// Lanes j.. of a row whose index is below n keep `v`; the others become `fill`.
__attribute__((always_inline)) inline F16 below(F16 v, int64_t j, int64_t n, float fill) {
  const F16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota + static_cast<float>(j) < static_cast<float>(n) ? v : splat(fill);
}

__attribute__((always_inline)) inline float lane_sum(F16 v) {
  float s = 0.0f;
  for (int i = 0; i < kW; ++i) {
    s += v[i];
  }
  return s;
}

// Cephes' expf (about one ulp), branch-free on sixteen lanes; inputs clamped to its range.
__attribute__((always_inline)) inline F16 vexp(F16 v) {
  v = v < splat(88.3762626647949f) ? v : splat(88.3762626647949f);
  v = v > splat(-87.3365478515625f) ? v : splat(-87.3365478515625f);
  const F16 t = v * 1.44269504088896341f + 0.5f;
  F16 fx = __builtin_convertvector(__builtin_convertvector(t, I16), F16);
  fx = fx > t ? fx - 1.0f : fx;
  v = v - fx * 0.693359375f;
  v = v + fx * 2.12194440e-4f;
  F16 y = splat(1.9875691500e-4f);
  y = y * v + 1.3981999507e-3f;
  y = y * v + 8.3334519073e-3f;
  y = y * v + 4.1665795894e-2f;
  y = y * v + 1.6666665459e-1f;
  y = y * v + 5.0000001201e-1f;
  y = y * v * v + v + 1.0f;
  const I16 e = (__builtin_convertvector(fx, I16) + 127) << 23;
  return y * reinterpret_cast<const F16 &>(e);
}

// exp(x[j] - shift) for j < n in place, and 0 from n up to the next multiple of 16 (the
// row must have room for it); returns the sum (lane sums in a fixed order). Two vectors
// per step keep two independent dependency chains in flight.
__attribute__((target_clones("avx512f", "avx2", "default"))) float
exp_shifted(float *x, int64_t n, float shift) {
  F16 acc = splat(0.0f), acc2 = splat(0.0f);
  int64_t j = 0;
  for (; j + kW < n; j += 2 * kW) {
    const F16 a = below(vexp(load(x + j) - shift), j, n, 0.0f);
    const F16 b = below(vexp(load(x + j + kW) - shift), j + kW, n, 0.0f);
    store(x + j, a);
    store(x + j + kW, b);
    acc += a;
    acc2 += b;
  }
  if (j < n) {
    const F16 a = below(vexp(load(x + j) - shift), j, n, 0.0f);
    store(x + j, a);
    acc += a;
  }
  return lane_sum(acc + acc2);
}

// The largest of x[0..n) (the row has room up to the next multiple of 16).
__attribute__((target_clones("avx512f", "avx2", "default"))) float row_max(const float *x,
                                                                           int64_t n) {
  F16 m = splat(-3.402823466e38f);
  for (int64_t j = 0; j < n; j += kW) {
    const F16 v = below(load(x + j), j, n, -3.402823466e38f);
    m = v > m ? v : m;
  }
  float r = m[0];
  for (int i = 1; i < kW; ++i) {
    r = std::max(r, m[i]);
  }
  return r;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void scale_row(float *x, int64_t n,
                                                                            float s) {
  for (int64_t j = 0; j < n; ++j) {
    x[j] *= s;
  }
}

// dS = P * (dP - d) * scale, in place over dP.
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_grad_row(
    const float *p, float *dp, int64_t n, float d, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    dp[j] = p[j] * (dp[j] - d) * scale;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default"))) float dot(const float *a,
                                                                       const float *b,
                                                                       int64_t n) {
  float s = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    s += a[j] * b[j];
  }
  return s;
}

// One head's matrices: `rows` x `hd` with row stride `ld`.
struct Mat {
  float *p;
  int64_t ld;
  float *row(int64_t i) const { return p + i * ld; }
};

// Shapes shared by every head of one call.
struct Dims {
  int64_t s;
  int64_t hd;
  float scale;
  int64_t ld; // the scratch rows' stride: s rounded up to 16
};

// Forward of one head: O = softmax(scale Q K^T, causal) V, lse[g] = log sum_j exp(...).
// The probabilities stay unnormalized through the product with V; each output row (hd
// values) is divided by its sum afterwards, which is cheaper than dividing a score row.
void head_forward(const Dims &d, Mat q, Mat k, Mat v, Mat o, float *lse, float *scores) {
  const int64_t s = d.s, ld = d.ld;
  float inv[kBlock];
  for (int64_t r0 = 0; r0 < s; r0 += kBlock) {
    const int64_t rows = std::min(kBlock, s - r0), n = r0 + rows;
    float *blk = scores + r0 * ld;
    gemm_rm(false, true, rows, n, d.hd, d.scale, q.row(r0), q.ld, k.p, k.ld, 0.0f, blk, ld);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t g = r0 + i, cnt = g + 1;
      float *row = blk + i * ld;
      const float m = row_max(row, cnt);
      const float sum = exp_shifted(row, cnt, m);
      inv[i] = 1.0f / sum;
      std::fill(row + cnt, row + n, 0.0f);
      lse[g] = m + std::log(sum);
    }
    gemm_rm(false, false, rows, d.hd, n, 1.0f, blk, ld, v.p, v.ld, 0.0f, o.row(r0), o.ld);
    for (int64_t i = 0; i < rows; ++i) {
      scale_row(o.row(r0 + i), d.hd, inv[i]);
    }
  }
}

// The matrices of one head's backward.
struct HeadGrad {
  Mat q, k, v, o, dout, dq, dk, dv;
  const float *lse;
};

// P (row blocks, recomputed from lse) and dS = P (dP - D) scale, then dQ = dS K.
void head_scores_grad(const Dims &d, const HeadGrad &h, float *p, float *ds) {
  const int64_t s = d.s, ld = d.ld;
  for (int64_t r0 = 0; r0 < s; r0 += kBlock) {
    const int64_t rows = std::min(kBlock, s - r0), n = r0 + rows;
    float *pb = p + r0 * ld, *db = ds + r0 * ld;
    gemm_rm(false, true, rows, n, d.hd, d.scale, h.q.row(r0), h.q.ld, h.k.p, h.k.ld, 0.0f, pb,
            ld);
    gemm_rm(false, true, rows, n, d.hd, 1.0f, h.dout.row(r0), h.dout.ld, h.v.p, h.v.ld, 0.0f,
            db, ld);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t g = r0 + i, cnt = g + 1;
      float *prow = pb + i * ld, *drow = db + i * ld;
      exp_shifted(prow, cnt, h.lse[g]);
      const float dg = dot(h.dout.row(g), h.o.row(g), d.hd);
      softmax_grad_row(prow, drow, cnt, dg, d.scale);
      std::fill(prow + cnt, prow + n, 0.0f);
      std::fill(drow + cnt, drow + n, 0.0f);
    }
    gemm_rm(false, false, rows, d.hd, n, 1.0f, db, ld, h.k.p, h.k.ld, 0.0f, h.dq.row(r0),
            h.dq.ld);
  }
}

// dV = P^T dO and dK = dS^T Q by column blocks: block c0 reads rows c0.. only.
void head_key_grads(const Dims &d, const HeadGrad &h, const float *p, const float *ds) {
  const int64_t s = d.s, ld = d.ld;
  for (int64_t c0 = 0; c0 < s; c0 += kBlock) {
    const int64_t cols = std::min(kBlock, s - c0), m = s - c0;
    const float *pb = p + c0 * ld + c0, *db = ds + c0 * ld + c0;
    gemm_rm(true, false, cols, d.hd, m, 1.0f, pb, ld, h.dout.row(c0), h.dout.ld, 0.0f,
            h.dv.row(c0), h.dv.ld);
    gemm_rm(true, false, cols, d.hd, m, 1.0f, db, ld, h.q.row(c0), h.q.ld, 0.0f, h.dk.row(c0),
            h.dk.ld);
  }
}

// A [b, h, s, hd] tensor's head `bh` as a matrix (last dim contiguous).
Mat head_of(const at::Tensor &t, int64_t bh) {
  const int64_t heads = t.size(1);
  const int64_t b = bh / heads, hh = bh % heads;
  float *base = t.data_ptr<float>() + b * t.stride(0) + hh * t.stride(1);
  return Mat{base, t.stride(2)};
}

at::Tensor unit_last(const at::Tensor &t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// A new [b, h, s, hd] tensor laid out as [b, s, h, hd], so that merging heads is free.
at::Tensor heads_last(const at::Tensor &like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options())
      .transpose(1, 2);
}

Dims dims_of(const at::Tensor &q) {
  const int64_t s = q.size(2);
  return Dims{s, q.size(3), 1.0f / std::sqrt(static_cast<float>(q.size(3))), (s + kW - 1) / kW * kW};
}

// q, k, v with a unit last stride (see `unit_last`).
std::vector<at::Tensor> attention_forward(const at::Tensor &q, const at::Tensor &k,
                                          const at::Tensor &v) {
  const Dims d = dims_of(q);
  at::Tensor o = heads_last(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), d.s}, q.options());
  const int64_t n = q.size(0) * q.size(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(d.s * d.ld));
    for (int64_t bh = begin; bh < end; ++bh) {
      head_forward(d, head_of(q, bh), head_of(k, bh), head_of(v, bh), head_of(o, bh),
                   lse.data_ptr<float>() + bh * d.s, scores.data());
    }
  });
  return {o, lse};
}

std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor k, at::Tensor v,
                                           at::Tensor o, at::Tensor lse, at::Tensor dout) {
  dout = unit_last(dout);
  const Dims d = dims_of(q);
  at::Tensor dq = heads_last(q), dk = heads_last(q), dv = heads_last(q);
  const int64_t n = q.size(0) * q.size(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(static_cast<size_t>(d.s * d.ld)), ds(p.size());
    for (int64_t bh = begin; bh < end; ++bh) {
      const HeadGrad h{head_of(q, bh),    head_of(k, bh),  head_of(v, bh),
                       head_of(o, bh),    head_of(dout, bh), head_of(dq, bh),
                       head_of(dk, bh),   head_of(dv, bh),   lse.data_ptr<float>() + bh * d.s};
      head_scores_grad(d, h, p.data(), ds.data());
      head_key_grads(d, h, p.data(), ds.data());
    }
  });
  return {dq, dk, dv};
}

struct CausalAttention : public torch::autograd::Function<CausalAttention> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &q,
                            const at::Tensor &k, const at::Tensor &v) {
    auto q1 = unit_last(q), k1 = unit_last(k), v1 = unit_last(v);
    auto out = attention_forward(q1, k1, v1);
    ctx->save_for_backward({q1, k1, v1, out[0], out[1]});
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return attention_backward(saved[0], saved[1], saved[2], saved[3], saved[4], grads[0]);
  }
};

} // namespace

// Causal attention of fp32 CPU tensors q, k, v of shape [b, h, s, hd] (any strides whose
// last is 1 are read in place; others are copied). Writes a new tensor [b, h, s, hd] (laid
// out as [b, s, h, hd]) to `out`, recorded for autograd when an input requires grad.
// Returns 0, or 1 with a message in `err` when the inputs are not fp32 CPU 4-d tensors of
// one shape or libtorch throws.
extern "C" int strata_causal_attention(void *q, void *k, void *v, void **out, char *err,
                                       size_t err_len) {
  return strata_shim::guarded(err, err_len, [&]() -> int {
    const at::Tensor &tq = *static_cast<at::Tensor *>(q);
    const at::Tensor &tk = *static_cast<at::Tensor *>(k);
    const at::Tensor &tv = *static_cast<at::Tensor *>(v);
    for (const at::Tensor *t : {&tq, &tk, &tv}) {
      if (t->dim() != 4 || t->scalar_type() != at::kFloat || !t->device().is_cpu() ||
          t->sizes() != tq.sizes()) {
        strata_shim::write_error(err, err_len, "causal attention wants fp32 CPU [b, h, s, hd] q, k, v of one shape");
        return 1;
      }
    }
    *out = new at::Tensor(CausalAttention::apply(tq, tk, tv));
    return 0;
  });
}
