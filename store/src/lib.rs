//! # vmbackup-store: the Image Storage server
//!
//! A durable, content-addressed chunk store that backups land in, and its gRPC server.
//!
//! ## Data model (on disk, under `--data-dir`)
//!
//! | path | what | written |
//! |---|---|---|
//! | `store.json` | store identity: uuid, layout version, chunk size | once, at first start |
//!
//! Every file is written durably: temp file + fsync + rename + fsync of the directory
//! ([`durable::write_atomic`]), so a crash leaves either the old or the new file, never a
//! torn one.
//!
//! ## Who runs concurrently with whom
//!
//! | | Status |
//! |---|---|
//! | Status | yes |

pub mod config;
pub mod durable;
pub mod identity;
pub mod logging;
pub mod server;
pub mod systemd;
pub mod tls;
