//! Datasets and deterministic batch sampling.
//!
//! A character-level dataset reads a text file (first 90% train, last 10% validation);
//! a random-token dataset is generated from the seed. Every batch row is a pure function of
//! (seed, split, step, global row), so all ranks agree on the batch without exchanging it:
//! the first stage reads the inputs and the last stage reads the targets.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The character set of a text file.
#[derive(Clone, Debug, PartialEq)]
pub struct CharVocab {
    /// Sorted distinct characters; token id = index.
    pub chars: Vec<char>,
    /// Number of characters in the file.
    pub len_tokens: usize,
}

impl CharVocab {
    pub fn from_text(text: &str) -> CharVocab {
        let set: BTreeSet<char> = text.chars().collect();
        CharVocab {
            chars: set.into_iter().collect(),
            len_tokens: text.chars().count(),
        }
    }

    pub fn from_file(path: &Path) -> Result<CharVocab> {
        Ok(Self::from_text(&read_text(path)?))
    }
}

/// Reads a data file as UTF-8 text; a file that is not UTF-8 is a user error naming the
/// first bad byte's offset.
fn read_text(path: &Path) -> Result<String> {
    let bad = |problem: String, fix: &str| Error::Config {
        path: path.display().to_string(),
        field: "train.data".into(),
        problem,
        fix: fix.into(),
    };
    let bytes = std::fs::read(path).map_err(|e| {
        bad(
            format!("cannot read the data file: {e}"),
            "point train.data at a readable text file, or use `random`",
        )
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let byte = e.as_bytes()[at];
        let line = 1 + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
        bad(
            format!("not UTF-8 text: byte 0x{byte:02x} at byte offset {at} (line {line}) is not valid UTF-8"),
            "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`) and point train.data at the result",
        )
    })
}

/// Tokens in the (train, validation) splits of a stream of `n` tokens: the first 90%
/// trains, the rest validates.
pub fn split_lens(n: usize) -> (usize, usize) {
    let cut = n * 9 / 10;
    (cut, n - cut)
}

/// Where tokens come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    Chars { path: PathBuf, vocab: CharVocab },
    Random { vocab: usize },
}

/// Train or validation split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// Length of the generated random-token stream.
pub const RANDOM_TOKENS: usize = 1 << 16;

impl DataSource {
    /// Bytes of tokens every rank holds once the dataset is loaded (int64 ids of both
    /// splits).
    pub fn resident_bytes(&self) -> u64 {
        8 * match self {
            DataSource::Chars { vocab, .. } => vocab.len_tokens,
            DataSource::Random { .. } => RANDOM_TOKENS,
        } as u64
    }
}

/// Token streams for both splits.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub vocab: usize,
    train: Vec<i64>,
    val: Vec<i64>,
    seed: u64,
}

impl Dataset {
    /// Loads (or generates) the tokens; `seed` keys both random data and sampling.
    pub fn load(source: &DataSource, seed: u64) -> Result<Dataset> {
        let (tokens, vocab) = match source {
            DataSource::Chars { path, vocab } => {
                let text = read_text(path)?;
                let tokens: Vec<i64> = text
                    .chars()
                    .map(|c| vocab.chars.binary_search(&c).map(|i| i as i64).unwrap_or(0))
                    .collect();
                (tokens, vocab.chars.len())
            }
            DataSource::Random { vocab } => {
                let mut rng = Rng::from_key(&[seed, 0x7a6e]);
                let tokens = (0..RANDOM_TOKENS)
                    .map(|_| rng.below(*vocab as u64) as i64)
                    .collect();
                (tokens, *vocab)
            }
        };
        let (cut, _) = split_lens(tokens.len());
        Ok(Dataset {
            vocab,
            val: tokens[cut..].to_vec(),
            train: tokens[..cut].to_vec(),
            seed,
        })
    }

    fn split(&self, split: Split) -> &[i64] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Inputs and targets (each `rows * seq_len`, row-major) for global rows
    /// `first_row..first_row + rows` of `step`. Targets are inputs shifted by one.
    pub fn batch(
        &self,
        split: Split,
        step: u64,
        first_row: usize,
        rows: usize,
        seq_len: usize,
    ) -> (Vec<i64>, Vec<i64>) {
        let data = self.split(split);
        let span = data.len().saturating_sub(seq_len + 1).max(1) as u64;
        let mut inputs = Vec::with_capacity(rows * seq_len);
        let mut targets = Vec::with_capacity(rows * seq_len);
        for row in first_row..first_row + rows {
            let mut rng = Rng::from_key(&[self.seed, split as u64, step, row as u64]);
            let start = rng.below(span) as usize;
            inputs.extend_from_slice(&data[start..start + seq_len]);
            targets.extend_from_slice(&data[start + 1..start + seq_len + 1]);
        }
        (inputs, targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_deterministic_and_shifted() {
        let d = Dataset::load(&DataSource::Random { vocab: 50 }, 3).unwrap();
        let (x, y) = d.batch(Split::Train, 5, 8, 4, 16);
        assert_eq!(x.len(), 64);
        assert_eq!((x.clone(), y.clone()), d.batch(Split::Train, 5, 8, 4, 16));
        // Rows are independent of how the batch is cut into microbatches.
        let (x2, _) = d.batch(Split::Train, 5, 10, 2, 16);
        assert_eq!(&x[32..], &x2[..]);
        assert_eq!(&x[1..16], &y[..15]);
        assert_ne!(x, d.batch(Split::Train, 6, 8, 4, 16).0);
        assert!(x.iter().all(|&t| (0..50).contains(&t)));
    }

    #[test]
    fn char_vocab_is_sorted_and_distinct() {
        let v = CharVocab::from_text("hello world");
        assert_eq!(v.chars, vec![' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        assert_eq!(v.len_tokens, 11);
    }
}
