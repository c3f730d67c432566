//! LLaMA (`LlamaForCausalLM`) ↔ Strata LLaMA names.
//!
//! Every HF projection is an nn.Linear `[out, in]`; Strata stores `[in, out]`, so each is
//! transposed, and Strata's fused `attn.qkv` `[d, (H + 2 KV) · hd]` is
//! `q_projᵀ | k_projᵀ | v_projᵀ`, each head's columns contiguous in head order (HF views
//! q as `[b, s, H, hd]`). With grouped-query attention q head `h` reads kv head
//! `h / (H / KV)` on both sides (HF `repeat_kv`).
//!
//! Rotary layout: Strata rotates the two halves of each head (`x[..hd/2]`, `x[hd/2..]`),
//! which is HF's `rotate_half` (the GPT-NeoX form). HF's own conversion script permutes
//! Meta's original q/k weights from the interleaved-pairs form into this one, so HF
//! weights are already in Strata's layout: q and k are copied unpermuted. (The
//! outside-reference tests check this numerically against transformers.)
//!
//! | Strata | LLaMA |
//! |---|---|
//! | `embed.wte` `[V, d]` | `model.embed_tokens.weight` |
//! | `block.i.ln1.weight` | `model.layers.i.input_layernorm.weight` |
//! | `block.i.attn.qkv.weight` | `model.layers.i.self_attn.{q,k,v}_proj.weight`ᵀ, fused |
//! | `block.i.attn.proj.weight` | `model.layers.i.self_attn.o_proj.weight`ᵀ |
//! | `block.i.ln2.weight` | `model.layers.i.post_attention_layernorm.weight` |
//! | `block.i.mlp.{gate,up,down}.weight` | `model.layers.i.mlp.{gate,up,down}_proj.weight`ᵀ |
//! | `head.ln_f.weight` | `model.norm.weight` |
//! | `head.lm_head.weight` `[d, V]` | `lm_head.weight` `[V, d]`ᵀ (untied only) |

use super::mapping::Mapping;
use crate::model::ModelSpec;

/// The mappings of every parameter of Strata LLaMA `st` (the HF model has the same
/// shapes; positions have no tensor).
pub(super) fn mappings(st: &ModelSpec, _hf: &ModelSpec) -> Vec<Mapping> {
    let (st_spec, st) = (st, &st.shape);
    let (d, v, hd) = (st.d_model, st.vocab, st.head_dim());
    let vector = |s: String, h: String| Mapping::same(s, h, &[d], &[d]);
    let mut out = vec![Mapping::same(
        "embed.wte".into(),
        "model.embed_tokens.weight".into(),
        &[v, d],
        &[v, d],
    )];
    for i in 0..st.n_layers {
        let (s, h) = (format!("block.{i}"), format!("model.layers.{i}"));
        let f = st.d_ff_of(i);
        let attn = |p: &str| format!("{h}.self_attn.{p}_proj.weight");
        out.push(vector(
            format!("{s}.ln1.weight"),
            format!("{h}.input_layernorm.weight"),
        ));
        out.push(Mapping::fused(
            format!("{s}.attn.qkv.weight"),
            vec![
                (attn("q"), st.n_heads * hd),
                (attn("k"), st.n_kv_heads * hd),
                (attn("v"), st.n_kv_heads * hd),
            ],
            d,
        ));
        out.push(Mapping::linear(
            format!("{s}.attn.proj.weight"),
            attn("o"),
            d,
            d,
        ));
        out.push(vector(
            format!("{s}.ln2.weight"),
            format!("{h}.post_attention_layernorm.weight"),
        ));
        for (name, d_in, d_out) in [("gate", d, f), ("up", d, f), ("down", f, d)] {
            out.push(Mapping::linear(
                format!("{s}.mlp.{name}.weight"),
                format!("{h}.mlp.{name}_proj.weight"),
                d_in,
                d_out,
            ));
        }
    }
    out.push(vector(
        "head.ln_f.weight".into(),
        "model.norm.weight".into(),
    ));
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

/// The canonical (LlamaForCausalLM) name of a tensor: files saved from `LlamaModel`
/// lack the `model.` prefix.
pub(super) fn canonical(name: &str) -> String {
    if name.starts_with("model.") || name == "lm_head.weight" {
        name.into()
    } else {
        format!("model.{name}")
    }
}

/// Tensors of older LLaMA files that are buffers, not weights.
pub(super) fn is_buffer(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}
