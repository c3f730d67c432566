//! From a YAML file (plus `--set KEY=VALUE` overrides) to an unvalidated [`Config`]:
//! reading the file, applying the overrides to the YAML tree, and deserialising with
//! unknown keys and bad types reported as one-line errors that name the field and the fix.
//!
//! Invariants: overrides are applied to the YAML tree *before* deserialisation, so a value
//! given with `--set` meets exactly the checks (and error messages) of the same value in
//! the file; an error caused by an override says which `--set` it came from.

use super::Config;
use crate::error::{Error, Result};
use serde_yaml::{Mapping, Value};
use std::path::Path;

/// One `--set KEY=VALUE` override: a dotted key path into the config (`train.steps`) and
/// a YAML value (`100`, `1.0e-3`, `runs/x`, `{device_tflops: 50}`).
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// The key path, e.g. `["train", "steps"]`.
    pub key: Vec<String>,
    /// The value as written after `=`.
    pub value: String,
}

impl Override {
    /// Parses `KEY=VALUE`; the error is a one-line message naming the flag and the fix.
    pub fn parse(text: &str) -> Result<Override> {
        let bad = |problem: String| Error::Config {
            path: "command line".into(),
            field: format!("--set {text}"),
            problem,
            fix: "write --set KEY=VALUE with a dotted key, e.g. --set train.steps=100".into(),
        };
        let Some((key, value)) = text.split_once('=') else {
            return Err(bad("no `=` between the key and the value".into()));
        };
        let key: Vec<String> = key
            .trim()
            .split('.')
            .map(|s| s.trim().to_string())
            .collect();
        if key.iter().any(String::is_empty) {
            return Err(bad("the key has an empty part".into()));
        }
        Ok(Override {
            key,
            value: value.to_string(),
        })
    }

    /// `train.steps`.
    pub fn dotted(&self) -> String {
        self.key.join(".")
    }

    /// `train.steps=100`, as given on the command line.
    pub fn as_arg(&self) -> String {
        format!("{}={}", self.dotted(), self.value)
    }

    /// The value as YAML (`100` is a number, `runs/x` a string, empty is null).
    fn yaml_value(&self, path: &str) -> Result<Value> {
        serde_yaml::from_str(&self.value).map_err(|e| Error::Config {
            path: path.into(),
            field: format!("--set {}", self.as_arg()),
            problem: format!(
                "the value is not valid YAML: {}",
                first_line(&e.to_string())
            ),
            fix: "quote the value, e.g. --set 'output.dir=\"runs/a b\"'".into(),
        })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Sets every override in `tree`, creating missing sections on the way.
pub(super) fn apply(tree: &mut Value, overrides: &[Override], path: &str) -> Result<()> {
    for o in overrides {
        let value = o.yaml_value(path)?;
        let mut node = &mut *tree;
        for (depth, part) in o.key.iter().enumerate() {
            if node.is_null() {
                *node = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(map) = node else {
                return Err(Error::Config {
                    path: path.into(),
                    field: format!("--set {}", o.as_arg()),
                    problem: format!(
                        "`{}` is a value, not a section with keys",
                        o.key[..depth].join(".")
                    ),
                    fix: format!(
                        "set `{}` itself, or check the key against configs/README.md",
                        o.key[..depth].join(".")
                    ),
                });
            };
            node = map
                .entry(Value::String(part.clone()))
                .or_insert(Value::Null);
        }
        *node = value;
    }
    Ok(())
}

/// Reads a config file; a missing or unreadable file is a user error.
pub(super) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Config {
        path: path.display().to_string(),
        field: "(file)".into(),
        problem: format!("cannot read the config: {e}"),
        fix: "pass the path of an existing YAML file, e.g. configs/demo.yaml".into(),
    })
}

/// Parses YAML `text` read from `path`, applies `overrides`, and deserialises it (unknown
/// keys and bad types rejected) without validating values.
pub(super) fn deserialize(text: &str, path: &Path, overrides: &[Override]) -> Result<Config> {
    let shown = path.display().to_string();
    let mut cfg: Config = if overrides.is_empty() {
        // Straight from the text, so that errors carry their line and column.
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| map_error(e, &shown, overrides))?
    } else {
        let mut tree: Value = serde_yaml::from_str(text).map_err(|e| syntax_error(e, &shown))?;
        apply(&mut tree, overrides, &shown)?;
        serde_path_to_error::deserialize(tree).map_err(|e| map_error(e, &shown, overrides))?
    };
    cfg.source = path.to_path_buf();
    Ok(cfg)
}

fn syntax_error(e: serde_yaml::Error, shown: &str) -> Error {
    let loc = e.location();
    let msg = e.to_string();
    let msg = msg.find(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
    Error::ConfigSyntax {
        path: shown.to_string(),
        line: loc.as_ref().map_or(0, |l| l.line()),
        column: loc.as_ref().map_or(0, |l| l.column()),
        message: msg.to_string(),
    }
}

/// Turns a deserialisation error into a one-line error naming the field and the fix; if
/// an override set that field (or a section above it), says so.
fn map_error(
    e: serde_path_to_error::Error<serde_yaml::Error>,
    shown: &str,
    overrides: &[Override],
) -> Error {
    let field = e.path().to_string();
    let inner = e.into_inner();
    let loc = inner.location();
    let msg = inner.to_string();
    // serde_yaml prefixes its own (coarser) path and appends " at line L column C".
    let msg = msg.find(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
    const SEMANTIC: [&str; 7] = [
        "unknown field",
        "missing field",
        "invalid type",
        "invalid value",
        "unknown variant",
        "duplicate field",
        "must be",
    ];
    let Some(start) = SEMANTIC.iter().filter_map(|m| msg.find(m)).min() else {
        return syntax_error(inner, shown);
    };
    let problem = &msg[start..];
    let field = if field == "." {
        "(top level)".to_string()
    } else {
        field
    };
    let (problem, fix) = match problem.split_once("; fix: ") {
        Some((p, f)) => (p.to_string(), f.to_string()),
        None if problem.starts_with("unknown field") => (
            problem.to_string(),
            "remove or rename the key; configs/README.md lists every key".to_string(),
        ),
        None if problem.starts_with("missing field") => (
            problem.to_string(),
            "add the key; configs/README.md lists every key and its meaning".to_string(),
        ),
        None if problem.starts_with("must be a positive integer") => {
            (problem.to_string(), format!("set {field} to 1 or more"))
        }
        None => (
            problem.to_string(),
            format!("give {field} the type shown in configs/README.md"),
        ),
    };
    let problem = match loc {
        Some(l) => format!("{problem} (line {}, column {})", l.line(), l.column()),
        None => problem,
    };
    let problem = match culprit(&field, &problem, overrides) {
        Some(o) => format!("{problem} (from --set {})", o.as_arg()),
        None => problem,
    };
    Error::Config {
        path: shown.to_string(),
        field,
        problem,
        fix,
    }
}

/// The override that caused an error at `field`: one that set the field, a section above
/// it, or (for an unknown key) a key below it.
fn culprit<'a>(field: &str, problem: &str, overrides: &'a [Override]) -> Option<&'a Override> {
    let unknown = problem
        .strip_prefix("unknown field `")
        .and_then(|s| s.split('`').next());
    overrides.iter().rev().find(|o| {
        let key = o.dotted();
        let full = match unknown {
            Some(name) if field == "(top level)" => name.to_string(),
            Some(name) => format!("{field}.{name}"),
            None => field.to_string(),
        };
        full == key || full.starts_with(&format!("{key}.")) || key.starts_with(&format!("{full}."))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ov(s: &str) -> Override {
        Override::parse(s).unwrap()
    }

    #[test]
    fn overrides_set_nested_keys_with_yaml_types() {
        let mut tree: Value = serde_yaml::from_str("train: {steps: 3, lr: 0.1}").unwrap();
        let sets = [
            ov("train.steps=100"),
            ov("train.data=runs/x"),
            ov("parallel.hardware.device_tflops=50"),
        ];
        apply(&mut tree, &sets, "x.yaml").unwrap();
        assert_eq!(tree["train"]["steps"], Value::from(100));
        assert_eq!(tree["train"]["lr"], Value::from(0.1));
        assert_eq!(tree["train"]["data"], Value::from("runs/x"));
        assert_eq!(
            tree["parallel"]["hardware"]["device_tflops"],
            Value::from(50)
        );
    }

    #[test]
    fn malformed_overrides_name_the_flag() {
        for bad in ["train.steps", "=3", "train..steps=3", "train.=1"] {
            let e = Override::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--set") && e.contains("fix:"), "{e}");
        }
        let mut tree: Value = serde_yaml::from_str("train: {steps: 3}").unwrap();
        let e = apply(&mut tree, &[ov("train.steps.x=1")], "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`train.steps` is a value"), "{e}");
        let e = apply(&mut tree, &[ov("train.steps=[1")], "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid YAML"), "{e}");
    }
}
