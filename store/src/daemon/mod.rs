//! Process plumbing shared by vmbackup-store and vmbackup-agent, not part of the chunk
//! store's library API.
//!
//! Both daemons start, log, talk to systemd, serve TLS and expose `/metrics` the same way.
//! That code lives here, in the crate both binaries already link, so it is written once;
//! the chunk store ([`crate::chunk_store`], [`crate::gc`], [`crate::verify`],
//! [`crate::backend`]) never calls into it, and a library user of the store can ignore it.
//!
//! | module | what |
//! |---|---|
//! | [`malloc`] | sets glibc malloc up for chunk buffers (re-executes once, first thing in `main`) |
//! | [`logging`] | tracing set-up (journald, text or JSON) and the SIGHUP-reloadable filter |
//! | [`systemd`] | `sd_notify`: READY, STATUS, RELOADING, STOPPING, watchdog pings |
//! | [`tls`] | server and client TLS settings for the gRPC hops |
//! | [`metrics_http`] | the `/metrics` HTTP server and the encoding helper collectors share |
//!
//! Each daemon's own metric families stay with the daemon (`crate::metrics` for the store).

pub mod logging;
pub mod malloc;
pub mod metrics_http;
pub mod systemd;
pub mod tls;
