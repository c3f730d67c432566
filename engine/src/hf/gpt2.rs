//! GPT-2 (`GPT2LMHeadModel`) ↔ Strata GPT names.
//!
//! GPT-2 stores its projections as Conv1D, `[in, out]` like Strata, so no weight is
//! transposed except the LM head (`lm_head.weight` is an nn.Linear `[V, d]`; Strata's
//! `head.lm_head.weight` is `[d, V]`). `c_attn` is the fused q|k|v projection in that order,
//! exactly Strata's `attn.qkv`. A tied model has no `lm_head.weight` in its file.
//!
//! | Strata | GPT-2 |
//! |---|---|
//! | `embed.wte` `[V, d]` | `transformer.wte.weight` |
//! | `embed.wpe` `[seq_len, d]` | `transformer.wpe.weight` `[n_positions, d]` (first rows) |
//! | `block.i.ln1.{weight,bias}` | `transformer.h.i.ln_1.*` |
//! | `block.i.attn.qkv.{weight,bias}` | `transformer.h.i.attn.c_attn.*` |
//! | `block.i.attn.proj.{weight,bias}` | `transformer.h.i.attn.c_proj.*` |
//! | `block.i.ln2.{weight,bias}` | `transformer.h.i.ln_2.*` |
//! | `block.i.mlp.fc1.{weight,bias}` | `transformer.h.i.mlp.c_fc.*` |
//! | `block.i.mlp.fc2.{weight,bias}` | `transformer.h.i.mlp.c_proj.*` |
//! | `head.ln_f.{weight,bias}` | `transformer.ln_f.*` |
//! | `head.lm_head.weight` `[d, V]` | `lm_head.weight` `[V, d]`ᵀ (untied only) |

use super::mapping::Mapping;
use crate::model::ModelSpec;

/// The mappings of every parameter of Strata GPT `st` from GPT-2 `hf`.
pub(super) fn mappings(st: &ModelSpec, hf: &ModelSpec) -> Vec<Mapping> {
    let (st_spec, st, hf) = (st, &st.shape, &hf.shape);
    let (d, v) = (st.d_model, st.vocab);
    let same = |s: String, h: String, shape: &[usize]| Mapping::same(s, h, shape, shape);
    let mut out = vec![
        same("embed.wte".into(), "transformer.wte.weight".into(), &[v, d]),
        Mapping::same(
            "embed.wpe".into(),
            "transformer.wpe.weight".into(),
            &[hf.seq_len, d],
            &[st.seq_len, d],
        ),
    ];
    // A layer with a weight and a bias: Conv1D `[in, out]` + `[out]`, or a norm `[d]` + `[d]`.
    let pair = |out: &mut Vec<Mapping>, s: String, h: String, weight: &[usize], bias: usize| {
        out.push(same(format!("{s}.weight"), format!("{h}.weight"), weight));
        out.push(same(format!("{s}.bias"), format!("{h}.bias"), &[bias]));
    };
    for i in 0..st.n_layers {
        let (s, h) = (format!("block.{i}"), format!("transformer.h.{i}"));
        let f = st.d_ff_of(i);
        pair(&mut out, format!("{s}.ln1"), format!("{h}.ln_1"), &[d], d);
        pair(
            &mut out,
            format!("{s}.attn.qkv"),
            format!("{h}.attn.c_attn"),
            &[d, 3 * d],
            3 * d,
        );
        pair(
            &mut out,
            format!("{s}.attn.proj"),
            format!("{h}.attn.c_proj"),
            &[d, d],
            d,
        );
        pair(&mut out, format!("{s}.ln2"), format!("{h}.ln_2"), &[d], d);
        pair(
            &mut out,
            format!("{s}.mlp.fc1"),
            format!("{h}.mlp.c_fc"),
            &[d, f],
            f,
        );
        pair(
            &mut out,
            format!("{s}.mlp.fc2"),
            format!("{h}.mlp.c_proj"),
            &[f, d],
            d,
        );
    }
    pair(
        &mut out,
        "head.ln_f".into(),
        "transformer.ln_f".into(),
        &[d],
        d,
    );
    if !st_spec.tie_embeddings {
        out.push(Mapping::linear(
            "head.lm_head.weight".into(),
            "lm_head.weight".into(),
            d,
            v,
        ));
    }
    out
}

/// The canonical (GPT2LMHeadModel) name of a tensor in a GPT-2 file: files saved from
/// `GPT2Model` (such as the original `gpt2` checkpoint) lack the `transformer.` prefix.
pub(super) fn canonical(name: &str) -> String {
    if name.starts_with("transformer.") || name == "lm_head.weight" {
        name.into()
    } else {
        format!("transformer.{name}")
    }
}

/// Tensors of older GPT-2 files that are buffers, not weights (the causal mask).
pub(super) fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}
