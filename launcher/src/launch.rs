//! `strata launch`: validates the config (with its `--set` overrides) and the machine up
//! front, so bad input fails fast with exit code 2 instead of inside N ranks; then runs
//! `mpiexec -n <world> strata worker --config … --set …` with the ranks' output streamed
//! straight through (supervised: signals forwarded, see [`crate::supervise`]), and turns
//! a failed job into exit code 1, or 128 + the signal's number if a signal stopped it.

use engine::config::Override;
use engine::Config;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
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
    #[error("the job stopped after {}: mpiexec exited with {status}", crate::supervise::signal_name(*signal))]
    Interrupted { signal: i32, status: String },
    /// A bad environment variable (the message names it and the fix).
    #[error("{0}")]
    Env(String),
}

impl LaunchError {
    /// 2 for bad input, 1 for run-time failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            LaunchError::Engine(e) if e.is_user_error() => 2,
            LaunchError::MpiexecMissing(_) | LaunchError::Env(_) => 2,
            // The shell convention for a job ended by a signal: 128 + its number.
            LaunchError::Interrupted { signal, .. } => 128 + *signal as u8,
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

/// `mpiexec -n <world> <this strata> <subcommand>`, ready for the subcommand's own
/// arguments: how every multi-rank verb starts its ranks. `requested` is the `--mpiexec`
/// flag (default `mpiexec` on PATH). Returns the command and the mpiexec it runs. The
/// transport's environment variables (`STRATA_WAIT`, `STRATA_P2P_FOLD`), which every rank
/// inherits, are checked here, so a bad one is refused before any rank starts.
pub(crate) fn mpiexec_command(
    requested: Option<&Path>,
    world: usize,
    subcommand: &str,
) -> Result<(Command, PathBuf), LaunchError> {
    engine::comm::wait::WaitPolicy::from_env()?;
    engine::comm::fold::Fold::from_env()?;
    let requested = requested.unwrap_or(Path::new("mpiexec"));
    let program = find_program(requested)
        .ok_or_else(|| LaunchError::MpiexecMissing(requested.display().to_string()))?;
    let me = std::env::current_exe().map_err(|source| LaunchError::Spawn {
        program: "strata (current executable)".into(),
        source,
    })?;
    let mut cmd = Command::new(&program);
    cmd.arg("-n").arg(world.to_string()).arg(me).arg(subcommand);
    Ok((cmd, program))
}

/// Runs a command from [`mpiexec_command`] to its end; a job that fails is
/// [`LaunchError::JobFailed`] with `what` (or its exit status when `what` is empty).
pub(crate) fn run_job(mut cmd: Command, program: &Path, what: &str) -> Result<(), LaunchError> {
    let status = cmd.status().map_err(|source| LaunchError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    match status.success() {
        true => Ok(()),
        false if what.is_empty() => Err(LaunchError::JobFailed {
            status: status.to_string(),
        }),
        false => Err(LaunchError::JobFailed {
            status: what.to_string(),
        }),
    }
}

/// What `strata launch` was asked for.
pub struct LaunchArgs<'a> {
    pub config: &'a Path,
    pub overrides: &'a [Override],
    pub mpiexec: Option<&'a Path>,
    /// How long the job has to exit after a second SIGTERM or SIGINT.
    pub grace: Duration,
}

/// The width of the terminal on stderr.
fn terminal_columns() -> Option<u16> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(size.ws_col)
}

/// Runs the config on this machine under mpiexec. Everything that can be checked before
/// the ranks start is checked here: the config, `STRATA_FAIL_AT`, mpiexec, and the plan's
/// memory against this machine's (all ranks run here).
pub fn launch(args: &LaunchArgs) -> Result<(), LaunchError> {
    let cfg = Config::load_with(args.config, args.overrides)?;
    if let Ok(v) = std::env::var("STRATA_FAIL_AT") {
        let rank = crate::worker::parse_fail_at(&v)
            .map_err(LaunchError::Env)?
            .rank;
        if rank.0 >= cfg.world_size() {
            return Err(LaunchError::Env(format!(
                "STRATA_FAIL_AT = `{v}`: rank {rank} is outside this job's {} ranks; fix: name a rank below {}, or unset it",
                cfg.world_size(),
                cfg.world_size()
            )));
        }
    }
    cfg.check_host_memory(&cfg.plan()?, cfg.world_size())?;
    // A damaged checkpoint is bad input: refuse it (exit 2) before any rank starts.
    if let Some(dir) = cfg.resume_from()? {
        let r = engine::checkpoint::verify(&dir)?;
        tracing::info!(
            "resuming from {} (step {}, {} files verified)",
            r.dir.display(),
            r.step,
            r.files
        );
    }
    let config_abs = std::path::absolute(args.config).unwrap_or_else(|_| args.config.to_path_buf());
    let world = cfg.world_size();
    let (mut cmd, program) = mpiexec_command(args.mpiexec, world, "worker")?;
    cmd.arg("--config").arg(&config_abs);
    for o in args.overrides {
        cmd.arg("--set").arg(o.as_arg());
    }
    // The ranks' stderr is a pipe to mpiexec: tell rank 0 to draw its progress bar on
    // ours when ours is a terminal, and how wide it is.
    if std::io::stderr().is_terminal() && std::env::var_os("STRATA_PROGRESS").is_none() {
        cmd.env("STRATA_PROGRESS", "bar");
        if let (None, Some(cols)) = (std::env::var_os("COLUMNS"), terminal_columns()) {
            cmd.env("COLUMNS", cols.to_string());
        }
    }
    tracing::info!(
        "launching {world} ranks: {} {}",
        program.display(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let end = crate::supervise::run_job(cmd, args.grace)?;
    match (end.status.success(), end.signal) {
        (true, _) => {
            tracing::info!("run directory {}", cfg.output_dir().display());
            Ok(())
        }
        (false, Some(signal)) => Err(LaunchError::Interrupted {
            signal,
            status: end.status.to_string(),
        }),
        (false, None) => Err(LaunchError::JobFailed {
            status: end.status.to_string(),
        }),
    }
}
