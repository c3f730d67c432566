//! `strata launch`: validates the config up front (so bad input fails fast with exit
//! code 2 instead of inside N ranks), then runs `mpiexec -n <world> strata worker` with the
//! ranks' output streamed straight through, and turns a failed job into exit code 1.

use engine::Config;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

/// Errors of the `strata` command.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("`{0}` not found on PATH; fix: install MPI (scripts/setup.sh installs mpich) or pass --mpiexec /path/to/mpiexec")]
    MpiexecMissing(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the job failed: mpiexec exited with {status} (the failing rank's error is above)")]
    JobFailed { status: String },
}

impl LaunchError {
    /// 2 for bad input, 1 for run-time failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Engine(e) if e.is_user_error() => 2,
            LaunchError::MpiexecMissing(_) => 2,
            _ => 1,
        }
    }
}

/// Looks `program` up like a shell: a path with a slash is taken as is, else PATH.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Runs the config on this machine under mpiexec.
pub fn launch(config: &Path, mpiexec: Option<&Path>) -> Result<(), LaunchError> {
    let cfg = Config::load(config)?;
    // A damaged checkpoint is bad input: refuse it (exit 2) before any rank starts.
    if let Some(dir) = cfg.resume_from()? {
        let r = engine::checkpoint::verify(&dir)?;
        eprintln!(
            "strata: resuming from {} (step {}, {} files verified)",
            r.dir.display(),
            r.step,
            r.files
        );
    }
    let requested = mpiexec.unwrap_or(Path::new("mpiexec"));
    let program = find_program(requested)
        .ok_or_else(|| LaunchError::MpiexecMissing(requested.display().to_string()))?;
    let me = std::env::current_exe().map_err(|source| LaunchError::Spawn {
        program: "strata (current executable)".into(),
        source,
    })?;
    let config_abs = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    let world = cfg.world_size();
    eprintln!(
        "strata: launching {world} ranks: {} -n {world} {} worker --config {}",
        program.display(),
        me.display(),
        config_abs.display()
    );
    let status = Command::new(&program)
        .arg("-n")
        .arg(world.to_string())
        .arg(&me)
        .arg("worker")
        .arg("--config")
        .arg(&config_abs)
        .status()
        .map_err(|source| LaunchError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    if status.success() {
        eprintln!("strata: run directory {}", cfg.output_dir().display());
        Ok(())
    } else {
        Err(LaunchError::JobFailed {
            status: status.to_string(),
        })
    }
}
