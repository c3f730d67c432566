//! Criterion bench of causal attention's forward and backward at gpt-tiny's shape (8
//! sequences of 128 tokens, 8 heads of 32, one thread): libtorch's SDPA (its CPU flash
//! kernel) against Strata's kernel (`engine::model::causal_kernel`), side by side in one
//! group, inputs as the model passes them (head views of a fused projection).
//!
//! `cargo bench -p engine --bench attention`

use criterion::{criterion_group, criterion_main, Criterion};
use engine::model::causal_kernel;
use tch::{Device, Kind, Tensor};

const B: i64 = 8;
const H: i64 = 8;
const S: i64 = 128;
const HD: i64 = 32;

fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, true, None, false)
}

fn strata(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    causal_kernel::causal_attention(q, k, v).expect("fp32 CPU inputs")
}

/// One forward and backward of `f` on head views of `x` `[B, S, 3·H·HD]`.
fn step(x: &Tensor, grad: &Tensor, f: fn(&Tensor, &Tensor, &Tensor) -> Tensor) {
    let parts = x.split(H * HD, -1);
    let heads = |t: &Tensor| t.view([B, S, H, HD]).transpose(1, 2);
    let out = f(&heads(&parts[0]), &heads(&parts[1]), &heads(&parts[2]));
    let merged = out.transpose(1, 2).contiguous().view([B, S, H * HD]);
    (merged * grad).sum(Kind::Float).backward();
}

fn attention(c: &mut Criterion) {
    tch::set_num_threads(1);
    let opts = (Kind::Float, Device::Cpu);
    let x = (Tensor::arange(B * S * 3 * H * HD, opts) * 0.37)
        .sin()
        .view([B, S, 3 * H * HD])
        .set_requires_grad(true);
    let grad = (Tensor::arange(B * S * H * HD, opts) * 0.11)
        .cos()
        .view([B, S, H * HD]);
    let mut group = c.benchmark_group("causal_attention_b8_h8_s128_hd32");
    for (name, f) in [("sdpa", sdpa as fn(&_, &_, &_) -> _), ("strata", strata)] {
        group.bench_function(format!("{name}_forward_backward"), |b| {
            b.iter(|| step(&x, &grad, f))
        });
        group.bench_function(format!("{name}_forward"), |b| {
            b.iter(|| {
                let _guard = tch::no_grad_guard();
                let parts = x.split(H * HD, -1);
                let heads = |t: &Tensor| t.view([B, S, H, HD]).transpose(1, 2);
                f(&heads(&parts[0]), &heads(&parts[1]), &heads(&parts[2]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, attention);
criterion_main!(benches);
