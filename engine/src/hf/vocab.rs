//! `vocab.json` of an exported model: Strata's character vocabulary as `{char: id}`.
//!
//! Invariant: a vocabulary read back as [`HfVocab::Chars`] has ids `0..n` in character
//! order, which is how [`CharVocab`] numbers tokens, so the same text gives the same ids.

use crate::data::CharVocab;
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// What an HF directory says about its tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum HfVocab {
    /// No `vocab.json`.
    Absent,
    /// A Strata character vocabulary.
    Chars(CharVocab),
    /// Some other tokenizer's vocabulary (GPT-2 BPE, ...).
    Other,
}

/// The `vocab.json` text of `vocab`.
pub fn to_json(vocab: &CharVocab) -> String {
    let map: Map<String, Value> = vocab
        .chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), Value::from(i)))
        .collect();
    Value::Object(map).to_string()
}

/// Reads `dir/vocab.json`, if there is one.
pub fn read(dir: &Path) -> Result<HfVocab> {
    let path = dir.join("vocab.json");
    if !path.is_file() {
        return Ok(HfVocab::Absent);
    }
    let bad = |problem: String| Error::Hf {
        path: path.display().to_string(),
        field: "vocab.json".into(),
        problem,
        fix: "re-export the model, or remove vocab.json".into(),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("is not valid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("is not a JSON object".into()))?;
    let mut pairs = Vec::with_capacity(obj.len());
    for (token, id) in obj {
        let mut chars = token.chars();
        match (chars.next(), chars.next(), id.as_u64()) {
            (Some(c), None, Some(id)) => pairs.push((id as usize, c)),
            _ => return Ok(HfVocab::Other),
        }
    }
    pairs.sort();
    let ordered = pairs.iter().enumerate().all(|(i, &(id, _))| id == i)
        && pairs.windows(2).all(|w| w[0].1 < w[1].1);
    if !ordered {
        return Ok(HfVocab::Other);
    }
    Ok(HfVocab::Chars(CharVocab {
        chars: pairs.into_iter().map(|(_, c)| c).collect(),
        len_tokens: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_vocab_round_trips() {
        let dir = std::env::temp_dir().join(format!("strata-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(read(&dir).unwrap(), HfVocab::Absent);
        let v = CharVocab::from_text("hello, \"world\"\n");
        std::fs::write(dir.join("vocab.json"), to_json(&v)).unwrap();
        let HfVocab::Chars(back) = read(&dir).unwrap() else {
            panic!("not chars")
        };
        assert_eq!(back.chars, v.chars);
        std::fs::write(dir.join("vocab.json"), r#"{"hello": 0, "a": 1}"#).unwrap();
        assert_eq!(read(&dir).unwrap(), HfVocab::Other);
        std::fs::write(dir.join("vocab.json"), "[").unwrap();
        assert!(read(&dir)
            .unwrap_err()
            .to_string()
            .contains("vocab.json: is not valid JSON"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
