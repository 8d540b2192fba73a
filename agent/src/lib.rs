//! # vmbackup-agent: the backup agent of a KVM host
//!
//! The control plane calls the agent over gRPC (ZStack's backup API, [`api`]) or ZStack's
//! REST URLs ([`rest`], which runs each call on the gRPC edge's services). Every call
//! runs as one operation of the core ([`ops`]), which drives the engines ([`backup`]) over
//! the parts: volumes ([`volume`]), the local state in SQLite ([`catalog`]), the places
//! backups live behind one seam ([`storage`]) and QEMU ([`qemu`]). The agent can embed one
//! Image Storage of its own on a local directory.
//!
//! ## Layers
//!
//! Imports point down this list only (`tests/layering.rs` checks it, and that no module
//! imports another in a cycle):
//!
//! | layer | modules | what |
//! |---|---|---|
//! | daemon | [`daemon`] | process: listeners, embedded store, reload, shutdown |
//! | REST edge | [`rest`] | ZStack's URLs, envelopes, API jobs and JSON, over the gRPC services in process |
//! | edges | [`api`] | gRPC: parse requests into domain values, render inventories, errors and progress |
//! | core | [`ops`] | operations: idempotency, caps, the volume lock set, jobs around engines |
//! | engines | [`backup`], [`export`] | backup, restore, recover, delete and sync data paths; backups served as NBD disks |
//! | jobs | [`jobs`] | running jobs, progress, cancellation |
//! | parts | [`volume`], [`guestfs`], [`catalog`], [`storage`], [`qemu`], [`model`], [`error`], [`config`], [`keys`], [`live`], [`metrics`], [`retention`], [`roots`], [`tags`], [`throttle`], [`tool`], [`validate`] | formats, state, clients, typed values |
//!
//! Across crates: agent -> store -> proto.
//!
//! ## Data model
//!
//! | what | where | source of truth |
//! |---|---|---|
//! | backup storages | catalog `backup_storage` (+ zones) | the catalog |
//! | VM layouts | catalog `vm`, `volume` | the control plane's RegisterVm |
//! | volume backups | catalog `volume_backup`, `volume_backup_ref` | the stores' group manifests |
//! | snapshot groups | catalog `snapshot_group`, `snapshot` | the catalog (and the overlay files) |
//! | jobs | catalog `job` | the catalog |
//! | sessions | config, or `<data-dir>/session` (0600) | the config |
//!
//! ## Concurrency
//!
//! | | catalog | store clients | volumes |
//! |---|---|---|---|
//! | operations | short calls, one mutex, on blocking threads | one channel per store, cloned freely; one write session per job, closed on every path | one operation per volume at a time ([`ops::VolumeLocks`]) |

pub mod api;
pub mod backup;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod error;
pub mod export;
pub mod guestfs;
pub mod jobs;
pub mod keys;
pub mod live;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod qemu;
pub mod rest;
pub mod retention;
pub mod roots;
pub mod storage;
pub mod tags;
pub mod throttle;
pub mod tool;
pub mod validate;
pub mod volume;
