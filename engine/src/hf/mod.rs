//! Hugging Face interchange: Strata's global, layout-free parameters ↔ `GPT2LMHeadModel`
//! and `LlamaForCausalLM` directories (`config.json`, safetensors weights, `vocab.json`).
//!
//! * [`spec`]: the numbers both sides must agree on, and the by-name refusal of a mismatch;
//! * [`config`]: HF `config.json` read (with transformers' defaults) and written;
//! * [`mapping`]: which HF tensors make each Strata parameter ([`gpt2`], [`llama`] hold
//!   the name tables and layout notes), and exact conversions on whole tensors or on a
//!   rank's [`crate::shard::ShardSpec`] blocks;
//! * [`import`]: an HF directory opened, checked and loaded (`model.init_from`);
//! * [`init`]: `model.init_from` loaded into each rank's parameter shards;
//! * [`export`]: a Strata model written as an HF directory (`strata export --format hf`);
//! * [`from_checkpoint`]: a Strata checkpoint exported (`strata export`);
//! * [`vocab`]: the character vocabulary as `vocab.json`.
//!
//! Invariant: import and export are exact inverses on the weights (copies, transposes,
//! concatenations and slices only; no arithmetic), so a round trip is bit-identical.

pub mod config;
pub mod export;
pub mod from_checkpoint;
mod gpt2;
pub mod import;
pub mod init;
mod llama;
pub mod mapping;
pub mod safetensors_io;
pub mod spec;
pub mod vocab;

pub use config::HfConfig;
pub use export::{export, StrataSource};
pub use from_checkpoint::export_checkpoint;
pub use import::{HfCheckpoint, Import};
pub use init::load_init_from;
pub use mapping::{from_hf, mappings, to_hf};
pub use spec::check_compat;
pub use vocab::HfVocab;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::CharVocab;
    use crate::model::{Activation, ModelSpec};
    use crate::shard::{Block, ShardSpec};
    use partitioner::{Arch, ModelShape};
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use tch::{Device, Kind, Tensor};

    fn spec(arch: Arch, tie: bool) -> ModelSpec {
        let shape = match arch {
            Arch::Gpt => ModelShape::gpt(11, 6, 8, 4, 2, 12),
            Arch::Llama => ModelShape::llama(11, 6, 8, 4, 2, 2, 12),
        };
        ModelSpec {
            tie_embeddings: tie,
            activation: match arch {
                Arch::Gpt => Activation::GeluTanh,
                Arch::Llama => Activation::Gelu,
            },
            ..ModelSpec::new(shape)
        }
    }

    /// Every Strata parameter of `s`, with distinct pseudo-random values.
    /// Deterministic without torch's global generator, which tests running
    /// in parallel threads would race on.
    fn random_params(s: &ModelSpec) -> BTreeMap<String, Tensor> {
        mappings(s, s)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let dims: Vec<i64> = m.shape.iter().map(|&d| d as i64).collect();
                let n: i64 = dims.iter().product();
                let phase = 1.0 + i as f64 * 0.731;
                let values = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * phase).sin();
                (m.strata, values.reshape(dims.as_slice()))
            })
            .collect()
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("strata-hf-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, t) in a {
            assert!(t.equal(&b[k]), "{k} differs");
        }
    }

    #[test]
    fn mappings_cover_exactly_the_models_parameters() {
        use crate::model::{sharding::TpRank, Model};
        use partitioner::LayerKind;
        for arch in [Arch::Gpt, Arch::Llama] {
            for tie in [false, true] {
                let s = spec(arch, tie);
                let mut layers = vec![LayerKind::Embedding];
                layers.extend((0..s.shape.n_layers).map(LayerKind::Block));
                layers.push(LayerKind::Head);
                let model = Model::new(&s, &layers, 0, TpRank::SINGLE).unwrap();
                let have: BTreeMap<String, Vec<usize>> = model
                    .params()
                    .iter()
                    .map(|p| (p.name.clone(), p.spec.global_shape.clone()))
                    .collect();
                let want: BTreeMap<String, Vec<usize>> = mappings(&s, &s)
                    .unwrap()
                    .into_iter()
                    .map(|m| (m.strata, m.shape))
                    .collect();
                assert_eq!(have, want, "{arch:?} tied={tie}");
            }
        }
    }

    #[test]
    fn in_memory_round_trip_is_exact() {
        for arch in [Arch::Gpt, Arch::Llama] {
            for tie in [false, true] {
                let s = spec(arch, tie);
                let p = random_params(&s);
                let hf = to_hf(&s, &p).unwrap();
                assert_eq!(hf.contains_key("lm_head.weight"), !tie);
                assert_same(&from_hf(&s, &s, &hf).unwrap(), &p);
            }
        }
    }

    #[test]
    fn layouts_follow_transformers() {
        let s = spec(Arch::Gpt, false);
        let p = random_params(&s);
        let hf = to_hf(&s, &p).unwrap();
        // Conv1D is [in, out] like Strata: no transpose; c_attn is q|k|v as Strata's qkv.
        assert!(hf["transformer.h.1.attn.c_attn.weight"].equal(&p["block.1.attn.qkv.weight"]));
        assert!(hf["transformer.h.0.mlp.c_proj.weight"].equal(&p["block.0.mlp.fc2.weight"]));
        assert!(hf["lm_head.weight"].equal(&p["head.lm_head.weight"].tr()));
        let s = spec(Arch::Llama, false);
        let p = random_params(&s);
        let hf = to_hf(&s, &p).unwrap();
        let qkv = &p["block.0.attn.qkv.weight"]; // [8, (4 + 2 + 2) * 2]
        assert_eq!(qkv.size(), [8, 16]);
        let at = |n: &str| &hf[&format!("model.layers.0.self_attn.{n}_proj.weight")];
        assert!(at("q").equal(&qkv.narrow(1, 0, 8).tr()));
        assert!(at("k").equal(&qkv.narrow(1, 8, 4).tr()));
        assert!(at("v").equal(&qkv.narrow(1, 12, 4).tr()));
        assert_eq!(at("k").size(), [4, 8]);
        assert!(hf["model.layers.1.mlp.down_proj.weight"].equal(&p["block.1.mlp.down.weight"].tr()));
    }

    #[test]
    fn disk_round_trip_and_shards() {
        for arch in [Arch::Gpt, Arch::Llama] {
            let s = spec(arch, arch == Arch::Gpt);
            let p = random_params(&s);
            let dir = scratch(&format!("rt-{}", arch.name()));
            let vocab = CharVocab::from_text("abcdefghijk");
            export(&dir, &s, Some(&vocab), &random_params(&s), Kind::Float).unwrap();
            let ck = HfCheckpoint::open(&dir).unwrap();
            assert_eq!(ck.config.spec, s);
            assert_eq!(
                ck.vocab,
                HfVocab::Chars(CharVocab {
                    len_tokens: 0,
                    ..vocab
                })
            );
            let imp = ck.import(&s).unwrap();
            assert_same(&imp.load_all(Kind::Float).unwrap(), &p);
            // A tp rank's qkv shard: head 1 of q, k and v each (three column blocks), in a
            // local tensor with a padding column that no block covers.
            let (d, hd) = (s.shape.d_model, s.shape.head_dim());
            let (q, kv) = (s.shape.n_heads * hd, s.shape.n_kv_heads * hd);
            let block = |g: usize, l: usize| Block {
                global_offset: vec![0, g],
                local_offset: vec![0, l],
                shape: vec![d, hd],
            };
            let shard = ShardSpec {
                global_shape: vec![d, q + 2 * kv],
                blocks: vec![block(hd, 0), block(q + hd, hd), block(q + kv + hd, 2 * hd)],
            };
            let dst = Tensor::full(
                [d as i64, 3 * hd as i64 + 1],
                7.0,
                (Kind::Float, Device::Cpu),
            );
            imp.load_shard("block.1.attn.qkv.weight", &shard, &dst)
                .unwrap();
            let full = &p["block.1.attn.qkv.weight"];
            for (i, b) in shard.blocks.iter().enumerate() {
                let want = full.narrow(1, b.global_offset[1] as i64, hd as i64);
                assert!(
                    dst.narrow(1, (i * hd) as i64, hd as i64).equal(&want),
                    "{arch:?} block {i}"
                );
            }
            assert_eq!(
                dst.narrow(1, 3 * hd as i64, 1)
                    .sum(Kind::Float)
                    .double_value(&[]),
                7.0 * d as f64
            );
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn fewer_positions_keep_the_first_rows() {
        let mut hf_spec = spec(Arch::Gpt, true);
        hf_spec.shape.seq_len = 12;
        let p = random_params(&hf_spec);
        let dir = scratch("crop");
        export(&dir, &hf_spec, None, &p.shallow(), Kind::Float).unwrap();
        let ck = HfCheckpoint::open(&dir).unwrap();
        let mut st = hf_spec;
        st.shape.seq_len = 5;
        let wpe = ck
            .import(&st)
            .unwrap()
            .load_full("embed.wpe", Kind::Float)
            .unwrap();
        assert!(wpe.equal(&p["embed.wpe"].narrow(0, 0, 5)));
        st.shape.seq_len = 13;
        let e = ck.import(&st).err().unwrap().to_string();
        assert!(
            e.contains("n_positions = 12") && e.contains("fix: set model.seq_len to at most 12"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Writes `tensors` (HF names) with `spec`'s config.json.
    fn write_hf(dir: &std::path::Path, spec: &ModelSpec, tensors: &BTreeMap<String, Tensor>) {
        std::fs::create_dir_all(dir).unwrap();
        let lazy: Vec<_> = tensors
            .iter()
            .map(|(n, t)| {
                let t = t.copy();
                let shape = t.size().iter().map(|&d| d as usize).collect();
                let load: Box<dyn Fn() -> crate::Result<Tensor>> =
                    Box::new(move || Ok(t.shallow_clone()));
                (
                    n.clone(),
                    safetensors_io::LazyTensor {
                        shape,
                        kind: Kind::Float,
                        load,
                    },
                )
            })
            .collect();
        safetensors_io::write(&dir.join("model.safetensors"), &lazy).unwrap();
        std::fs::write(dir.join("config.json"), config::to_json(spec).to_string()).unwrap();
    }

    #[test]
    fn missing_unexpected_and_misshapen_tensors_are_refused_by_name() {
        let s = spec(Arch::Llama, false);
        let hf = to_hf(&s, &random_params(&s)).unwrap();
        let dir = scratch("bad");
        let mut t = hf.shallow();
        t.remove("model.layers.1.mlp.up_proj.weight");
        write_hf(&dir, &s, &t);
        let e = HfCheckpoint::open(&dir).err().unwrap();
        assert!(e.is_user_error());
        assert!(
            e.to_string()
                .contains("model.layers.1.mlp.up_proj.weight: is missing"),
            "{e}"
        );
        let mut t = hf.shallow();
        t.insert(
            "model.layers.2.mlp.up_proj.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
        write_hf(&dir, &s, &t);
        let e = HfCheckpoint::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("model.layers.2.mlp.up_proj.weight: is an unexpected tensor"),
            "{e}"
        );
        let mut t = hf.shallow();
        t.insert(
            "model.norm.weight".into(),
            Tensor::zeros([9], (Kind::Float, Device::Cpu)),
        );
        write_hf(&dir, &s, &t);
        let e = HfCheckpoint::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("model.norm.weight: has shape [9], but config.json implies [8]"),
            "{e}"
        );
        // Base-model names (no `model.` prefix) and old rotary buffers are accepted.
        let mut t: BTreeMap<String, Tensor> = hf
            .iter()
            .map(|(n, v)| {
                (
                    n.strip_prefix("model.").unwrap_or(n).to_string(),
                    v.shallow_clone(),
                )
            })
            .collect();
        t.insert(
            "layers.0.self_attn.rotary_emb.inv_freq".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
        write_hf(&dir, &s, &t);
        let ck = HfCheckpoint::open(&dir).unwrap();
        assert_same(
            &ck.import(&s).unwrap().load_all(Kind::Float).unwrap(),
            &random_params(&s),
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    trait Shallow {
        fn shallow(&self) -> BTreeMap<String, Tensor>;
    }
    impl Shallow for BTreeMap<String, Tensor> {
        fn shallow(&self) -> BTreeMap<String, Tensor> {
            self.iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect()
        }
    }
}
