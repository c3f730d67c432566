//! Diagnostics through `tracing`: one line per event on stderr, prefixed with who speaks
//! (`strata:` for the launcher, `strata rank 3:` for a worker) and the level unless it is
//! INFO, filtered by `RUST_LOG` (default `info`; e.g. `RUST_LOG=debug`,
//! `RUST_LOG=strata::progress=warn`).
//!
//! Invariant: installed once per process, before the first event; bad-input errors are not
//! tracing events (main prints them as the single `strata: error: …` line).

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Formats `strata rank R: [level: ]message key=value…`.
struct RankFormat {
    prefix: String,
}

impl<S, N> FormatEvent<S, N> for RankFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}: ", self.prefix)?;
        match *event.metadata().level() {
            Level::INFO => {}
            Level::WARN => write!(writer, "warning: ")?,
            level => write!(writer, "{}: ", level.as_str().to_lowercase())?,
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// stderr that never fails: a closed stderr (a pipe whose reader went away) must not turn
/// a diagnostic into a panic that leaves the job unsupervised.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Installs the subscriber; `rank` is None in the launcher.
pub fn init(rank: Option<usize>) {
    let prefix = match rank {
        None => "strata".to_string(),
        Some(r) => format!("strata rank {r}"),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .event_format(RankFormat { prefix })
        .try_init();
}
