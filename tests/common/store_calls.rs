//! Direct calls to a vmbackup-store, as an agent makes them: a session, chunks uploaded
//! (only the missing ones), an index, a manifest naming it, a commit.

use vmbackup_proto::Digest;
use vmbackup_proto::blob;
use vmbackup_proto::index::{VolumeFormat, VolumeIndex};
use vmbackup_proto::manifest::{FORMAT_VERSION, GroupManifest, VolumeEntry};
use vmbackup_proto::store::v1 as pb;

use super::StoreClient;

/// Chunk size of the test stores.
pub const CS_U32: u32 = 64 << 10;
/// The same, as usize.
pub const CS: usize = CS_U32 as usize;
/// The same, as u64.
pub const CS_U64: u64 = CS_U32 as u64;

/// A new uuid, ZStack style.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Opens a write session.
pub async fn session(c: &mut StoreClient) -> String {
    c.open_session(pb::OpenSessionRequest { client: "test".into(), ttl_seconds: 0 })
        .await
        .expect("session")
        .into_inner()
        .session_id
}

/// A group manifest naming one raw volume backup whose index is `index_name`.
pub fn one_volume_manifest(
    volume_backup_uuid: String,
    index_name: String,
    index_digest: String,
    virtual_size: u64,
) -> GroupManifest {
    GroupManifest {
        format_version: FORMAT_VERSION,
        group_uuid: uuid(),
        vm_uuid: uuid(),
        name: "backup".into(),
        description: String::new(),
        system_tags: vec![],
        user_tags: vec![],
        created: 1,
        chunk_size: CS_U32,
        volumes: vec![VolumeEntry {
            volume_backup_uuid,
            volume_uuid: uuid(),
            name: "root".into(),
            kind: "Root".into(),
            device_id: 0,
            virtual_size,
            format: "raw".into(),
            index_name,
            index_digest,
            stored_bytes: 0,
            deduplicated_bytes: 0,
        }],
        key_id: None,
        sealed: None,
    }
}

/// Uploads `chunks` (missing ones only), puts their index and returns a manifest naming it.
pub async fn upload(c: &mut StoreClient, session: &str, chunks: &[Vec<u8>]) -> GroupManifest {
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    let missing = c
        .missing_chunks(pb::MissingChunksRequest {
            session_id: session.into(),
            digests: digests.iter().map(|d| d.0.to_vec()).collect(),
        })
        .await
        .expect("missing")
        .into_inner()
        .missing;
    let uploads: Vec<pb::UploadChunk> = chunks
        .iter()
        .zip(&digests)
        .filter(|(_, d)| missing.contains(&d.0.to_vec()))
        .map(|(c, d)| pb::UploadChunk {
            session_id: session.into(),
            digest: d.0.to_vec(),
            blob: blob::encode(c, 1).expect("encode").into(),
        })
        .collect();
    c.upload_chunks(tokio_stream::iter(uploads)).await.expect("upload");
    let mut ix = VolumeIndex::new([9; 16], CS_U64 * chunks.len() as u64, CS_U32, VolumeFormat::Raw).expect("index");
    ix.digests.copy_from_slice(&digests);
    let vb = uuid();
    let name = format!("{vb}.vidx");
    let digest = c
        .put_index(pb::PutIndexRequest { session_id: session.into(), name: name.clone(), data: ix.encode() })
        .await
        .expect("put index")
        .into_inner()
        .digest;
    one_volume_manifest(vb, name, digest, ix.virtual_size)
}

/// Commits `m` in `session`.
pub async fn commit(c: &mut StoreClient, session: &str, m: &GroupManifest) -> Result<pb::GroupInfo, tonic::Status> {
    c.commit_group(pb::CommitGroupRequest {
        session_id: session.into(),
        manifest: m.encode().expect("encode"),
        retain_until: 0,
    })
    .await
    .map(|r| r.into_inner())
}
