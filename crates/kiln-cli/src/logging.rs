//! Messages through `tracing` (kiln's libraries warn through it: a kernel cache
//! that cannot be written, a tokenizer id out of range): shown on stderr as
//! `kiln: warning: ...`, warnings and errors by default, debug messages too with
//! `-v`, or what `RUST_LOG` selects (`RUST_LOG=error` silences warnings,
//! `RUST_LOG=kiln_cuda=debug` shows one crate's debug messages).

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Installs the subscriber: `RUST_LOG` when it is set and valid, else warnings
/// (with `verbose`, debug messages).
pub fn init(verbose: bool) {
    let (default, shown) = if verbose {
        ("debug", "debug messages and warnings")
    } else {
        ("warn", "warnings")
    };
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::builder().parse(&spec) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default), Some((spec, e))),
        },
        _ => (EnvFilter::new(default), None),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .event_format(Plain)
        .with_env_filter(filter)
        .init();
    if let Some((spec, e)) = bad {
        tracing::warn!("RUST_LOG={spec:?} is not a filter kiln understands ({e}); showing {shown}");
    }
}

/// `kiln: warning: message`, one line per event, no time or target.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
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
        let level = match *event.metadata().level() {
            Level::ERROR => "error: ",
            Level::WARN => "warning: ",
            Level::INFO => "",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        write!(writer, "kiln: {level}")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
