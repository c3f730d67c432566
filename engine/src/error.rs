//! The engine's one error type. User-input problems (config, data, flags) are separate
//! variants from runtime failures so that the launcher can map them to exit code 2, and
//! each message is one line naming the field and the fix.

use partitioner::Rank;
use std::path::PathBuf;
use thiserror::Error;

/// Errors from configuring, planning and running a job.
#[derive(Debug, Error)]
pub enum Error {
    /// The YAML file does not parse.
    #[error("{path}: YAML syntax error at line {line}, column {column}: {message}; fix: correct the YAML at that line (indentation, `key: value`, quoting)")]
    ConfigSyntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A config field is missing, unknown, mistyped or has a bad value.
    #[error("{path}: {field}: {problem}; fix: {fix}")]
    Config {
        path: String,
        field: String,
        problem: String,
        fix: String,
    },
    /// The model or layout cannot be planned (the message names the field).
    #[error("{path}: {source}")]
    Plan {
        path: String,
        #[source]
        source: partitioner::Error,
    },
    /// A Hugging Face model directory (config.json, safetensors, vocab.json) that Strata
    /// cannot read or that disagrees with the Strata config; `field` names the HF field,
    /// tensor or file.
    #[error("{path}: {field}: {problem}; fix: {fix}")]
    Hf {
        path: String,
        field: String,
        problem: String,
        fix: String,
    },
    /// A command-line flag or its input (a prompt, a sparsity, a scheme) is unusable;
    /// `flag` names it.
    #[error("{flag}: {problem}; fix: {fix}")]
    Usage {
        flag: String,
        problem: String,
        fix: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A libtorch call failed.
    #[error("libtorch error in {context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    /// A tensor message from another rank did not have the expected header.
    #[error("bad message from rank {from}: expected {expected}, got {got}")]
    Wire {
        from: Rank,
        expected: String,
        got: String,
    },
    /// The transport failed.
    #[error("communication error: {0}")]
    Comm(String),
    /// A broken internal invariant (a schedule bug, a failed serialisation).
    #[error("internal error: {0}")]
    Internal(String),
    /// A wait passed its deadline (`parallel.timeout_s`), or a peer went silent; the
    /// message names the stuck rank, the step, the action and how long it waited.
    #[error("{0}")]
    Stalled(Box<crate::watchdog::Stall>),
    /// Another rank failed, so this one stops.
    #[error("rank {0} failed; stopping")]
    PeerFailed(Rank),
    /// A checkpoint (or the path to one) is missing, truncated, corrupt, or disagrees with
    /// what the run expects. `tensor` is empty when the problem is not about one tensor.
    #[error("{}{}: {problem}; fix: {fix}", path.display(), if tensor.is_empty() { String::new() } else { format!(" (tensor {tensor})") })]
    Checkpoint {
        path: PathBuf,
        tensor: String,
        problem: String,
        fix: String,
    },
    /// A fault injected on purpose (STRATA_FAIL_AT), used to test failure handling.
    #[error("injected failure at step {step} (STRATA_FAIL_AT)")]
    Injected { step: usize },
}

impl Error {
    /// True when the error comes from user input (config, data path, flags, checkpoint):
    /// exit code 2.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::ConfigSyntax { .. }
                | Error::Config { .. }
                | Error::Plan { .. }
                | Error::Hf { .. }
                | Error::Checkpoint { .. }
                | Error::Usage { .. }
        )
    }

    /// A [`Error::Usage`] error.
    pub fn usage(flag: &str, problem: impl Into<String>, fix: impl Into<String>) -> Error {
        Error::Usage {
            flag: flag.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Wraps a libtorch error with what was being done.
    pub fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> Error {
        let context = context.into();
        move |source| Error::Torch { context, source }
    }
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, Error>;
