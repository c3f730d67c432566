//! The partitioner's one error type. Every variant carries the numbers a user needs to
//! fix the input, and its message names the config field and the remedy.

use thiserror::Error;

/// Errors from building graphs, plans and schedules.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// A model dimension is unusable (zero, or not divisible as required).
    #[error("model.{field} = {value}: {reason}; fix: {fix}")]
    BadModel {
        field: &'static str,
        value: usize,
        reason: String,
        fix: String,
    },
    /// More pipeline stages than transformer blocks.
    #[error(
        "parallel.pp = {pp} exceeds model.n_layers = {n_layers}: every stage needs at least \
         one transformer block; fix: set parallel.pp to at most {n_layers}"
    )]
    TooManyStages { pp: usize, n_layers: usize },
    /// A count that must be positive is not.
    #[error("{field} = {value}: must be at least 1; fix: set {field} to a positive integer")]
    NotPositive { field: &'static str, value: i64 },
    /// A schedule failed validation; `grid` shows the rank × step table with the bad cell
    /// marked.
    #[error("invalid {schedule} schedule: {reason}\n{grid}")]
    InvalidSchedule {
        schedule: String,
        reason: String,
        grid: String,
    },
    /// A schedule deadlocks when simulated.
    #[error("{schedule} schedule deadlocks: {reason}\n{grid}")]
    Deadlock {
        schedule: String,
        reason: String,
        grid: String,
    },
    /// An action string (like `1F3`) could not be parsed.
    #[error("cannot parse schedule action `{text}`: {reason}")]
    ParseAction { text: String, reason: String },
}

/// Result alias for the partitioner.
pub type Result<T> = std::result::Result<T, Error>;
