//! `strata quantize` (engine side): a checkpoint's linear weights become int8 codes and
//! per-output-channel f32 scales; loading the result on any layout runs every linear
//! layer on the int8 kernel (no f32 copy of those weights exists on any rank), its
//! logits are close to the fp32 model's, and every layout decodes the same tokens.

use engine::checkpoint::Checkpoint;
use engine::comm::local::LocalComm;
use engine::compress::quantize::quantize_checkpoint;
use engine::generate::load::CheckpointWeights;
use engine::generate::{batch, Job, ModelSetup, Sampling};
use engine::model::kv::KvCache;
use engine::model::Model;
use engine::quant::{QuantInfo, Scheme};
use engine::tch::{Kind, Tensor};
use std::path::Path;
use strata_tests::{
    arch_config, generate_local, load_single, rel_diff, scratch, write_test_checkpoint, TestWeights,
};

fn config(arch: &str, out: &Path) -> String {
    arch_config(arch, false, 1, 1, 1, "gpipe", 1, out)
}

/// Next-token logits of every prefix position of a fixed batch.
fn logits(model: &Model) -> Tensor {
    let ids: Vec<i64> = (0..24).map(|i| (i * 7 + 3) % 64).collect();
    let tokens = Tensor::from_slice(&ids).view([2, 12]);
    let mut cache = KvCache::new(model.cache_shape(2, 12), None).unwrap();
    let mut tp = LocalComm::group(1).pop().unwrap();
    model.infer(&tokens, &mut cache, &mut tp).unwrap()
}

#[test]
fn int8_checkpoints_run_on_int8_weights_close_to_fp32_on_every_layout() {
    for arch in ["gpt", "llama"] {
        let dir = scratch(&format!("quant-{arch}"));
        let dense = write_test_checkpoint(
            &dir.join("dense"),
            &config(arch, &dir),
            TestWeights { seed: 5, std: 0.1 },
        );
        let q = quantize_checkpoint(&dense, &dir.join("int8"), Scheme::Int8).unwrap();
        // Every linear layer: 4 per block (GPT) or 5 (LLaMA) + the untied LM head.
        let per_block = if arch == "llama" { 5 } else { 4 };
        assert_eq!(q.weights, 8 * per_block + 1, "{arch}");
        let ckpt = Checkpoint::open(&q.dir).unwrap();
        let info = QuantInfo::from_extra(&ckpt.manifest().extra)
            .unwrap()
            .unwrap();
        assert_eq!(info.scheme, Scheme::Int8);
        let codes = ckpt.entry("block.3.attn.qkv.weight.int8").unwrap();
        // q | k | v: 4 query heads of 8, and 4 (GPT) or 2 (LLaMA) key/value heads.
        let qkv = if arch == "llama" { 64 } else { 96 };
        assert_eq!(
            (codes.dtype.kind(), codes.shape.clone()),
            (Kind::Int8, vec![qkv, 32])
        );
        let scales = ckpt.entry("block.3.attn.qkv.weight.scale").unwrap();
        assert_eq!(
            (scales.dtype.kind(), scales.shape.clone()),
            (Kind::Float, vec![qkv])
        );
        assert!(!ckpt.contains("block.3.attn.qkv.weight"));
        assert!(q.bytes_after * 10 < q.bytes_before * 4, "{q:?}");

        let (fp32, _) = load_single(&dense);
        let (mut int8, _) = load_single(&q.dir);
        // Not dequantised: every linear has codes and no f32 weight, and no parameter of
        // the chunk is a linear weight.
        let names: Vec<String> = int8.linears_mut().iter().map(|l| l.name.clone()).collect();
        for l in int8.linears_mut() {
            let w = l
                .int8
                .as_ref()
                .unwrap_or_else(|| panic!("{} is dense", l.name));
            assert_eq!(w.q.kind(), Kind::Int8);
            assert_eq!(l.weight.numel(), 0, "{} keeps an f32 copy", l.name);
        }
        assert!(int8.params().iter().all(|p| !names.contains(&p.name)));
        let (a, b) = (logits(&fp32), logits(&int8));
        let d = rel_diff(&b, &a);
        assert!(
            d > 0.0 && d < 0.03,
            "{arch}: int8 logits differ by {d} relative"
        );

        // Every layout decodes the same tokens from the int8 checkpoint.
        let prompts = vec![vec![1i64, 2, 3, 4, 5], vec![9, 8, 7]];
        let job = Job {
            microbatches: batch::split(&prompts, 2),
            max_new_tokens: 6,
            sampling: Sampling::greedy(),
            kv_cache: true,
        };
        let t = engine::compress::Trained::open(&q.dir).unwrap();
        let mut reference = None;
        for (pp, tp) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
            let setup = ModelSetup::new(t.spec.clone(), pp, tp).unwrap();
            let path = q.dir.clone();
            let got = generate_local(&setup, &job, move || {
                Box::new(CheckpointWeights::new(Checkpoint::open(&path).unwrap()).unwrap())
                    as Box<dyn engine::generate::Weights>
            });
            match &reference {
                None => reference = Some(got.tokens),
                Some(r) => assert_eq!(&got.tokens, r, "{arch} pp={pp} tp={tp}"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Outside reference: torch.ao's per-channel symmetric qint8 quantisation (observer
/// range [-127, 127]) gives the same scales and codes as `quant::quantize` on a weight
/// with a zero channel, a channel of one sign and a wide range of magnitudes.
#[test]
fn int8_codes_and_scales_equal_torch_per_channel_quantisation() {
    use std::process::{Command, Stdio};
    let dir = scratch("quant-torch");
    let (fan_in, fan_out) = (48i64, 24i64);
    let values: Vec<f32> = (0..fan_in * fan_out)
        .map(|k| {
            let (i, o) = (k / fan_out, k % fan_out);
            match o {
                0 => 0.0,
                1 => (i as f32 * 0.37).sin().abs() * 3.0,
                _ => ((k as f32) * 0.7391).sin() * (1.0 + (o as f32) * 0.5).powi(2) * 1e-2,
            }
        })
        .collect();
    let w = Tensor::from_slice(&values).view([fan_in, fan_out]);
    let src = dir.join("w.safetensors");
    Tensor::write_safetensors(&[("weight", &w)], &src).unwrap();
    let out = dir.join("ref.safetensors");
    let mut cmd = Command::new(strata_tests::venv_python());
    cmd.arg(strata_tests::repo_root().join("tests/python/quant_reference.py"))
        .arg(&src)
        .arg(&out)
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let run = strata_tests::run_with_limit(cmd, std::time::Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let (codes, scales) = engine::quant::quantize(&w).unwrap();
    let (rc, rs) = (&reference["codes"], &reference["scales"]);
    // torch keeps its epsilon as the scale of the all-zero channel; Strata keeps 1 (both
    // store codes 0 there).
    let live = Tensor::arange_start(1, fan_out, (Kind::Int64, engine::tch::Device::Cpu));
    let d = rel_diff(&scales.index_select(0, &live), &rs.index_select(0, &live));
    assert!(d < 1e-6, "scales differ by {d}");
    assert_eq!(codes.size(), rc.size());
    assert_eq!(codes.kind(), Kind::Int8);
    let mismatched = codes.ne_tensor(rc).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(mismatched, 0, "{mismatched} codes differ from torch's");
    std::fs::remove_dir_all(&dir).unwrap();
}
