//! Diagnostics through `tracing`: warnings, notes and progress details of the library go to
//! stderr as `warning: …` / plain lines. The user-facing tables and progress bars are printed
//! by the commands themselves. `WUKONG_LOG=error|warn|info|debug|trace` sets the level (info).

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// One line per event, prefixed by its level when that is not plain information.
struct Lines;

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(w, "error: ")?,
            Level::WARN => write!(w, "warning: ")?,
            Level::INFO => {}
            _ => write!(w, "{}: ", event.metadata().target())?,
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Installs the stderr subscriber (the binary calls this once; a second call does nothing).
pub fn init() {
    let level = match std::env::var("WUKONG_LOG").unwrap_or_default().to_ascii_lowercase().as_str() {
        "error" => Level::ERROR,
        "warn" | "warning" => Level::WARN,
        "debug" => Level::DEBUG,
        "trace" => Level::TRACE,
        _ => Level::INFO,
    };
    let _ = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).event_format(Lines).try_init();
}
