//! The local-directory backend.
//!
//! ```text
//! <root>/chunks/<first 4 hex>/<64 hex>   chunk blobs (shard directories made on demand)
//! <root>/indexes/<name>.vidx            volume indexes
//! <root>/groups/<group-uuid>.json        group manifests
//! <root>/group-meta/<group-uuid>.json    a group's namespace and retention lock
//! <root>/meta/verify-state.json          groups verify found damaged
//! <root>/owners/<ns>/<4 hex>/<64 hex>    empty: namespace <ns> uploaded that chunk
//!                                        (dedup_scope = "namespace"; not fsynced)
//! <root>/bad/<64 hex>                    chunks verify found damaged, moved aside
//! <root>/tmp/                            writes in progress; emptied at open
//! ```
//!
//! Every write goes to a file in `tmp/` (same filesystem), is fsynced, renamed into place,
//! and the target directory is fsynced: after a crash at any instant a chunk or object is
//! either absent or complete. Chunks of one upload may be staged instead
//! ([`Backend::stage_chunk`]): written to `tmp/` with their writeback started, then made
//! durable and renamed a batch at a time ([`Backend::publish_chunks`]), the same rule with
//! one round of syncs for many chunks; a staged chunk is invisible until its bytes are
//! durable, and a crash leaves it in `tmp/`, which is emptied at open. "Touched" is the
//! file's mtime, set explicitly (chunk content never changes, so mtime means "last used";
//! relatime/noatime mounts cannot distort it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use vmbackup_proto::Digest;

use super::{Backend, ChunkInfo, ObjectInfo, ObjectKind, PendingChunk, Staged};
use crate::durable::sync_dir;
use crate::error::{ErrorKind, Result, StoreError};

/// A store in a local directory.
#[derive(Debug)]
pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    /// Attaches to a store directory another process serves (an agent writing chunks
    /// through a mounted export of it, the fsInfo path): nothing is created or cleaned up,
    /// the layout must already be there. Writes follow the same tmp/ + fsync + rename rule.
    pub fn attach(root: &Path) -> Result<Self> {
        for d in ["chunks", "tmp"] {
            let p = root.join(d);
            if !p.is_dir() {
                return Err(StoreError::new(
                    crate::error::ErrorKind::NotFound,
                    format!("{} is not a vmbackup store directory (no {d}/)", root.display()),
                ));
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// Opens (creating) the layout under `root` and removes writes a crash interrupted.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["chunks", "indexes", "groups", "group-meta", "meta", "owners", "bad", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| StoreError::io(format!("creating {}", p.display()), e))?;
        }
        let tmp = root.join("tmp");
        let mut removed = 0usize;
        for entry in fs::read_dir(&tmp).map_err(|e| StoreError::io(format!("listing {}", tmp.display()), e))? {
            let entry = entry.map_err(|e| StoreError::io(format!("listing {}", tmp.display()), e))?;
            fs::remove_file(entry.path())
                .map_err(|e| StoreError::io(format!("removing {}", entry.path().display()), e))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(removed, dir = %tmp.display(), "removed writes interrupted by a crash");
        }
        sync_dir(root).map_err(|e| StoreError::io(format!("syncing {}", root.display()), e))?;
        Ok(Self { root: root.to_path_buf() })
    }

    fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("chunks").join(&hex[..4]).join(hex)
    }

    fn object_dir(&self, kind: ObjectKind) -> PathBuf {
        self.root.join(kind.dir())
    }

    fn owner_path(&self, namespace: &str, d: &Digest) -> Result<PathBuf> {
        crate::group_meta::check_namespace(namespace).map_err(|e| StoreError::new(ErrorKind::InvalidArgument, e))?;
        let hex = d.to_hex();
        Ok(self.root.join("owners").join(namespace).join(&hex[..4]).join(hex))
    }

    fn object_path(&self, kind: ObjectKind, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.contains('\0') || name.starts_with('.') {
            return Err(StoreError::new(
                ErrorKind::InvalidArgument,
                format!("object name {name:?} is not a plain file name"),
            ));
        }
        Ok(self.object_dir(kind).join(name))
    }

    /// Writes `bytes` to a new file in `tmp/` and fsyncs it; the guard removes it.
    fn write_tmp(&self, bytes: &[u8]) -> Result<(PathBuf, RemoveOnDrop)> {
        let (tmp, file, guard) = self.write_tmp_unsynced(bytes)?;
        file.sync_all().map_err(|e| StoreError::io(format!("syncing {}", tmp.display()), e))?;
        Ok((tmp, guard))
    }

    /// Writes `bytes` to a new file in `tmp/` without syncing it; the guard removes it.
    fn write_tmp_unsynced(&self, bytes: &[u8]) -> Result<(PathBuf, File, RemoveOnDrop)> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().simple().to_string());
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let write = || -> io::Result<File> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            Ok(f)
        };
        let file = write().map_err(|e| StoreError::io(format!("writing {}", tmp.display()), e))?;
        Ok((tmp, file, guard))
    }

    /// Creates the shard directory of chunk path `dest` if missing; returns whether it did
    /// (then `chunks/` needs a sync).
    fn make_shard(&self, dest: &Path) -> Result<bool> {
        match dest.parent() {
            Some(shard) if !shard.exists() => {
                fs::create_dir_all(shard).map_err(|e| StoreError::io(format!("creating {}", shard.display()), e))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn sync_chunks_dir(&self) -> Result<()> {
        let chunks = self.root.join("chunks");
        sync_dir(&chunks).map_err(|e| StoreError::io(format!("syncing {}", chunks.display()), e))
    }

    fn write_durably(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let (tmp, guard) = self.write_tmp(bytes)?;
        fs::rename(&tmp, dest).map_err(|e| StoreError::io(format!("renaming into {}", dest.display()), e))?;
        guard.disarm();
        let dir = dest.parent().unwrap_or(&self.root);
        sync_dir(dir).map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))
    }
}

/// Removes a temp file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

fn touched(meta: &fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Backend for FsBackend {
    fn has_chunk(&self, digest: &Digest) -> Result<bool> {
        let p = self.chunk_path(digest);
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(format!("checking {}", p.display()), e)),
        }
    }

    fn put_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<bool> {
        if self.touch_chunk(digest)? {
            return Ok(false);
        }
        let dest = self.chunk_path(digest);
        if self.make_shard(&dest)? {
            self.sync_chunks_dir()?;
        }
        self.write_durably(&dest, blob)?;
        Ok(true)
    }

    fn stage_chunk(&self, digest: &Digest, blob: &[u8]) -> Result<Staged> {
        if self.touch_chunk(digest)? {
            return Ok(Staged::Present);
        }
        let (tmp, file, guard) = self.write_tmp_unsynced(blob)?;
        // The pending chunk removes its file from here on.
        guard.disarm();
        // Starts the writeback now (DONTNEED writes dirty pages back without waiting), so
        // the sync at publish finds the bytes on disk or on their way.
        let _ = nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        let len = u64::try_from(blob.len()).unwrap_or(u64::MAX);
        Ok(Staged::Pending(PendingChunk::new(*digest, len, file, tmp)))
    }

    fn publish_chunks(&self, chunks: Vec<PendingChunk>) -> Result<()> {
        // 1. Every blob durable (the first fsync commits the journal for all of them).
        for c in &chunks {
            c.file().sync_all().map_err(|e| StoreError::io(format!("syncing chunk {}", c.digest()), e))?;
        }
        // 2. Each under its name: from here a reader may see it, and its bytes are durable.
        let mut dirs = std::collections::BTreeSet::new();
        let mut new_shards = false;
        for c in chunks {
            let dest = self.chunk_path(c.digest());
            new_shards |= self.make_shard(&dest)?;
            if let Some(tmp) = c.path() {
                fs::rename(tmp, &dest).map_err(|e| StoreError::io(format!("renaming into {}", dest.display()), e))?;
            }
            c.published();
            dirs.insert(dest.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone()));
        }
        // 3. The names durable: new shard directories first, then the entries in them.
        if new_shards {
            self.sync_chunks_dir()?;
        }
        for d in dirs {
            sync_dir(&d).map_err(|e| StoreError::io(format!("syncing {}", d.display()), e))?;
        }
        Ok(())
    }

    fn get_chunk(&self, digest: &Digest) -> Result<Vec<u8>> {
        let p = self.chunk_path(digest);
        fs::read(&p).map_err(|e| StoreError::io(format!("reading chunk {digest}"), e))
    }

    fn get_chunk_into(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        use std::io::Read;
        buf.clear();
        let p = self.chunk_path(digest);
        File::open(&p)
            .and_then(|mut f| f.read_to_end(buf))
            .map(|_| ())
            .map_err(|e| StoreError::io(format!("reading chunk {digest}"), e))
    }

    fn touch_chunk(&self, digest: &Digest) -> Result<bool> {
        let p = self.chunk_path(digest);
        match File::open(&p) {
            Ok(f) => {
                f.set_modified(SystemTime::now())
                    .map_err(|e| StoreError::io(format!("touching {}", p.display()), e))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(format!("opening {}", p.display()), e)),
        }
    }

    fn chunk_touched(&self, digest: &Digest) -> Result<Option<SystemTime>> {
        let p = self.chunk_path(digest);
        match fs::symlink_metadata(&p) {
            Ok(m) => Ok(Some(touched(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("checking {}", p.display()), e)),
        }
    }

    fn for_each_chunk(&self, f: &mut dyn FnMut(ChunkInfo) -> Result<()>) -> Result<()> {
        let chunks = self.root.join("chunks");
        let list = |d: &Path| fs::read_dir(d).map_err(|e| StoreError::io(format!("listing {}", d.display()), e));
        for shard in list(&chunks)? {
            let shard = shard.map_err(|e| StoreError::io("listing chunks", e))?.path();
            for entry in list(&shard)? {
                let entry = entry.map_err(|e| StoreError::io(format!("listing {}", shard.display()), e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
                let Ok(digest) = name.parse::<Digest>() else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not a chunk");
                    continue;
                };
                // A chunk deleted since the listing is simply skipped.
                let Ok(meta) = entry.metadata() else { continue };
                f(ChunkInfo { digest, size: meta.len(), touched: touched(&meta) })?;
            }
        }
        Ok(())
    }

    fn delete_chunk(&self, digest: &Digest) -> Result<()> {
        let p = self.chunk_path(digest);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(format!("removing {}", p.display()), e)),
        }
    }

    fn quarantine_chunk(&self, digest: &Digest) -> Result<()> {
        let from = self.chunk_path(digest);
        let bad = self.root.join("bad");
        let to = bad.join(format!("{}.{}", digest.to_hex(), uuid::Uuid::new_v4().simple()));
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(format!("moving {} aside", from.display()), e)),
        }
        sync_dir(&bad).map_err(|e| StoreError::io(format!("syncing {}", bad.display()), e))?;
        if let Some(shard) = from.parent() {
            sync_dir(shard).map_err(|e| StoreError::io(format!("syncing {}", shard.display()), e))?;
        }
        Ok(())
    }

    fn put_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()> {
        let dest = self.object_path(kind, name)?;
        self.write_durably(&dest, bytes)
    }

    fn create_object(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<bool> {
        let dest = self.object_path(kind, name)?;
        let (tmp, _guard) = self.write_tmp(bytes)?;
        // A hard link never replaces: EEXIST means another writer created it first.
        match fs::hard_link(&tmp, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(StoreError::io(format!("creating {}", dest.display()), e)),
        }
        let dir = dest.parent().unwrap_or(&self.root);
        sync_dir(dir).map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))?;
        Ok(true)
    }

    fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        let p = self.object_path(kind, name)?;
        fs::read(&p).map_err(|e| StoreError::io(format!("reading {}", p.display()), e))
    }

    fn list_objects(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        let dir = self.object_dir(kind);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))? {
            let entry = entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            out.push(ObjectInfo { name, modified: touched(&meta) });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn delete_object(&self, kind: ObjectKind, name: &str) -> Result<()> {
        let p = self.object_path(kind, name)?;
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(format!("removing {}", p.display()), e)),
        }
        let dir = self.object_dir(kind);
        sync_dir(&dir).map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))
    }

    fn capacity(&self) -> Result<(u64, u64)> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| StoreError::io(format!("statvfs {}", self.root.display()), e.into()))?;
        let frag = st.fragment_size();
        Ok((st.blocks().saturating_mul(frag), st.blocks_available().saturating_mul(frag)))
    }

    fn mark_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        let p = self.owner_path(namespace, digest)?;
        let create = || OpenOptions::new().write(true).create_new(true).open(&p);
        let made = match create() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = p.parent() {
                    fs::create_dir_all(dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
                }
                create()
            }
            other => other,
        };
        match made {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(StoreError::io(format!("creating {}", p.display()), e)),
        }
    }

    fn is_owner(&self, namespace: &str, digest: &Digest) -> Result<bool> {
        let p = self.owner_path(namespace, digest)?;
        match fs::symlink_metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(format!("checking {}", p.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_objects_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = FsBackend::open(dir.path()).expect("open");
        let d = Digest::of(b"x");
        assert!(!b.has_chunk(&d).expect("has"));
        assert!(b.put_chunk(&d, b"blob").expect("put"));
        assert!(!b.put_chunk(&d, b"blob").expect("put again"), "an existing chunk is not rewritten");
        assert_eq!(b.get_chunk(&d).expect("get"), b"blob");
        let mut seen = Vec::new();
        b.for_each_chunk(&mut |c| {
            seen.push(c.digest);
            Ok(())
        })
        .expect("list");
        assert_eq!(seen, vec![d]);
        b.put_object(ObjectKind::Manifest, "g.json", b"{}").expect("put object");
        assert_eq!(b.get_object(ObjectKind::Manifest, "g.json").expect("get object"), b"{}");
        assert!(b.put_object(ObjectKind::Index, "../escape", b"x").is_err());
        assert_eq!(b.get_object(ObjectKind::Index, "none").expect_err("absent").kind(), ErrorKind::NotFound);
        b.quarantine_chunk(&d).expect("quarantine");
        assert!(!b.has_chunk(&d).expect("has"));
        assert_eq!(fs::read_dir(dir.path().join("bad")).expect("bad dir").count(), 1, "kept aside, not deleted");
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(FsBackend::open(dir.path()).expect("open"));
        fs::write(dir.path().join("tmp/interrupted"), b"half").expect("write");
        FsBackend::open(dir.path()).expect("reopen");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    }
}
