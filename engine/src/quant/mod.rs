//! Weight-only quantisation of linear layers (`strata quantize`) and the names, shard
//! specs and manifest record of quantised checkpoints.
//!
//! A quantised checkpoint stores, for every linear weight `W` (`[in, out]`) of the model
//! (attention qkv and projection, MLP, and an untied LM head; embeddings, norms and biases
//! stay in their dtype), two layout-free tensors instead of `W`:
//! * `W.int8`: the codes, `[out, in]` int8 (the kernel's layout);
//! * `W.scale`: one f32 scale per output channel, `[out]`.
//!
//! The manifest's `extra.quantization` ([`QuantInfo`]) records the scheme and the
//! weights it covers. Under tensor parallelism a rank reads the codes and scales of its
//! own slice: a column-parallel layer (output split) slices both, a row-parallel one
//! (input split) slices the codes' columns and keeps every scale ([`codes_spec`],
//! [`scale_spec`]).
//!
//! Invariant: codes and scales of a weight always come from the same quantisation of the
//! whole (global) tensor, so every layout computes with the same numbers.

pub mod int8;

pub use int8::{dequantize, quantize, Int8Weight};

use crate::error::{Error, Result};
use crate::shard::{Block, ShardSpec};
use serde::{Deserialize, Serialize};

/// The manifest `extra` key of the quantisation record.
pub const MANIFEST_KEY: &str = "quantization";

/// A quantisation scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Weight-only int8, symmetric, one scale per output channel.
    Int8,
}

impl Scheme {
    /// Parses `--scheme`; an unknown or unsupported scheme is refused naming the flag.
    pub fn parse(s: &str) -> Result<Scheme> {
        match s {
            "int8" => Ok(Scheme::Int8),
            "int4" => Err(Error::usage(
                "--scheme",
                "int4 is not supported by this build (libtorch's CPU int4 kernel needs a packed layout Strata does not store yet)",
                "use --scheme int8",
            )),
            other => Err(Error::usage(
                "--scheme",
                format!("unknown quantisation scheme `{other}`"),
                "use --scheme int8 (weight-only, per-output-channel symmetric scales)",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Int8 => "int8",
        }
    }
}

/// What `extra.quantization` of a quantised checkpoint's manifest says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantInfo {
    pub scheme: Scheme,
    /// Always `per_output_channel`.
    pub granularity: String,
    pub symmetric: bool,
    /// The dense weights that were replaced by `.int8` codes and `.scale` scales.
    pub weights: Vec<String>,
}

impl QuantInfo {
    pub fn new(scheme: Scheme, weights: Vec<String>) -> QuantInfo {
        QuantInfo {
            scheme,
            granularity: "per_output_channel".into(),
            symmetric: true,
            weights,
        }
    }

    /// Reads the record from a manifest's `extra`, if any.
    pub fn from_extra(
        extra: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<Option<QuantInfo>> {
        extra
            .get(MANIFEST_KEY)
            .map(|v| {
                serde_json::from_value(v.clone()).map_err(|e| {
                    Error::Internal(format!("manifest extra.{MANIFEST_KEY} is malformed: {e}"))
                })
            })
            .transpose()
    }

    pub fn covers(&self, weight: &str) -> bool {
        self.weights.iter().any(|w| w == weight)
    }
}

/// Name of the codes of weight `w`.
pub fn codes_name(w: &str) -> String {
    format!("{w}.int8")
}

/// Name of the scales of weight `w`.
pub fn scale_name(w: &str) -> String {
    format!("{w}.scale")
}

/// Where a rank's codes (`[out_l, in_l]`) sit, from its weight's spec (`[in, out]`).
pub fn codes_spec(weight: &ShardSpec) -> ShardSpec {
    let swap = |v: &[usize]| vec![v[1], v[0]];
    ShardSpec {
        global_shape: swap(&weight.global_shape),
        blocks: weight
            .blocks
            .iter()
            .map(|b| Block {
                global_offset: swap(&b.global_offset),
                local_offset: swap(&b.local_offset),
                shape: swap(&b.shape),
            })
            .collect(),
    }
}

/// Where a rank's scales (`[out_l]`) sit: the output-channel ranges of its weight's blocks.
pub fn scale_spec(weight: &ShardSpec) -> ShardSpec {
    let mut blocks: Vec<Block> = Vec::new();
    for b in &weight.blocks {
        let block = Block {
            global_offset: vec![b.global_offset[1]],
            local_offset: vec![b.local_offset[1]],
            shape: vec![b.shape[1]],
        };
        if !blocks.contains(&block) {
            blocks.push(block);
        }
    }
    ShardSpec {
        global_shape: vec![weight.global_shape[1]],
        blocks,
    }
}

/// The local shape a spec's blocks fill (the extent of every block in each dim).
pub fn local_shape(spec: &ShardSpec) -> Vec<i64> {
    let mut shape = vec![0i64; spec.global_shape.len()];
    for b in &spec.blocks {
        for (d, s) in shape.iter_mut().enumerate() {
            *s = (*s).max((b.local_offset[d] + b.shape[d]) as i64);
        }
    }
    shape
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sharding::{spec_for, Split, TpRank};

    #[test]
    fn shards_slice_codes_and_scales_like_their_weight() {
        let tp = TpRank { rank: 1, size: 2 };
        // Column-parallel fused qkv [4, 12] (q 4, k 4, v 4): codes rows and scales split.
        let (_, w) = spec_for(&[4, 12], &Split::FusedCols(vec![4, 4, 4]), tp);
        let c = codes_spec(&w);
        assert_eq!(c.global_shape, [12, 4]);
        assert_eq!(local_shape(&c), [6, 4]);
        let s = scale_spec(&w);
        assert_eq!(s.blocks.len(), 3);
        assert_eq!(s.blocks[1].global_offset, [6]);
        assert_eq!(local_shape(&s), [6]);
        // Row-parallel [8, 4]: codes columns split, every scale kept.
        let (_, w) = spec_for(&[8, 4], &Split::Rows { padded: false }, tp);
        assert_eq!(local_shape(&codes_spec(&w)), [4, 4]);
        let s = scale_spec(&w);
        assert!(s.is_full() && local_shape(&s) == [4]);
    }

    #[test]
    fn schemes_parse_by_name() {
        assert_eq!(Scheme::parse("int8").unwrap(), Scheme::Int8);
        let e = Scheme::parse("fp7").unwrap_err().to_string();
        assert!(
            e.contains("--scheme") && e.contains("fp7") && e.contains("fix:"),
            "{e}"
        );
        assert!(Scheme::parse("int4").unwrap_err().is_user_error());
    }
}
