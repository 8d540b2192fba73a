//! # vmbackup-agent: the backup agent of a KVM host
//!
//! The control plane calls the agent over gRPC (ZStack's backup API, [`api`]). The agent
//! keeps its local state in SQLite ([`catalog`]), talks to Image Storage servers
//! ([`storage`]), and can embed one Image Storage of its own on a local directory.
//!
//! ## Data model
//!
//! | what | where | source of truth |
//! |---|---|---|
//! | backup storages | catalog `backup_storage` (+ zones) | the catalog |
//! | volume backups | catalog `volume_backup`, `volume_backup_ref` | the stores' group manifests |
//! | sessions | config, or `<data-dir>/session` (0600) | the config |
//!
//! ## Concurrency
//!
//! | | catalog | store clients |
//! |---|---|---|
//! | API handlers | short calls, one mutex, on blocking threads | one channel per call, cloned freely |

pub mod api;
pub mod auth;
pub mod backup;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod error;
pub mod jobs;
pub mod live;
pub mod metrics;
pub mod qemu;
pub mod storage;
pub mod tags;
pub mod throttle;
pub mod validate;
pub mod volume;
