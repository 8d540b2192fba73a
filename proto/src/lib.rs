//! # vmbackup-proto: every contract between vmbackup's processes
//!
//! Pure: no I/O, no async runtime. What lives here:
//!
//! - [`agent::v1`]: the control plane -> agent gRPC API (ZStack's backup API). Field names are
//!   ZStack's in snake_case, so the JSON form (`serde`, via pbjson) uses ZStack's camelCase.
//! - [`store::v1`]: the agent -> Image Storage gRPC API.
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, served by gRPC reflection.
//!
//! The byte formats (digest, chunk blob, volume index, group manifest, key file) are
//! versioned modules beside these; each documents its layout byte by byte. [`seal`] holds
//! the client-side encryption they share.

pub mod blob;
pub mod codec;
pub mod digest;
pub mod format_error;
pub mod index;
pub mod keyfile;
pub mod manifest;
pub mod pieces;
pub mod seal;

pub use digest::Digest;
pub use format_error::FormatError;

/// Control plane -> agent API.
#[allow(missing_docs)] // generated code carries the .proto comments instead
pub mod agent {
    /// Version 1 of the agent API.
    pub mod v1 {
        tonic::include_proto!("vmbackup.agent.v1");
        include!(concat!(env!("OUT_DIR"), "/vmbackup.agent.v1.serde.rs"));
    }
}

/// Agent -> Image Storage API.
#[allow(missing_docs)]
pub mod store {
    /// Version 1 of the store API.
    pub mod v1 {
        tonic::include_proto!("vmbackup.store.v1");
        include!(concat!(env!("OUT_DIR"), "/vmbackup.store.v1.serde.rs"));

        /// Most index bytes one `IndexPiece` may carry; a receiver refuses a larger piece.
        pub const MAX_INDEX_PIECE_BYTES: usize = 4 << 20;
        /// Index bytes per `IndexPiece` a sender sends.
        pub const INDEX_PIECE_BYTES: usize = 1 << 20;
    }
}

/// Encoded `FileDescriptorSet` of every vmbackup .proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmbackup_descriptor.bin"));

pub use pbjson_types::Timestamp;
