//! The model as both sides describe it: a [`ModelSpec`] holds every number that fixes a
//! Strata model's parameter shapes and its arithmetic (dims, activation, norm epsilon,
//! rotary base, tied head). A Strata config and a Hugging Face `config.json` each give
//! one; an import compares them field by field and refuses the first disagreement by
//! name ([`check_compat`]). dtype and device are not compared: weights convert.
//!
//! Invariant: two models with equal specs compute the same function of the same weights
//! (positions: a Strata model may use fewer positions than the HF one, see
//! [`check_compat`]).

use crate::error::{Error, Result};
use crate::model::{Activation, ModelSpec};
use partitioner::Arch;

/// The name written to an HF `config.json` (`activation_function`).
pub fn activation_hf_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_new",
    }
}

/// The Strata config spelling of an activation.
pub fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_tanh",
    }
}

/// Reads an HF `activation_function`; `None` for one Strata does not compute.
pub fn activation_from_hf(name: &str) -> Option<Activation> {
    match name {
        "gelu" => Some(Activation::Gelu),
        // The same function: gelu_new spells the tanh formula out, gelu_pytorch_tanh
        // calls torch's fused kernel (they agree to float rounding).
        "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
        _ => None,
    }
}

/// One field that differs between an HF config and a Strata config.
struct Mismatch {
    hf_field: &'static str,
    hf_value: String,
    strata_key: &'static str,
    strata_value: String,
}

/// Fields both sides must agree on exactly, as (HF field, Strata key, HF value, Strata value).
fn exact_fields(hf_spec: &ModelSpec, st_spec: &ModelSpec) -> Vec<Mismatch> {
    let (hf, st) = (&hf_spec.shape, &st_spec.shape);
    let llama = hf.arch == Arch::Llama;
    let pick = |gpt: &'static str, llama_name: &'static str| if llama { llama_name } else { gpt };
    let mut rows: Vec<(&'static str, &'static str, String, String)> = vec![
        (
            "model_type",
            "model.arch",
            arch_hf(hf.arch).into(),
            st.arch.name().into(),
        ),
        (
            "vocab_size",
            "model.vocab",
            hf.vocab.to_string(),
            st.vocab.to_string(),
        ),
        (
            pick("n_embd", "hidden_size"),
            "model.d_model",
            hf.d_model.to_string(),
            st.d_model.to_string(),
        ),
        (
            pick("n_head", "num_attention_heads"),
            "model.n_heads",
            hf.n_heads.to_string(),
            st.n_heads.to_string(),
        ),
        (
            pick("n_layer", "num_hidden_layers"),
            "model.n_layers",
            hf.n_layers.to_string(),
            st.n_layers.to_string(),
        ),
        (
            pick("n_inner", "intermediate_size"),
            "model.d_ff",
            hf.d_ff.to_string(),
            st.d_ff.to_string(),
        ),
        (
            "tie_word_embeddings",
            "model.tie_embeddings",
            hf_spec.tie_embeddings.to_string(),
            st_spec.tie_embeddings.to_string(),
        ),
        (
            pick("layer_norm_epsilon", "rms_norm_eps"),
            "model.norm_eps",
            fmt_f(hf_spec.norm_eps),
            fmt_f(st_spec.norm_eps),
        ),
    ];
    if llama {
        rows.push((
            "num_key_value_heads",
            "model.n_kv_heads",
            hf.n_kv_heads.to_string(),
            st.n_kv_heads.to_string(),
        ));
        rows.push((
            "rope_theta",
            "model.rope_theta",
            fmt_f(hf_spec.rope_theta),
            fmt_f(st_spec.rope_theta),
        ));
    } else {
        rows.push((
            "activation_function",
            "model.activation",
            activation_hf_name(hf_spec.activation).into(),
            activation_name(st_spec.activation).into(),
        ));
    }
    rows.into_iter()
        .filter(|(_, _, h, s)| !same_value(h, s))
        .map(|(hf_field, strata_key, hf_value, strata_value)| Mismatch {
            hf_field,
            hf_value,
            strata_key,
            strata_value,
        })
        .collect()
}

/// Equal as Strata sees them: `gelu_new` is Strata's `gelu_tanh`, `llama` is `llama`.
fn same_value(hf: &str, strata: &str) -> bool {
    hf == strata
        || matches!((hf, strata), ("gpt2", "gpt") | ("gelu_new", "gelu_tanh"))
        || matches!((hf.parse::<f64>(), strata.parse::<f64>()), (Ok(a), Ok(b)) if a == b)
}

/// The HF `model_type` of an architecture.
pub fn arch_hf(arch: Arch) -> &'static str {
    match arch {
        Arch::Gpt => "gpt2",
        Arch::Llama => "llama",
    }
}

/// A float as a config would spell it (`1e-5`, `10000`).
fn fmt_f(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e7) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Checks that a Strata model (`strata`) can take the weights of an HF model (`hf`, read
/// from `path`): every shape and every constant that changes the numbers must agree. The
/// one allowed difference: Strata may use fewer positions (`seq_len`) than the HF model
/// has (GPT-2 keeps the first `seq_len` rows of `wpe`, as nanoGPT's `crop_block_size`).
pub fn check_compat(hf_spec: &ModelSpec, strata_spec: &ModelSpec, path: &str) -> Result<()> {
    let (hf, strata) = (&hf_spec.shape, &strata_spec.shape);
    if let Some(m) = exact_fields(hf_spec, strata_spec).into_iter().next() {
        let fix = match m.strata_key {
            "model.arch" => format!(
                "set model.arch: {} to load this {} model",
                if hf.arch == Arch::Llama {
                    "llama"
                } else {
                    "gpt"
                },
                m.hf_value
            ),
            "model.activation" => format!(
                "set model.activation: {} (the function these weights were trained with)",
                activation_name(hf_spec.activation)
            ),
            _ => format!(
                "set {}: {} in the Strata config",
                m.strata_key,
                strata_spelling(m.strata_key, &m.hf_value)
            ),
        };
        return Err(Error::Hf {
            path: path.into(),
            field: m.hf_field.into(),
            problem: format!(
                "the HF model has {} = {} but the Strata config has {} = {}",
                m.hf_field, m.hf_value, m.strata_key, m.strata_value
            ),
            fix,
        });
    }
    if strata.seq_len > hf.seq_len {
        let field = if hf.arch == Arch::Llama {
            "max_position_embeddings"
        } else {
            "n_positions"
        };
        return Err(Error::Hf {
            path: path.into(),
            field: field.into(),
            problem: format!(
                "the HF model has {field} = {} but the Strata config has model.seq_len = {}",
                hf.seq_len, strata.seq_len
            ),
            fix: format!("set model.seq_len to at most {}", hf.seq_len),
        });
    }
    Ok(())
}

/// How a value from the HF config is written in a Strata config.
fn strata_spelling(key: &str, hf_value: &str) -> String {
    match (key, hf_value) {
        ("model.activation", "gelu_new") => "gelu_tanh".into(),
        _ => hf_value.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use partitioner::ModelShape;

    fn llama() -> ModelSpec {
        ModelSpec {
            norm_eps: 1e-6,
            ..ModelSpec::new(ModelShape::llama(50, 16, 32, 4, 2, 2, 64))
        }
    }

    #[test]
    fn mismatches_are_refused_by_name() {
        let hf = llama();
        assert!(check_compat(&hf, &hf, "x").is_ok());
        let mut st = hf.clone();
        st.norm_eps = 1e-5;
        let e = check_compat(&hf, &st, "d/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rms_norm_eps")
                && e.contains("model.norm_eps = 1e-5")
                && e.contains("fix: set model.norm_eps: 1e-6"),
            "{e}"
        );
        let mut st = hf.clone();
        st.shape.n_kv_heads = 4;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads = 2"), "{e}");
        let mut st = hf.clone();
        st.rope_theta = 500000.0;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(
            e.contains("rope_theta = 10000") && e.contains("model.rope_theta = 500000"),
            "{e}"
        );
        let mut st = hf.clone();
        st.shape.seq_len = 17;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(e.contains("max_position_embeddings = 16"), "{e}");
        let mut st = hf.clone();
        st.shape.seq_len = 8;
        assert!(
            check_compat(&hf, &st, "x").is_ok(),
            "fewer positions are fine"
        );
        let mut st = hf.clone();
        st.tie_embeddings = true;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(e.contains("tie_word_embeddings = false"), "{e}");
    }

    #[test]
    fn gpt_activation_is_compared() {
        let mut hf = llama();
        hf.shape.arch = Arch::Gpt;
        hf.shape.n_kv_heads = hf.shape.n_heads;
        hf.activation = Activation::GeluTanh;
        let mut st = hf.clone();
        assert!(check_compat(&hf, &st, "x").is_ok());
        st.activation = Activation::Gelu;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(
            e.contains("activation_function = gelu_new")
                && e.contains("fix: set model.activation: gelu_tanh"),
            "{e}"
        );
        st.shape.arch = Arch::Llama;
        let e = check_compat(&hf, &st, "x").unwrap_err().to_string();
        assert!(
            e.contains("model_type = gpt2") && e.contains("model.arch: gpt"),
            "{e}"
        );
    }
}
