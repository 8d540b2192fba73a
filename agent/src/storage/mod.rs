//! Clients of the places backups are written to. Today: Image Storage (a vmbackup-store
//! server over gRPC). A Ceph pool written directly joins here later.

pub mod image_store;
pub mod netbind;
pub mod registry;

pub use image_store::{ImageStoreClient, StoreStatus};
