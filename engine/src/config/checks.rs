//! Checks of a config against the machine, made before any rank starts: the output
//! directory can be written, each data split holds at least one window, and the plan's
//! memory fits the host.
//!
//! Invariant: every failure is a user error (exit code 2) whose one line names the field,
//! says by how much it is off where that is a number, and gives the fix.

use super::Config;
use crate::data::{split_lens, DataSource, RANDOM_TOKENS};
use crate::error::Result;
use partitioner::plan::bytes;
use partitioner::Plan;
use std::path::Path;

impl Config {
    /// `output.dir` is a directory (or can be created as one) that this process can write.
    pub(super) fn check_output_dir(&self) -> Result<()> {
        self.check_writable_dir("output.dir", &self.output_dir())
    }

    /// `dir` (the value of `field`) is a directory, or can be created as one, that this
    /// process can write. Creates nothing but a probe file, removed at once, in the
    /// nearest existing ancestor.
    pub(crate) fn check_writable_dir(&self, field: &str, dir: &Path) -> Result<()> {
        let mut existing: &Path = dir;
        loop {
            match std::fs::metadata(existing) {
                Ok(m) if m.is_dir() => break,
                Ok(_) => {
                    return Err(self.field_error(
                        field,
                        format!("{} is a file, not a directory", existing.display()),
                        format!(
                        "point {field} at a directory (it is created if missing), e.g. runs/<name>"
                    ),
                    ))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    existing = existing.parent().unwrap_or(Path::new("/"));
                }
                Err(e) => {
                    return Err(self.field_error(
                        field,
                        format!("cannot inspect {}: {e}", existing.display()),
                        format!("choose a {field} you can write, e.g. runs/<name>"),
                    ))
                }
            }
        }
        let probe = existing.join(format!(".strata-write-test-{}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(self.field_error(
                field,
                format!(
                    "{} cannot be created: {} is not writable ({e})",
                    dir.display(),
                    existing.display()
                ),
                format!("choose a writable {field}, e.g. runs/<name> under the directory you launch from"),
            )),
        }
    }

    /// Each split (train: the first 90%, validation: the last 10%) holds at least one
    /// window of `model.seq_len + 1` tokens.
    pub(super) fn check_split_windows(&self, source: &DataSource) -> Result<()> {
        let need = *self.model.seq_len + 1;
        let (n, what) = match source {
            DataSource::Chars { path, vocab } => (
                vocab.len_tokens,
                format!("{} has {} characters", path.display(), vocab.len_tokens),
            ),
            DataSource::Random { .. } => (
                RANDOM_TOKENS,
                format!("random data has {RANDOM_TOKENS} tokens"),
            ),
        };
        let (train, val) = split_lens(n);
        if train >= need && val >= need {
            return Ok(());
        }
        let (split, len) = if val < need {
            ("validation split (last 10%)", val)
        } else {
            ("training split (first 90%)", train)
        };
        let largest = train.min(val).saturating_sub(1);
        let seq_fix = if largest >= 1 {
            format!("lower model.seq_len to at most {largest}")
        } else {
            "use more data".to_string()
        };
        match source {
            DataSource::Chars { .. } => Err(self.field_error(
                "train.data",
                format!(
                    "{what}: its {split} has {len}, fewer than one window of model.seq_len + 1 = {need}"
                ),
                format!(
                    "use a file of at least {} characters, or {seq_fix}",
                    min_tokens(need)
                ),
            )),
            DataSource::Random { .. } => Err(self.field_error(
                "model.seq_len",
                format!(
                    "{} is too long for {what}: its {split} has {len}, fewer than one window of seq_len + 1 = {need}",
                    *self.model.seq_len
                ),
                format!("{seq_fix}, or train on a text file (train.data)"),
            )),
        }
    }

    /// The plan's memory for the `ranks_on_host` ranks that share this machine fits its
    /// memory (MemTotal in /proc/meminfo). With every rank of the job on this host the
    /// need is exact per rank; with a subset, each counts as the largest rank.
    /// Does nothing where /proc/meminfo is missing.
    pub fn check_host_memory(&self, plan: &Plan, ranks_on_host: usize) -> Result<()> {
        let Some(have) = mem_total_bytes() else {
            return Ok(());
        };
        let per_pp_rank = plan.rank_memory_bytes();
        let (peak_rank, peak) = per_pp_rank
            .iter()
            .copied()
            .enumerate()
            .max_by_key(|&(_, m)| m)
            .unwrap_or((0, 0));
        let replicas = (*self.parallel.tp * *self.parallel.dp) as u64;
        let need = if ranks_on_host >= self.world_size() {
            per_pp_rank.iter().sum::<u64>() * replicas
        } else {
            peak * ranks_on_host as u64
        };
        if need <= have {
            return Ok(());
        }
        let activations: u64 = plan
            .chunks_of(partitioner::Rank(peak_rank))
            .iter()
            .map(|s| s.activation_bytes)
            .sum();
        let problem = format!(
            "the plan needs {} of memory for the {ranks_on_host} ranks on this machine (the largest, pipeline rank {peak_rank}, {}, of which {} activations) but it has {} (MemTotal): {} too much",
            bytes(need),
            bytes(peak),
            bytes(activations),
            bytes(have),
            bytes(need - have)
        );
        let (field, fix) = if activations * 2 > peak {
            (
                format!(
                    "model.seq_len = {} with parallel.micro_batch_size = {}",
                    *self.model.seq_len, *self.parallel.micro_batch_size
                ),
                format!(
                    "lower model.seq_len (attention memory grows with its square) or parallel.micro_batch_size{}",
                    if self.parallel.schedule == "gpipe" {
                        ", or use parallel.schedule: 1f1b (fewer microbatches in flight)"
                    } else {
                        ""
                    }
                ),
            )
        } else {
            (
                format!(
                    "model size ({:.2}B parameters: model.d_model = {}, model.n_layers = {})",
                    plan.total_params as f64 / 1e9,
                    *self.model.d_model,
                    *self.model.n_layers
                ),
                "use a smaller model, or spread the job over more machines (mpirun or srun with `strata worker`)".to_string(),
            )
        };
        Err(self.field_error(&field, problem, fix))
    }
}

/// The smallest stream whose splits both hold `need` tokens.
fn min_tokens(need: usize) -> usize {
    let mut n = 10 * need.saturating_sub(1) + 1;
    while split_lens(n).0 < need || split_lens(n).1 < need {
        n += 1;
    }
    n
}

/// Total memory of this machine (Linux), in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_tokens_is_the_smallest_stream_with_two_full_splits() {
        for need in [1, 2, 17, 65, 1000] {
            let n = min_tokens(need);
            let ok = |n: usize| split_lens(n).0 >= need && split_lens(n).1 >= need;
            assert!(ok(n) && !ok(n - 1), "need {need}: {n}");
        }
    }

    #[test]
    fn meminfo_is_read() {
        if Path::new("/proc/meminfo").exists() {
            assert!(mem_total_bytes().unwrap() > 1 << 20);
        }
    }
}
