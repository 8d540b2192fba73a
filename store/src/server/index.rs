//! Indexes in pieces (`PutIndexStream`, `GetIndexStream`): an index of any size, up to
//! `MAX_ENCODED_LEN`, crosses the wire in pieces ([`vmbackup_proto::pieces`]) instead of
//! one message, which gRPC caps at [`super::MAX_MESSAGE_BYTES`] (an index of 2 Mi chunks:
//! 8 TiB at 4 MiB chunks, 128 GiB at 64 KiB). An upload is checked and stored exactly as
//! `PutIndex` does, only once its last byte is in: a stream cut short stores nothing.
//!
//! The server holds one index in memory while it checks it (at most `MAX_ENCODED_LEN`,
//! grown as bytes arrive, never reserved from a declared length).

use bytes::Bytes;
use tonic::{Request, Response, Status};
use vmbackup_proto::pieces::{Assembler, split};
use vmbackup_proto::store::v1 as pb;

use super::StoreService;
use crate::access::Role;

/// The stream `GetIndexStream` answers with.
pub type IndexPieces = futures::stream::Iter<std::vec::IntoIter<Result<pb::IndexPiece, Status>>>;

impl StoreService {
    pub(super) async fn put_index_pieces(
        &self,
        r: Request<tonic::Streaming<pb::IndexPiece>>,
    ) -> Result<Response<pb::PutIndexReply>, Status> {
        let p = self.admit(&r, Role::Writer, "upload indexes").await?;
        let mut stream = r.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("session_id, name: the stream sent no piece"));
        };
        if first.name.is_empty() {
            return Err(Status::invalid_argument("name: required in the first piece"));
        }
        let (session, name) = (first.session_id.clone(), first.name.clone());
        self.own_session(&p, &session).await?;
        let mut index = Assembler::default();
        index.push(first).map_err(Status::invalid_argument)?;
        while let Some(piece) = stream.message().await? {
            index.push(piece).map_err(Status::invalid_argument)?;
        }
        let data = index.finish().map_err(Status::invalid_argument)?;
        let d = self.run(move |s| s.put_index(&session, &name, &data)).await?;
        Ok(Response::new(pb::PutIndexReply { digest: d.to_hex() }))
    }

    pub(super) async fn get_index_pieces(&self, r: Request<pb::GetIndexRequest>) -> Result<IndexPieces, Status> {
        let p = self.admit_any(&r, "read indexes").await?;
        let name = r.into_inner().name;
        self.visible_index(&p, &name).await?;
        let data = Bytes::from(self.run(move |s| s.get_index(&name)).await?);
        Ok(futures::stream::iter(split(data, "", "").into_iter().map(Ok).collect::<Vec<_>>()))
    }
}
