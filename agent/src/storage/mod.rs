//! Where backups are written to and read from, behind one seam ([`seam`]): the engines in
//! the backup engines see a [`Store`], a [`ChunkReader`] and [`ChunkWriter`]s, never a
//! particular kind of storage. Today: Image Storage (a vmbackup-store server over gRPC,
//! [`image_store`]), the agent's embedded store in-process ([`local`]) and, for fsInfo, a
//! mounted store directory ([`fsinfo`]); rate limits and byte counters wrap either ([`metered`]).
//! The token each storage is called with lives in [`credentials`].

pub mod ceph;
pub mod credentials;
pub mod fsinfo;
pub mod image_store;
pub mod local;
pub mod metered;
pub mod netbind;
pub mod registry;
pub mod seam;

pub use image_store::ImageStoreClient;
pub use seam::{ChunkReader, ChunkWriter, IndexBytes, Session, Store, StoreStatus, StoredGroup};
