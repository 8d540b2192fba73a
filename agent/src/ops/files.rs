//! File-level restore: ListVmBackupFiles and ReadVmBackupFile read one filesystem inside a
//! volume backup ([`crate::guestfs`]) over the same on-demand, verified chunk reader an
//! export uses, on a blocking thread, and stream what they find. Nothing is restored or
//! mounted; a chunk that fails its check fails the call naming it.
//!
//! The filesystem is opened and the path looked up before the call answers, so a wrong
//! partition, an unreadable filesystem or a missing path is the call's error, not a broken
//! stream.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Ops;
use crate::error::{AgentError, ErrorKind, Result};
use crate::export::disk::Blocking;
use crate::guestfs::{Entry, Filesystem};

/// Entries a listing sends when the caller sets no limit.
pub const DEFAULT_LIST_LIMIT: u64 = 100_000;
/// Bytes per piece of a file read.
pub const READ_PIECE: usize = 1 << 20;
/// Entries or pieces buffered ahead of a slow reader.
const AHEAD: usize = 16;

/// Which filesystem of which volume backup.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// The backup group.
    pub group: String,
    /// The volume whose backup to read.
    pub volume: String,
    /// The backup storage (None: the first holding the group).
    pub storage: Option<String>,
    /// Partition number (0: the whole disk); None: the only filesystem there is.
    pub partition: Option<u32>,
    /// An LVM logical volume, `vg/lv`.
    pub logical_volume: Option<String>,
}

impl Ops {
    /// Opens the filesystem of `src` on a blocking thread, runs `first` there (the part that
    /// must succeed before the call answers), then `rest`, which streams into the channel.
    async fn on_filesystem<T: Send + 'static>(
        &self,
        src: FileSource,
        first: impl FnOnce(&Filesystem) -> Result<()> + Send + 'static,
        rest: impl FnOnce(&Filesystem, &mpsc::Sender<Result<T>>) -> Result<()> + Send + 'static,
    ) -> Result<mpsc::Receiver<Result<T>>> {
        let (disk, _) = self.backup_disk(&src.group, &src.volume, src.storage.as_deref()).await?;
        let blocking = Blocking { disk: Arc::new(disk), handle: tokio::runtime::Handle::current() };
        let (tx, rx) = mpsc::channel(AHEAD);
        let (ready, opened) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let fs = match Filesystem::open(Arc::new(blocking), src.partition, src.logical_volume.as_deref())
                .and_then(|fs| first(&fs).map(|()| fs))
            {
                Ok(fs) => fs,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let _ = ready.send(Ok(()));
            if let Err(e) = rest(&fs, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        opened.await.map_err(|_| AgentError::new(ErrorKind::Internal, "the filesystem reader stopped"))??;
        Ok(rx)
    }

    /// The entries under `path` (with the partition they are on), streamed.
    pub async fn list_files(
        &self,
        src: FileSource,
        path: String,
        recursive: bool,
        limit: u64,
    ) -> Result<mpsc::Receiver<Result<(Entry, u32)>>> {
        let p = path.clone();
        self.on_filesystem(
            src,
            move |fs| fs.stat(&p).map(|_| ()),
            move |fs, tx| {
                let part = fs.part.number;
                fs.list(&path, recursive, limit, &mut |e| tx.blocking_send(Ok((e, part))).is_ok())
            },
        )
        .await
    }

    /// The bytes of the regular file `path`, streamed in pieces of [`READ_PIECE`].
    pub async fn read_file(&self, src: FileSource, path: String) -> Result<mpsc::Receiver<Result<Vec<u8>>>> {
        let p = path.clone();
        self.on_filesystem(
            src,
            move |fs| {
                let e = fs.stat(&p)?;
                if e.kind == "file" {
                    Ok(())
                } else {
                    Err(AgentError::invalid("path", format!("{p} is a {}, not a regular file", e.kind)))
                }
            },
            move |fs, tx| {
                fs.read_file(&path, READ_PIECE, &mut |piece| {
                    tx.blocking_send(Ok(piece))
                        .map_err(|_| AgentError::new(ErrorKind::Cancelled, "the caller stopped reading"))
                })
                .map(|_| ())
                .or_else(|e| if e.kind() == ErrorKind::Cancelled { Ok(()) } else { Err(e) })
            },
        )
        .await
    }
}
