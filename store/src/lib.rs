//! # vmbackup-store: the Image Storage server
//!
//! A durable, content-addressed chunk store that backups land in, and its gRPC server.
//!
//! The library API is the chunk store: [`chunk_store`], [`gc`], [`verify`], [`backend`],
//! [`sessions`], [`shared`], [`identity`], [`error`], and the store's edge ([`server`], [`config`],
//! [`metrics`]). [`daemon`] is process plumbing (logging, systemd, TLS, malloc arenas, the
//! `/metrics` server) that the vmbackup-store and vmbackup-agent binaries share; it is not
//! part of that API and the chunk store does not use it.
//!
//! ## Data model (a local directory; see [`backend::fs`])
//!
//! | path | what | written |
//! |---|---|---|
//! | `store.json` | identity: uuid, layout version, chunk size | once, at first start |
//! | `chunks/<4 hex>/<64 hex>` | chunk blobs named by BLAKE3 of their plaintext | upload |
//! | `indexes/<uuid>.vidx` | volume indexes | PutIndex, PutIndexStream |
//! | `groups/<uuid>.json` | group manifests: a group exists exactly when this does | CommitGroup |
//! | `meta/verify-state.json` | groups verify found damaged (`{"damagedGroups": [..]}`), read once and cached by the store | Verify |
//! | `bad/` | chunks verify found damaged, moved aside | Verify |
//! | `tmp/` | writes in progress, emptied at start | every write |
//!
//! ## Data model on S3 (`backend = "s3"`; see [`backend::s3`])
//!
//! | key under `<prefix>/` | what | written |
//! |---|---|---|
//! | `store.json` | identity, as above | once, create-only PUT (`If-None-Match: *`), so two first starts agree |
//! | `chunks/<4 hex>/<64 hex>` | chunk blobs | upload, create-only PUT (412: already present) |
//! | `indexes/<uuid>.vidx` | volume indexes | PutIndex, PutIndexStream |
//! | `groups/<uuid>.json` | group manifests, written last | CommitGroup |
//! | `group-meta/<uuid>.json` | namespace and retention lock | CommitGroup, SetRetention |
//! | `meta/verify-state.json` | damaged groups | Verify |
//! | `owners/<ns>/<4 hex>/<64 hex>` | empty: the namespace uploaded the chunk | upload (namespace scope) |
//! | `bad/<64 hex>` | damaged chunks (copy, then delete) | Verify |
//!
//! | `sessions/<id>.json`, `journal/<id>/…` | open sessions and the chunks they rely on | OpenSession, MissingChunks ([`shared`]) |
//! | `gc/lease-<epoch>.json`, `gc/fence-…`, `gc/doomed-…` | the GC lease and what that GC may delete | GC ([`shared`]) |
//!
//! A PUT is atomic, so there is no `tmp/`. Any number of store servers may serve one bucket:
//! they coordinate only through these objects, by the protocol of [`shared`] (its module
//! doc has the race table for servers over one bucket; the table below is for one process).

//! Invariants: every write (fs backend) is temp + fsync + rename + directory fsync (never torn;
//! an upload's chunks a batch at a time, invisible until durable, see [`batch`]); a
//! stored chunk's plaintext hashes to its name (checked on every upload from another
//! process; the agent's embedded store takes the chunks the agent itself encoded from
//! plaintext it hashed without a second check, `insert_own_chunk`); every chunk a committed
//! index names is present (checked at commit, kept by GC, reported by verify).
//!
//! ## Who runs concurrently with whom
//!
//! | | upload / MissingChunks | commit | GC | verify | delete group |
//! |---|---|---|---|---|---|
//! | upload / MissingChunks | yes (shard lock per chunk) | yes | yes: sweep and touch share the chunk's shard lock | yes | yes |
//! | commit | | yes | yes: the session keeps its chunks after the cutoff | yes | yes |
//! | GC | | | no: a second run is refused | yes | yes |
//! | verify | | | | yes: each records its groups' damage marks under the store's group-state lock | yes |
//!
//! Damage marks are changed only as load-modify-persist under that lock, so verifies of
//! different groups finishing together keep both results. Deleting a group leaves its mark.

pub mod access;
pub mod backend;
pub mod batch;
pub mod chunk_store;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod error;
pub mod gc;
pub mod group_meta;
mod group_state;
pub mod groups;
pub mod identity;
pub mod metrics;
pub mod server;
pub mod sessions;
pub mod shared;
pub mod verify;
