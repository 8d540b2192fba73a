//! Compiles the .proto contracts with a vendored protoc (so `cargo build` works on a machine
//! without protobuf tooling), writes a descriptor set for gRPC reflection, and derives
//! proto3-canonical JSON (camelCase names, RFC 3339 timestamps, every field emitted) with
//! pbjson: the JSON form of every message then uses ZStack's documented field names.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "vmbackup/agent/v1/common.proto",
    "vmbackup/agent/v1/backup_storage.proto",
    "vmbackup/agent/v1/vm.proto",
    "vmbackup/agent/v1/vm_backup.proto",
    "vmbackup/agent/v1/snapshot_group.proto",
    "vmbackup/store/v1/store.proto",
];

/// Fields generated as `bytes::Bytes` instead of `Vec<u8>`.
const BYTES_FIELDS: [&str; 3] =
    [".vmbackup.store.v1.UploadChunk.blob", ".vmbackup.store.v1.Chunk.blob", ".vmbackup.store.v1.IndexPiece.data"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("vmbackup_descriptor.bin");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.compile_well_known_types();
    config.extern_path(".google.protobuf", "::pbjson_types");
    // Chunk blobs and index pieces are bytes::Bytes: a received blob is a slice of the receive buffer, not
    // a copy of it, and a blob to send is moved into the message without one.
    config.bytes(BYTES_FIELDS);
    // `prost::Name` on every message: the agent's REST edge finds a reply's descriptor by it.
    config.enable_type_names();
    // Malformed requests are INVALID_ARGUMENT, not tonic's INTERNAL (`src/codec.rs`).
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .file_descriptor_set_path(&descriptor_path)
        .compile_with_config(config, PROTOS, &["."])?;

    let descriptors = std::fs::read(&descriptor_path)?;
    // Every field is emitted, defaults included, as ZStack's inventories show them (an
    // empty `sshPassword` is a field, not an absence).
    pbjson_build::Builder::new().register_descriptors(&descriptors)?.emit_fields().build(&[".vmbackup"])?;
    Ok(())
}
