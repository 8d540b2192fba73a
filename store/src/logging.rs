//! Log set-up shared by vmbackup's daemons: tracing to stderr, filtered by `RUST_LOG`
//! (default `info`), with colours only on a terminal.

use std::io::IsTerminal;

/// Installs the global tracing subscriber.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
