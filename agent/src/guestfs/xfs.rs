//! XFS inside a backup, through the `lamxfs` crate (read-only, no `unsafe`, CRCs checked,
//! a dirty log replayed in memory), plus what its metadata leaves out: owner, group and
//! modification time, read here from the inode core (big-endian fields at fixed offsets of
//! `struct xfs_dinode`; big timestamps when the inode says so). Those three come from the
//! blocks as they are on disk, so on a filesystem whose log still held changes they may be
//! older than the replayed names and sizes.

use std::cell::RefCell;
use std::sync::Arc;

use lamxfs::{BlockRead, Inode, Path as XPath, Xfs};

use super::{Disk, Entry, Part};
use crate::error::{AgentError, ErrorKind, Result};

/// The bytes of one partition, as `lamxfs` reads them.
pub(super) struct Blocks {
    disk: Arc<dyn Disk>,
    part: Part,
}

impl BlockRead for Blocks {
    type Error = std::io::Error;

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), Self::Error> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.part.len) {
            return Err(std::io::Error::other(format!(
                "read of {} bytes at {offset} goes past the end of partition {}",
                buf.len(),
                self.part.number
            )));
        }
        self.disk.read_at(self.part.start + offset, buf)
    }
}

/// Where inodes are: the superblock's geometry.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    block_size: u64,
    ag_blocks: u64,
    inode_size: u64,
    inopb_log: u32,
    agblk_log: u32,
}

fn be16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn be32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// An open XFS filesystem of one partition.
pub(super) struct XfsFs {
    fs: RefCell<Xfs<Blocks>>,
    raw: RefCell<Blocks>,
    geo: Geometry,
    part: Part,
}

fn xfs_error(part: &Part, path: &str, e: &lamxfs::Error) -> AgentError {
    let kind = match e {
        lamxfs::Error::NotFound { .. } => ErrorKind::NotFound,
        lamxfs::Error::Io { .. } => ErrorKind::Unavailable,
        _ => ErrorKind::FailedPrecondition,
    };
    let err = AgentError::new(kind, format!("partition {} (xfs): {path}: {e:?} ({})", part.number, e.token()));
    if kind == ErrorKind::NotFound { err.with_field("path") } else { err }
}

impl XfsFs {
    pub(super) fn open(disk: Arc<dyn Disk>, part: Part) -> Result<Self> {
        let mut raw = Blocks { disk: disk.clone(), part };
        let mut sb = [0u8; 512];
        raw.read_at(0, &mut sb).map_err(|e| {
            AgentError::new(ErrorKind::Unavailable, format!("partition {}: reading the XFS superblock", part.number))
                .with_source(e)
        })?;
        let geo = Geometry {
            block_size: be32(&sb, 4),
            ag_blocks: be32(&sb, 84),
            inode_size: be16(&sb, 104),
            inopb_log: u32::from(sb[123]),
            agblk_log: u32::from(sb[124]),
        };
        let sane = geo.block_size.is_power_of_two()
            && (512..=65536).contains(&geo.block_size)
            && (256..=2048).contains(&geo.inode_size)
            && geo.inopb_log < 8
            && geo.agblk_log < 32
            && geo.ag_blocks > 0;
        if !sane {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("partition {} (xfs): the superblock's geometry does not hold together: {geo:?}", part.number),
            ));
        }
        let fs = Xfs::open(Blocks { disk, part }, part.len).map_err(|e| xfs_error(&part, "/", &e))?;
        Ok(Self { fs: RefCell::new(fs), raw: RefCell::new(raw), geo, part })
    }

    /// uid, gid, mtime seconds and nanoseconds of inode `ino`, from its core.
    fn core(&self, ino: u64) -> Result<(u32, u32, i64, u32)> {
        let g = self.geo;
        let ag = ino >> (g.agblk_log + g.inopb_log);
        let agbno = (ino >> g.inopb_log) & ((1u64 << g.agblk_log) - 1);
        let slot = ino & ((1u64 << g.inopb_log) - 1);
        let at = ag
            .checked_mul(g.ag_blocks)
            .and_then(|b| b.checked_add(agbno))
            .and_then(|b| b.checked_mul(g.block_size))
            .and_then(|o| o.checked_add(slot * g.inode_size))
            .ok_or_else(|| AgentError::new(ErrorKind::FailedPrecondition, format!("inode {ino} lies nowhere")))?;
        let mut d = [0u8; 176];
        self.raw.borrow_mut().read_at(at, &mut d).map_err(|e| {
            AgentError::new(ErrorKind::FailedPrecondition, format!("partition {}: inode {ino}", self.part.number))
                .with_source(e)
        })?;
        if &d[..2] != b"IN" {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("partition {} (xfs): inode {ino} at byte {at} has no inode magic", self.part.number),
            ));
        }
        let (uid, gid) = (u32::try_from(be32(&d, 8)).unwrap_or(0), u32::try_from(be32(&d, 12)).unwrap_or(0));
        // Version 3 inodes with XFS_DIFLAG2_BIGTIME hold nanoseconds since 1901-12-13.
        let bigtime = d[4] >= 3 && be64(&d, 120) & (1 << 3) != 0;
        let (sec, nsec) = if bigtime {
            let ns = be64(&d, 40);
            let sec = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX) - (1i64 << 31);
            (sec, u32::try_from(ns % 1_000_000_000).unwrap_or(0))
        } else {
            let sec = i32::from_be_bytes([d[40], d[41], d[42], d[43]]);
            (i64::from(sec), u32::try_from(be32(&d, 44)).unwrap_or(0))
        };
        Ok((uid, gid, sec, nsec))
    }

    fn entry_of(&self, path: &str, ino: Inode) -> Result<Entry> {
        let m = self.fs.borrow_mut().metadata(&ino).map_err(|e| xfs_error(&self.part, path, &e))?;
        let (uid, gid, mtime, mtime_nanos) = self.core(ino.ino)?;
        let kind = if m.is_file() {
            "file"
        } else if m.is_dir() {
            "directory"
        } else if m.is_symlink() {
            "symlink"
        } else {
            match (m.mode() & 0o170000) >> 12 {
                0o01 => "fifo",
                0o02 => "char-device",
                0o06 => "block-device",
                0o14 => "socket",
                _ => "other",
            }
        };
        let link_target = if m.is_symlink() {
            let t = self
                .fs
                .borrow_mut()
                .read_link(XPath::new(path.as_bytes()))
                .map_err(|e| xfs_error(&self.part, path, &e))?;
            Some(String::from_utf8_lossy(&t).into_owned())
        } else {
            None
        };
        Ok(Entry {
            path: path.to_string(),
            kind,
            size: m.size(),
            mode: m.mode(),
            uid,
            gid,
            mtime,
            mtime_nanos,
            link_target,
        })
    }

    pub(super) fn stat(&self, path: &str) -> Result<Entry> {
        let ino =
            self.fs.borrow_mut().resolve(XPath::new(path.as_bytes())).map_err(|e| xfs_error(&self.part, path, &e))?;
        self.entry_of(path, ino)
    }

    /// The entries of directory `dir` (without `.` and `..`).
    pub(super) fn read_dir(&self, dir: &str) -> Result<Vec<Entry>> {
        let items =
            self.fs.borrow_mut().read_dir(XPath::new(dir.as_bytes())).map_err(|e| xfs_error(&self.part, dir, &e))?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let name = String::from_utf8_lossy(&item.name).into_owned();
            if name == "." || name == ".." || name.contains('/') {
                continue;
            }
            let path = if dir.ends_with('/') { format!("{dir}{name}") } else { format!("{dir}/{name}") };
            out.push(self.entry_of(&path, Inode { ino: item.inode_number })?);
        }
        Ok(out)
    }

    /// Reads the regular file `path` in pieces of `piece` bytes.
    pub(super) fn read_file(
        &self,
        path: &str,
        piece: usize,
        each: &mut dyn FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<u64> {
        let ino =
            self.fs.borrow_mut().resolve(XPath::new(path.as_bytes())).map_err(|e| xfs_error(&self.part, path, &e))?;
        let size = self.fs.borrow_mut().metadata(&ino).map_err(|e| xfs_error(&self.part, path, &e))?.size();
        let mut at = 0u64;
        while at < size {
            let want = usize::try_from((size - at).min(piece.max(1) as u64)).unwrap_or(piece);
            let mut buf = vec![0u8; want];
            let mut filled = 0;
            while filled < want {
                let n = self
                    .fs
                    .borrow_mut()
                    .read_file_at(&ino, at + filled as u64, &mut buf[filled..])
                    .map_err(|e| xfs_error(&self.part, path, &e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            at += filled as u64;
            each(buf)?;
        }
        Ok(at)
    }
}
