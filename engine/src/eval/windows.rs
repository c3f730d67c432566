//! Evaluation windows: a token stream cut into consecutive, non-overlapping windows of
//! `seq_len + 1` tokens; a window's inputs are its first `seq_len` tokens and its targets
//! the last `seq_len` (the inputs shifted by one). A trailing partial window is dropped.
//!
//! Invariant: windows are numbered in stream order, so every layout and every reference
//! (transformers) sees the same rows.

use crate::data::CharVocab;
use crate::error::{Error, Result};
use std::path::Path;

/// The windows of one token stream, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Windows {
    pub seq_len: usize,
    inputs: Vec<i64>,
    targets: Vec<i64>,
}

impl Windows {
    /// Cuts `tokens` into windows of `seq_len + 1`.
    pub fn from_tokens(tokens: &[i64], seq_len: usize) -> Windows {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for w in tokens.chunks_exact(seq_len + 1) {
            inputs.extend_from_slice(&w[..seq_len]);
            targets.extend_from_slice(&w[1..]);
        }
        Windows {
            seq_len,
            inputs,
            targets,
        }
    }

    /// Number of windows.
    pub fn count(&self) -> usize {
        self.inputs.len() / self.seq_len.max(1)
    }

    /// Number of predicted tokens (windows · seq_len).
    pub fn tokens(&self) -> usize {
        self.inputs.len()
    }

    /// Inputs and targets of windows `first .. first + n`, row-major.
    pub fn rows(&self, first: usize, n: usize) -> (&[i64], &[i64]) {
        let r = first * self.seq_len..(first + n) * self.seq_len;
        (&self.inputs[r.clone()], &self.targets[r])
    }
}

/// Token ids of `text` (read from `path`) under `vocab`; a character outside it is
/// refused by name and position.
pub fn encode(text: &str, vocab: &CharVocab, path: &Path) -> Result<Vec<i64>> {
    text.chars()
        .enumerate()
        .map(|(i, c)| {
            vocab
                .chars
                .binary_search(&c)
                .map(|id| id as i64)
                .map_err(|_| Error::Config {
                    path: path.display().to_string(),
                    field: "--data".into(),
                    problem: format!(
                        "the character {c:?} at position {i} is not in the model's vocabulary of {} characters",
                        vocab.chars.len()
                    ),
                    fix: "evaluate on text written in the characters the model was trained on".into(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_consecutive_and_shifted() {
        let w = Windows::from_tokens(&(0..11).collect::<Vec<i64>>(), 4);
        assert_eq!((w.count(), w.tokens()), (2, 8));
        assert_eq!(w.rows(0, 1), (&[0, 1, 2, 3][..], &[1, 2, 3, 4][..]));
        assert_eq!(w.rows(1, 1), (&[5, 6, 7, 8][..], &[6, 7, 8, 9][..]));
    }

    #[test]
    fn unknown_characters_are_refused() {
        let v = CharVocab::from_text("abc");
        assert_eq!(encode("cab", &v, Path::new("d.txt")).unwrap(), [2, 0, 1]);
        let e = encode("abz", &v, Path::new("d.txt")).unwrap_err();
        assert!(e.is_user_error());
        assert!(e.to_string().contains("'z' at position 2"), "{e}");
    }
}
