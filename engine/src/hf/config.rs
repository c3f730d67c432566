//! Hugging Face `config.json` for `GPT2LMHeadModel` and `LlamaForCausalLM`: read into a
//! [`ModelSpec`] (with transformers' defaults for absent fields), and written from one.
//!
//! Invariant: reading refuses, by field name, every setting under which transformers
//! would compute something Strata does not (attention scaled by layer index, biased
//! LLaMA projections, rope scaling, a head width other than `hidden_size / heads`, an
//! activation other than GELU or SiLU), so an accepted config means equal numbers.
//! Dropout probabilities are accepted and ignored: Strata has no dropout, and written
//! configs set them to 0 so that `model.train()` in transformers matches too.

use super::spec::{activation_from_hf, activation_hf_name, arch_hf};
use crate::error::{Error, Result};
use crate::model::{Activation, ModelSpec};
use partitioner::{Arch, ModelShape};
use serde_json::{json, Map, Value};
use std::path::Path;

/// A parsed HF config and where it came from.
#[derive(Clone, Debug)]
pub struct HfConfig {
    /// The model it describes, in Strata's terms.
    pub spec: ModelSpec,
    /// Path of the `config.json` (for messages).
    pub path: String,
}

/// Reads one field of a config with transformers' default when absent or `null`.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a str,
}

impl Fields<'_> {
    fn err(&self, field: &str, problem: String, fix: String) -> Error {
        Error::Hf {
            path: self.path.into(),
            field: field.into(),
            problem,
            fix,
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match self.get(field) {
            None => default.ok_or_else(|| {
                self.err(
                    field,
                    "is missing".into(),
                    format!("add \"{field}\" to the config (a positive integer)"),
                )
            }),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    self.err(
                        field,
                        format!("must be a positive integer, got {v}"),
                        format!("set \"{field}\" to a positive integer"),
                    )
                }),
        }
    }

    fn f64(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    self.err(
                        field,
                        format!("must be a positive number, got {v}"),
                        format!("set \"{field}\" to a positive number"),
                    )
                }),
        }
    }

    fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                self.err(
                    field,
                    format!("must be true or false, got {v}"),
                    format!("set \"{field}\" to true or false"),
                )
            }),
        }
    }

    fn str(&self, field: &str, default: &str) -> Result<String> {
        match self.get(field) {
            None => Ok(default.into()),
            Some(v) => v.as_str().map(str::to_string).ok_or_else(|| {
                self.err(
                    field,
                    format!("must be a string, got {v}"),
                    format!("set \"{field}\" to a string"),
                )
            }),
        }
    }

    /// Refuses a setting Strata does not compute: `field` must be `want` (default `dflt`).
    fn require_bool(&self, field: &str, dflt: bool, want: bool, why: &str) -> Result<()> {
        if self.bool(field, dflt)? != want {
            return Err(self.err(
                field,
                format!("is {}, which Strata does not support ({why})", !want),
                format!("use a model with \"{field}\": {want}"),
            ));
        }
        Ok(())
    }
}

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<HfConfig> {
        let path = dir.join("config.json");
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Hf {
            path: shown.clone(),
            field: "config.json".into(),
            problem: format!("cannot read it: {e}"),
            fix: "point at a directory written by save_pretrained or `strata export --format hf`"
                .into(),
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the text of a `config.json` read from `path`.
    pub fn parse(text: &str, path: &str) -> Result<HfConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Hf {
            path: path.into(),
            field: "config.json".into(),
            problem: format!("is not valid JSON: {e}"),
            fix: "re-save the model with save_pretrained".into(),
        })?;
        let obj = value.as_object().ok_or_else(|| Error::Hf {
            path: path.into(),
            field: "config.json".into(),
            problem: "is not a JSON object".into(),
            fix: "re-save the model with save_pretrained".into(),
        })?;
        let f = Fields { obj, path };
        let model_type = f.str("model_type", "")?;
        let spec = match model_type.as_str() {
            "gpt2" => gpt2_spec(&f)?,
            "llama" => llama_spec(&f)?,
            other => return Err(f.err(
                "model_type",
                format!("`{other}` is not a model Strata can load"),
                "use a GPT-2 (`gpt2`, GPT2LMHeadModel) or LLaMA (`llama`, LlamaForCausalLM) model"
                    .into(),
            )),
        };
        Ok(HfConfig {
            spec,
            path: path.into(),
        })
    }
}

fn gpt2_spec(f: &Fields<'_>) -> Result<ModelSpec> {
    let d = f.usize("n_embd", Some(768))?;
    let n_heads = f.usize("n_head", Some(12))?;
    if d % n_heads != 0 {
        return Err(f.err(
            "n_head",
            format!("{n_heads} does not divide n_embd = {d}"),
            "use a model whose n_embd is a multiple of n_head".into(),
        ));
    }
    let act = f.str("activation_function", "gelu_new")?;
    let activation = activation_from_hf(&act).ok_or_else(|| {
        f.err(
            "activation_function",
            format!("`{act}` is not computed by Strata"),
            "use `gelu` or `gelu_new` (Strata's model.activation: gelu or gelu_tanh)".into(),
        )
    })?;
    f.require_bool(
        "scale_attn_weights",
        true,
        true,
        "attention is scaled by 1/sqrt(head_dim)",
    )?;
    f.require_bool(
        "scale_attn_by_inverse_layer_idx",
        false,
        false,
        "no per-layer attention scale",
    )?;
    f.require_bool(
        "add_cross_attention",
        false,
        false,
        "decoder-only, no cross-attention",
    )?;
    let positions = match f.get("n_positions") {
        Some(_) => f.usize("n_positions", None)?,
        None => f.usize("n_ctx", Some(1024))?,
    };
    let shape = ModelShape::gpt(
        f.usize("vocab_size", Some(50257))?,
        positions,
        d,
        n_heads,
        f.usize("n_layer", Some(12))?,
        f.usize("n_inner", Some(4 * d))?,
    );
    Ok(ModelSpec {
        tie_embeddings: f.bool("tie_word_embeddings", true)?,
        activation,
        norm_eps: f.f64("layer_norm_epsilon", 1e-5)?,
        ..ModelSpec::new(shape)
    })
}

fn llama_spec(f: &Fields<'_>) -> Result<ModelSpec> {
    let d = f.usize("hidden_size", Some(4096))?;
    let n_heads = f.usize("num_attention_heads", Some(32))?;
    let n_kv_heads = f.usize("num_key_value_heads", Some(n_heads))?;
    if d % n_heads != 0 || n_heads % n_kv_heads != 0 {
        return Err(f.err(
            "num_key_value_heads",
            format!("hidden_size {d}, num_attention_heads {n_heads} and num_key_value_heads {n_kv_heads} do not nest"),
            "use a model whose heads divide hidden_size and whose kv heads divide its heads".into(),
        ));
    }
    let head_dim = f.usize("head_dim", Some(d / n_heads))?;
    if head_dim != d / n_heads {
        return Err(f.err(
            "head_dim",
            format!(
                "is {head_dim}, not hidden_size / num_attention_heads = {}",
                d / n_heads
            ),
            "use a model with head_dim = hidden_size / num_attention_heads".into(),
        ));
    }
    let act = f.str("hidden_act", "silu")?;
    if act != "silu" {
        return Err(f.err(
            "hidden_act",
            format!("`{act}` is not computed by Strata (its LLaMA MLP is SwiGLU)"),
            "use a model with \"hidden_act\": \"silu\"".into(),
        ));
    }
    f.require_bool(
        "attention_bias",
        false,
        false,
        "LLaMA projections have no bias",
    )?;
    f.require_bool("mlp_bias", false, false, "LLaMA projections have no bias")?;
    let shape = ModelShape::llama(
        f.usize("vocab_size", Some(32000))?,
        f.usize("max_position_embeddings", Some(2048))?,
        d,
        n_heads,
        n_kv_heads,
        f.usize("num_hidden_layers", Some(32))?,
        f.usize("intermediate_size", Some(11008))?,
    );
    Ok(ModelSpec {
        tie_embeddings: f.bool("tie_word_embeddings", false)?,
        activation: Activation::Gelu,
        norm_eps: f.f64("rms_norm_eps", 1e-6)?,
        rope_theta: rope_theta(f)?,
        ..ModelSpec::new(shape)
    })
}

/// The rotary base: `rope_parameters` (transformers 5), else `rope_scaling` and the
/// top-level `rope_theta` (transformers 4). Only the plain (`default`) rotary is accepted.
fn rope_theta(f: &Fields<'_>) -> Result<f64> {
    for field in ["rope_parameters", "rope_scaling"] {
        let Some(v) = f.get(field) else { continue };
        let obj = v.as_object().ok_or_else(|| {
            f.err(
                field,
                format!("must be an object, got {v}"),
                format!("remove \"{field}\" or make it an object"),
            )
        })?;
        let inner = Fields { obj, path: f.path };
        let kind = match inner.get("rope_type") {
            Some(_) => inner.str("rope_type", "default")?,
            None => inner.str("type", "default")?,
        };
        if kind != "default" {
            return Err(f.err(
                field,
                format!("rope_type `{kind}` (scaled rotary) is not computed by Strata"),
                "use a model with the plain rotary (rope_type `default`)".into(),
            ));
        }
        if inner.get("rope_theta").is_some() {
            return inner.f64("rope_theta", 10000.0);
        }
    }
    f.f64("rope_theta", 10000.0)
}

/// Refuses a model a Hugging Face `config.json` cannot describe: `GPT2LMHeadModel` and
/// `LlamaForCausalLM` have one MLP width (`n_inner`, `intermediate_size`) for every
/// layer, so a per-layer `d_ff` (from `strata prune --method neurons`) is refused unless
/// all its entries are equal.
pub fn check_exportable(spec: &ModelSpec) -> Result<()> {
    let d_ff = &spec.shape.d_ff;
    if d_ff.uniform().is_some() {
        return Ok(());
    }
    Err(Error::usage(
        "model.d_ff",
        format!(
            "the model has a per-layer MLP width {d_ff}, and a Hugging Face {} config has one \
             width for every layer (`{}`)",
            match spec.shape.arch {
                Arch::Gpt => "GPT2LMHeadModel",
                Arch::Llama => "LlamaForCausalLM",
            },
            match spec.shape.arch {
                Arch::Gpt => "n_inner",
                Arch::Llama => "intermediate_size",
            }
        ),
        "use the Strata checkpoint directly (eval, generate, quantize, train.resume), or \
         prune with --method magnitude/2:4/sensitivity, which keep d_ff",
    ))
}

/// The `config.json` transformers loads `spec` from (`GPT2LMHeadModel` or
/// `LlamaForCausalLM`), fp32, no dropout, no special tokens.
pub fn to_json(spec: &ModelSpec) -> Value {
    let s = &spec.shape;
    let common = json!({
        "model_type": arch_hf(s.arch),
        "vocab_size": s.vocab,
        "tie_word_embeddings": spec.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
        "dtype": "float32",
        "use_cache": true,
    });
    let specific = match s.arch {
        Arch::Gpt => json!({
            "architectures": ["GPT2LMHeadModel"],
            "n_positions": s.seq_len,
            "n_embd": s.d_model,
            "n_layer": s.n_layers,
            "n_head": s.n_heads,
            "n_inner": s.d_ff.uniform().unwrap_or(s.d_ff.max()),
            "activation_function": activation_hf_name(spec.activation),
            "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "summary_first_dropout": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
        }),
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": s.d_model,
            "intermediate_size": s.d_ff.uniform().unwrap_or(s.d_ff.max()),
            "num_hidden_layers": s.n_layers,
            "num_attention_heads": s.n_heads,
            "num_key_value_heads": s.n_kv_heads,
            "head_dim": s.head_dim(),
            "hidden_act": "silu",
            "max_position_embeddings": s.seq_len,
            "rms_norm_eps": spec.norm_eps,
            // Both spellings: transformers 4 reads rope_theta, 5 reads rope_parameters.
            "rope_theta": spec.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
        }),
    };
    let mut obj = common.as_object().cloned().unwrap_or_default();
    if let Value::Object(more) = specific {
        obj.extend(more);
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HfConfig> {
        HfConfig::parse(text, "m/config.json")
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(r#"{"model_type": "gpt2", "vocab_size": 65, "n_positions": 32, "n_embd": 64, "n_layer": 2, "n_head": 4}"#).unwrap();
        let s = c.spec;
        assert_eq!(
            (s.shape.d_ff, s.tie_embeddings, s.activation),
            (256.into(), true, Activation::GeluTanh)
        );
        assert_eq!(
            (s.norm_eps, s.shape.seq_len, s.shape.n_kv_heads),
            (1e-5, 32, 4)
        );
        let c = parse(r#"{"model_type": "llama", "vocab_size": 65, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 500000.0}"#).unwrap();
        let s = c.spec;
        assert_eq!(
            (
                s.shape.n_kv_heads,
                s.tie_embeddings,
                s.norm_eps,
                s.rope_theta
            ),
            (2, false, 1e-6, 5e5)
        );
        let c = parse(
            r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}"#,
        )
        .unwrap();
        assert_eq!(c.spec.rope_theta, 1000.0);
    }

    #[test]
    fn written_config_reads_back() {
        for arch in [Arch::Gpt, Arch::Llama] {
            let shape = match arch {
                Arch::Gpt => ModelShape::gpt(65, 32, 64, 4, 3, 96),
                Arch::Llama => ModelShape::llama(65, 32, 64, 4, 2, 3, 96),
            };
            let spec = ModelSpec {
                tie_embeddings: arch == Arch::Gpt,
                activation: if arch == Arch::Gpt {
                    Activation::GeluTanh
                } else {
                    Activation::Gelu
                },
                norm_eps: 1e-5,
                rope_theta: if arch == Arch::Llama { 5e5 } else { 10000.0 },
                ..ModelSpec::new(shape)
            };
            let back = parse(&to_json(&spec).to_string()).unwrap().spec;
            assert_eq!(back, spec);
        }
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let gpt = r#"{"model_type": "gpt2", "n_embd": 64, "n_head": 4, "X"}"#;
        let cases = [
            (gpt.replace(r#""X""#, r#""activation_function": "relu""#), "activation_function: `relu`"),
            (gpt.replace(r#""X""#, r#""scale_attn_by_inverse_layer_idx": true"#), "scale_attn_by_inverse_layer_idx: is true"),
            (gpt.replace(r#""X""#, r#""n_layer": 0"#), "n_layer: must be a positive integer"),
            (gpt.replace(r#""X""#, r#""n_layer": "two""#), "n_layer: must be a positive integer"),
            (r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "attention_bias": true}"#.into(), "attention_bias: is true"),
            (r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}"#.into(), "head_dim: is 32"),
            (r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#.into(), "rope_scaling: rope_type `yarn`"),
            (r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "hidden_act": "gelu"}"#.into(), "hidden_act: `gelu`"),
            (r#"{"model_type": "bert"}"#.into(), "model_type: `bert`"),
            ("[1]".into(), "config.json: is not a JSON object"),
        ];
        for (text, needle) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.is_user_error());
            let e = e.to_string();
            assert!(
                e.contains(needle) && e.contains("fix:") && e.starts_with("m/config.json: "),
                "{e}"
            );
        }
    }
}
