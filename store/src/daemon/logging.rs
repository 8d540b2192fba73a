//! Log set-up shared by vmbackup's daemons, filtered by `RUST_LOG` (default: the configured
//! level). Where the lines go follows `format`: `auto` sends structured entries to journald
//! when systemd connected stderr to the journal (`JOURNAL_STREAM`), plain text to stderr
//! otherwise (colours only on a terminal); `text` and `json` force those on stderr. The
//! filter can be changed on a running daemon (SIGHUP) through the returned [`LogLevel`].

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;

/// Changes the log filter of a running daemon.
#[derive(Clone)]
pub struct LogLevel(reload::Handle<EnvFilter, tracing_subscriber::Registry>);

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogLevel")
    }
}

impl LogLevel {
    /// Applies `filter` (`info`, `debug`, `vmbackup_agent=debug,info`, ...).
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(filter).map_err(|e| format!("log filter {filter:?}: {e}"))?;
        self.0.reload(f).map_err(|e| e.to_string())
    }
}

/// Installs the global tracing subscriber; `RUST_LOG`, when set, wins over `default`.
/// `format` is `auto`, `text` or `json` (anything else is `auto`).
pub fn init(default: &str, format: &str) -> LogLevel {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let journal = match format {
        "auto" if std::env::var_os("JOURNAL_STREAM").is_some() => tracing_journald::layer().ok(),
        _ => None,
    };
    if let Some(journal) = journal {
        registry.with(journal).init();
    } else if format == "json" {
        registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init();
    } else {
        let text =
            tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
        registry.with(text).init();
    }
    LogLevel(handle)
}
