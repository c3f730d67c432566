//! Prompts as token ids, and their split into microbatches of left-padded rows.
//!
//! Invariants: microbatches hold consecutive prompts and their sizes differ by at most
//! one; row `r` of a microbatch is prompt `first + r`, preceded by `pad[r] = longest −
//! len(prompt)` padding slots (id 0, never attended to; see [`crate::model::kv`]).

use crate::data::CharVocab;
use crate::error::{Error, Result};
use crate::model::tokens_tensor;
use tch::Tensor;

/// Encodes `text` with a character vocabulary; a character outside it is refused by
/// name, with the prompt number and column.
pub fn encode(vocab: &CharVocab, text: &str, prompt: usize) -> Result<Vec<i64>> {
    text.chars()
        .enumerate()
        .map(|(col, c)| match vocab.chars.binary_search(&c) {
            Ok(id) => Ok(id as i64),
            Err(_) => Err(Error::usage(
                "--prompt",
                format!(
                    "prompt {} has the character {c:?} (column {}), which is not in the model's {}-character vocabulary",
                    prompt + 1,
                    col + 1,
                    vocab.chars.len()
                ),
                "use only characters of the training text (`strata checkpoint inspect` shows the vocabulary)",
            )),
        })
        .collect()
}

/// Decodes token ids with a character vocabulary.
pub fn decode(vocab: &CharVocab, ids: &[i64]) -> String {
    ids.iter()
        .map(|&i| vocab.chars.get(i as usize).copied().unwrap_or('\u{fffd}'))
        .collect()
}

/// One microbatch of prompts.
#[derive(Clone, Debug)]
pub struct Microbatch {
    /// Index of its first prompt.
    pub first: usize,
    /// The prompts' ids, unpadded.
    pub prompts: Vec<Vec<i64>>,
    /// Longest prompt.
    pub longest: usize,
}

impl Microbatch {
    pub fn rows(&self) -> usize {
        self.prompts.len()
    }

    /// Left padding of each row.
    pub fn pads(&self) -> Vec<i64> {
        self.prompts
            .iter()
            .map(|p| (self.longest - p.len()) as i64)
            .collect()
    }

    /// The padding as a tensor `[b]`, or None when every row has the same length.
    pub fn pad_tensor(&self) -> Option<Tensor> {
        let pads = self.pads();
        pads.iter()
            .any(|&p| p > 0)
            .then(|| Tensor::from_slice(&pads))
    }

    /// The left-padded prompts followed by `generated` tokens of each row, `[b, len]`.
    pub fn tokens(&self, generated: &[Vec<i64>]) -> Result<Tensor> {
        let extra = generated.first().map_or(0, Vec::len);
        let width = self.longest + extra;
        let mut ids = Vec::with_capacity(self.rows() * width);
        for (r, p) in self.prompts.iter().enumerate() {
            ids.extend(std::iter::repeat_n(0, self.longest - p.len()));
            ids.extend_from_slice(p);
            if let Some(g) = generated.get(r) {
                ids.extend_from_slice(g);
            }
        }
        tokens_tensor(&ids, self.rows(), width)
    }
}

/// Splits `prompts` into `m` microbatches of consecutive prompts (sizes differ by at most
/// one; never an empty microbatch).
pub fn split(prompts: &[Vec<i64>], m: usize) -> Vec<Microbatch> {
    let m = m.clamp(1, prompts.len().max(1));
    let (base, extra) = (prompts.len() / m, prompts.len() % m);
    let mut out = Vec::with_capacity(m);
    let mut at = 0;
    for i in 0..m {
        let n = base + usize::from(i < extra);
        let chunk = prompts[at..at + n].to_vec();
        out.push(Microbatch {
            first: at,
            longest: chunk.iter().map(Vec::len).max().unwrap_or(0),
            prompts: chunk,
        });
        at += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_split_evenly_and_pad_on_the_left() {
        let prompts: Vec<Vec<i64>> = (1..=5).map(|n| (0..n).collect()).collect();
        let mbs = split(&prompts, 2);
        assert_eq!(mbs.len(), 2);
        assert_eq!(
            (mbs[0].first, mbs[0].rows(), mbs[1].first, mbs[1].rows()),
            (0, 3, 3, 2)
        );
        assert_eq!(mbs[0].pads(), vec![2, 1, 0]);
        let t = mbs[1].tokens(&[vec![9], vec![8]]).unwrap();
        let ids: Vec<i64> = Vec::try_from(&t.view([-1])).unwrap();
        assert_eq!(ids, [0, 0, 1, 2, 3, 9, 0, 1, 2, 3, 4, 8]);
        assert!(split(&prompts[..1], 4).len() == 1);
    }

    #[test]
    fn a_character_outside_the_vocabulary_is_named() {
        let v = CharVocab::from_text("abc ");
        assert_eq!(encode(&v, "cab a", 0).unwrap(), [3, 1, 2, 0, 1]);
        assert_eq!(decode(&v, &[3, 1, 2]), "cab");
        let e = encode(&v, "abz", 1).unwrap_err().to_string();
        assert!(
            e.contains("'z'") && e.contains("prompt 2") && e.contains("column 3"),
            "{e}"
        );
    }
}
