//! Hugging Face interchange against the real `transformers` package (installed into the
//! cached venv by scripts/setup.sh): random `GPT2LMHeadModel` and `LlamaForCausalLM`
//! models saved with `save_pretrained` are imported by Strata and exported again; the
//! export loads in transformers with no missing or unexpected keys and computes the
//! same logits as the original.

use engine::hf::{export, safetensors_io::read_all, HfCheckpoint};
use engine::tch::Kind;
use serde_json::json;
use std::path::Path;
use strata_tests::hf::{max_rel_diff, run_hf_reference};
use strata_tests::scratch;

/// Small models that cover every mapping rule: GQA, tied and untied heads, both GELUs,
/// more positions than a Strata config would use.
fn cases() -> Vec<(&'static str, &'static str, serde_json::Value)> {
    let gpt = |tie: bool, act: &str| {
        json!({"vocab_size": 37, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 4,
               "n_inner": 48, "activation_function": act, "tie_word_embeddings": tie})
    };
    let llama = |tie: bool| {
        json!({"vocab_size": 37, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
               "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": tie})
    };
    vec![
        ("gpt2-tied-gelu_new", "gpt2", gpt(true, "gelu_new")),
        ("gpt2-untied-gelu", "gpt2", gpt(false, "gelu")),
        ("llama-untied-gqa", "llama", llama(false)),
        ("llama-tied-gqa", "llama", llama(true)),
    ]
}

fn tokens() -> serde_json::Value {
    let row = |k: usize| (0..12).map(|i| (i * 7 + k * 5) % 37).collect::<Vec<_>>();
    json!({"inputs": [row(0), row(1)], "targets": [row(2), row(3)]})
}

fn meta_list(meta: &std::collections::HashMap<String, String>, key: &str) -> Vec<String> {
    serde_json::from_str(&meta[key]).unwrap()
}

#[test]
fn import_then_export_loads_in_transformers_with_the_same_logits() {
    let dir = scratch("hf-roundtrip");
    let mut jobs = Vec::new();
    for (name, arch, config) in cases() {
        jobs.push(
            json!({"op": "make", "arch": arch, "config": config, "seed": 5,
                         "out": dir.join(name)}),
        );
    }
    run_hf_reference(&json!(jobs), &dir);

    let mut jobs = Vec::new();
    for (name, _, _) in cases() {
        let ck = HfCheckpoint::open(&dir.join(name)).unwrap();
        let spec = ck.config.spec.clone();
        let params = ck.import(&spec).unwrap().load_all(Kind::Float).unwrap();
        let out = dir.join(format!("{name}-strata"));
        export(&out, &spec, None, &params, Kind::Float).unwrap();
        for (model, tag) in [(dir.join(name), "orig"), (out, "strata")] {
            jobs.push(json!({"op": "run", "model": model, "tokens": tokens(),
                             "out": dir.join(format!("{name}-{tag}.safetensors"))}));
        }
    }
    run_hf_reference(&json!(jobs), &dir);

    let read = |p: &Path| read_all(p).unwrap();
    for (name, _, _) in cases() {
        let (orig, _) = read(&dir.join(format!("{name}-orig.safetensors")));
        let (ours, meta) = read(&dir.join(format!("{name}-strata.safetensors")));
        for key in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert!(
                meta_list(&meta, key).is_empty(),
                "{name}: {key}: {}",
                meta[key]
            );
        }
        let d = max_rel_diff(&orig["logits"], &ours["logits"]);
        assert!(d == 0.0, "{name}: logits differ by {d:e} relative");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
