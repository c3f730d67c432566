//! The partitioner's one error type. Every variant carries the numbers a user needs to
//! fix the input, and its message is one line naming the config field and the remedy.

use thiserror::Error;

/// Errors from building graphs, plans, meshes, shard plans and schedules.
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
    /// More model chunks (pp · virtual_stages) than transformer blocks.
    #[error(
        "parallel.pp · parallel.virtual_stages = {pp} · {v} = {chunks} exceeds model.n_layers = \
         {n_layers}: every model chunk needs at least one transformer block; fix: lower \
         parallel.virtual_stages to at most {max_v}"
    )]
    TooManyChunks {
        pp: usize,
        v: usize,
        chunks: usize,
        n_layers: usize,
        max_v: usize,
    },
    /// A count that must be positive is not.
    #[error("{field} = {value}: must be at least 1; fix: set {field} to a positive integer")]
    NotPositive { field: &'static str, value: i64 },
    /// A tensor-parallel dimension does not divide.
    #[error(
        "model.{field} = {value} is not divisible by parallel.tp = {tp}: tensor parallelism \
         shards {what} evenly over tp ranks; fix: {fix}"
    )]
    NotDivisibleByTp {
        field: &'static str,
        value: usize,
        tp: usize,
        what: &'static str,
        fix: String,
    },
    /// The world size does not equal pp · tp · dp.
    #[error(
        "world size {world} != parallel.pp · parallel.tp · parallel.dp = {pp} · {tp} · {dp} = \
         {product}; fix: launch {product} ranks, or change pp/tp/dp so that their product is \
         {world}"
    )]
    WorldMismatch {
        world: usize,
        pp: usize,
        tp: usize,
        dp: usize,
        product: usize,
    },
    /// A rank or coordinate lies outside the mesh.
    #[error("{what} is outside the mesh pp = {pp}, tp = {tp}, dp = {dp} (world {world})")]
    OutsideMesh {
        what: String,
        pp: usize,
        tp: usize,
        dp: usize,
        world: usize,
    },
    /// No contiguous split keeps every stage under the memory cap.
    #[error(
        "parallel.memory_gib = {cap_gib:.2} ({cap_bytes} bytes) is too small: stage {stage} \
         needs at least {need_bytes} bytes ({need_gib:.2} GiB: {detail}) in the best split; \
         fix: {remedy}"
    )]
    MemoryCapTooSmall {
        stage: usize,
        need_bytes: u64,
        need_gib: f64,
        cap_bytes: u64,
        cap_gib: f64,
        detail: String,
        remedy: String,
    },
    /// A config value is out of range or of the wrong kind.
    #[error("{field} = {value}: {reason}; fix: {fix}")]
    BadValue {
        field: &'static str,
        value: String,
        reason: String,
        fix: String,
    },
    /// A measured profile does not fit the model being planned.
    #[error("profile {path}: {reason}; fix: {fix}")]
    BadProfile {
        path: String,
        reason: String,
        fix: String,
    },
    /// The auto-planner found no layout.
    #[error("auto-planner: no layout of world {world} fits: {reasons}; fix: {fix}")]
    NoLayout {
        world: usize,
        reasons: String,
        fix: String,
    },
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
