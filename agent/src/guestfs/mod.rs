//! Files inside a volume backup, read without restoring the volume: find where the
//! filesystems are ([`layout`]: the whole disk, or MBR/GPT partitions), then list
//! directories and read files in userspace: ext2/3/4 with the `ext4-view` crate and XFS
//! with `lamxfs` ([`xfs`]); both replay the journal in memory, check metadata checksums
//! and use no `unsafe`.
//!
//! Nothing here mounts anything: a backup is untrusted input, and a hostile filesystem
//! given to the host's kernel attacks the kernel; in userspace it can at worst fail this
//! one call. Walks are bounded (depth, entries) so a directory cycle in a damaged image
//! ends. Linear LVM logical volumes on a physical volume are found by themselves
//! ([`lvm`]) and read like partitions.
//!
//! Everything here is blocking: the caller runs it on a blocking thread, over a [`Disk`]
//! that fetches chunks from the backup storage.

pub mod layout;
pub mod lvm;
mod xfs;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use crate::error::{AgentError, ErrorKind, Result};
pub use layout::{FsKind, Part};

/// A disk read at byte offsets; `read_at` fills the whole buffer or fails.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

/// Deepest directory a recursive listing descends into.
pub const MAX_DEPTH: usize = 64;

/// One file, directory or link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute path inside the filesystem (not UTF-8 bytes replaced by U+FFFD).
    pub path: String,
    /// `file`, `directory`, `symlink`, `block-device`, `char-device`, `fifo`, `socket`.
    pub kind: &'static str,
    /// Bytes.
    pub size: u64,
    /// Permission and type bits (`st_mode`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification, Unix seconds.
    pub mtime: i64,
    /// Its nanoseconds.
    pub mtime_nanos: u32,
    /// A symlink's target.
    pub link_target: Option<String>,
}

fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::BlockDevice => "block-device",
        FileType::CharacterDevice => "char-device",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
    }
}

/// The bytes of one partition, as `ext4-view` reads them.
struct PartReader<D> {
    disk: D,
    part: Part,
}

impl<D: std::ops::Deref<Target = dyn Disk>> Ext4Read for PartReader<D> {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let end = start.checked_add(dst.len() as u64).filter(|e| *e <= self.part.len);
        if end.is_none() {
            return Err(format!(
                "read of {} bytes at {start} goes past the end of partition {} ({} bytes)",
                dst.len(),
                self.part.number,
                self.part.len
            )
            .into());
        }
        self.disk.read_at(self.part.start + start, dst).map_err(Into::into)
    }
}

enum Reader {
    Ext(Ext4),
    Xfs(Box<xfs::XfsFs>),
}

/// An open filesystem of one partition.
pub struct Filesystem {
    reader: Reader,
    /// Where it is.
    pub part: Part,
}

fn fs_error(part: &Part, path: &str, e: Ext4Error) -> AgentError {
    let kind = match e {
        Ext4Error::NotFound => ErrorKind::NotFound,
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => ErrorKind::InvalidArgument,
        Ext4Error::NotADirectory | Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => ErrorKind::FailedPrecondition,
        Ext4Error::Io(_) => ErrorKind::Unavailable,
        _ => ErrorKind::FailedPrecondition,
    };
    let field = if matches!(kind, ErrorKind::NotFound | ErrorKind::InvalidArgument) { Some("path") } else { None };
    let err = AgentError::new(kind, format!("partition {} ({}): {path}: {e}", part.number, part.kind.as_str()));
    match field {
        Some(f) => err.with_field(f),
        None => err,
    }
}

impl Filesystem {
    /// Opens the filesystem of the logical volume `lv` (`vg/lv`), or of partition `want` (0:
    /// the whole disk; a physical volume: its only logical volume holding a filesystem), or
    /// the only filesystem there is when neither is given.
    pub fn open(disk: std::sync::Arc<dyn Disk>, want: Option<u32>, lv: Option<&str>) -> Result<Self> {
        struct Candidate {
            lv: Option<String>,
            disk: std::sync::Arc<dyn Disk>,
            part: Part,
            /// Why a physical volume's logical volumes could not be read: an error only
            /// when that partition is the one asked for, so a damaged PV never hides the
            /// other partitions' filesystems.
            unreadable: Option<AgentError>,
        }
        let mut all = Vec::new();
        for part in layout::parts(&*disk)? {
            if part.kind != FsKind::Lvm {
                all.push(Candidate { lv: None, disk: disk.clone(), part, unreadable: None });
                continue;
            }
            let lvs = lvm::logical_volumes(&disk, &part).and_then(|lvs| {
                lvs.into_iter()
                    .map(|v| {
                        let size = v.size();
                        let kind = layout::kind_at(&v, 0, size)?;
                        let name = v.name.clone();
                        let on: std::sync::Arc<dyn Disk> = std::sync::Arc::new(v);
                        let part = Part { number: part.number, start: 0, len: size, kind };
                        Ok(Candidate { lv: Some(name), disk: on, part, unreadable: None })
                    })
                    .collect::<Result<Vec<_>>>()
            });
            match lvs {
                Ok(lvs) => all.extend(lvs),
                // The store failing to send the chunks is the call's error, not a damaged PV.
                Err(e) if e.is_store_outage() || e.kind() == ErrorKind::Cancelled => return Err(e),
                Err(e) => all.push(Candidate { lv: None, disk: disk.clone(), part, unreadable: Some(e) }),
            }
        }
        let describe = || {
            all.iter()
                .map(|c| match (&c.lv, &c.unreadable) {
                    (Some(name), _) => format!("{name} on {} ({})", c.part.number, c.part.kind.as_str()),
                    (None, Some(e)) => format!("{} (lvm, unreadable: {})", c.part.number, e.message()),
                    (None, None) => format!("{} ({})", c.part.number, c.part.kind.as_str()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let known = |c: &&Candidate| c.part.kind != FsKind::Unknown && c.unreadable.is_none();
        let chosen: Vec<&Candidate> = match (lv, want) {
            (Some(name), _) => all.iter().filter(|c| c.lv.as_deref() == Some(name)).collect(),
            (None, Some(n)) => {
                let plain: Vec<&Candidate> = all.iter().filter(|c| c.lv.is_none() && c.part.number == n).collect();
                if plain.is_empty() { all.iter().filter(|c| c.part.number == n).filter(known).collect() } else { plain }
            }
            (None, None) => all.iter().filter(known).collect(),
        };
        let c = match chosen.as_slice() {
            [one] => *one,
            [] if lv.is_some() || want.is_some() => {
                let what =
                    lv.map_or_else(|| format!("partition {}", want.unwrap_or(0)), |l| format!("logical volume {l}"));
                let field = if lv.is_some() { "logicalVolume" } else { "partition" };
                return Err(AgentError::invalid(field, format!("the disk has no {what}; it has: {}", describe())));
            }
            [] => {
                return Err(AgentError::new(
                    ErrorKind::FailedPrecondition,
                    format!("no filesystem this agent reads was found; it has: {}", describe()),
                ));
            }
            _ => {
                return Err(AgentError::invalid(
                    "partition",
                    format!(
                        "the disk holds several filesystems; name one (partition or logicalVolume) of: {}",
                        describe()
                    ),
                ));
            }
        };
        if let Some(e) = &c.unreadable {
            return Err(AgentError::new(e.kind(), e.message().to_owned()));
        }
        let (disk, part) = (c.disk.clone(), c.part);
        let reader = match part.kind {
            FsKind::Ext => {
                Reader::Ext(Ext4::load(Box::new(PartReader { disk, part })).map_err(|e| fs_error(&part, "/", e))?)
            }
            FsKind::Xfs => Reader::Xfs(Box::new(xfs::XfsFs::open(disk, part)?)),
            FsKind::Lvm | FsKind::Unknown => {
                return Err(AgentError::new(
                    ErrorKind::Unimplemented,
                    format!(
                        "partition {} holds {}; file-level restore reads ext2/3/4 and XFS, also on LVM (restore or export the volume instead)",
                        part.number,
                        part.kind.as_str()
                    ),
                ));
            }
        };
        Ok(Self { reader, part })
    }

    fn ext_entry(&self, fs: &Ext4, path: &str, m: &Metadata) -> Result<Entry> {
        let link_target = if m.is_symlink() {
            Some(fs.read_link(path).map_err(|e| fs_error(&self.part, path, e))?.display().to_string())
        } else {
            None
        };
        Ok(Entry {
            path: path.to_string(),
            kind: kind_name(m.file_type()),
            size: m.len(),
            mode: u32::from(m.mode()),
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.modified().seconds(),
            mtime_nanos: m.modified().nanoseconds(),
            link_target,
        })
    }

    /// The entry at `path` itself (a symlink is not followed).
    pub fn stat(&self, path: &str) -> Result<Entry> {
        match &self.reader {
            Reader::Ext(fs) => {
                let m = fs.symlink_metadata(path).map_err(|e| fs_error(&self.part, path, e))?;
                self.ext_entry(fs, path, &m)
            }
            Reader::Xfs(fs) => fs.stat(path),
        }
    }

    /// The entries of directory `dir`, without `.` and `..`.
    fn read_dir(&self, dir: &str) -> Result<Vec<Entry>> {
        let fs = match &self.reader {
            Reader::Ext(fs) => fs,
            Reader::Xfs(fs) => return fs.read_dir(dir),
        };
        let mut out = Vec::new();
        for item in fs.read_dir(dir).map_err(|e| fs_error(&self.part, dir, e))? {
            let item = item.map_err(|e| fs_error(&self.part, dir, e))?;
            let name = item.file_name().display().to_string();
            if name == "." || name == ".." {
                continue;
            }
            let path = if dir.ends_with('/') { format!("{dir}{name}") } else { format!("{dir}/{name}") };
            let m = item.metadata().map_err(|e| fs_error(&self.part, &path, e))?;
            out.push(self.ext_entry(fs, &path, &m)?);
        }
        Ok(out)
    }

    /// Calls `each` for every entry of the directory `path` (and, with `recursive`, of every
    /// directory beneath it, depth first, at most [`MAX_DEPTH`] deep) until it returns
    /// false, or `limit` entries were given. A file's `path` gives just that entry.
    pub fn list(&self, path: &str, recursive: bool, limit: u64, each: &mut dyn FnMut(Entry) -> bool) -> Result<()> {
        let top = self.stat(path)?;
        if top.kind != "directory" {
            each(top);
            return Ok(());
        }
        let mut given = 0u64;
        self.walk(path, recursive, 0, limit, &mut given, each).map(|_| ())
    }

    /// Returns false once the caller stopped or the limit was reached.
    fn walk(
        &self,
        dir: &str,
        recursive: bool,
        depth: usize,
        limit: u64,
        given: &mut u64,
        each: &mut dyn FnMut(Entry) -> bool,
    ) -> Result<bool> {
        for entry in self.read_dir(dir)? {
            let path = entry.path.clone();
            let is_dir = entry.kind == "directory";
            *given += 1;
            if !each(entry) || *given >= limit {
                return Ok(false);
            }
            if recursive && is_dir && depth + 1 < MAX_DEPTH && !self.walk(&path, true, depth + 1, limit, given, each)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads the regular file `path` from its start, handing `each` pieces of at most
    /// `piece` bytes until the end or until `each` fails.
    pub fn read_file(&self, path: &str, piece: usize, each: &mut dyn FnMut(Vec<u8>) -> Result<()>) -> Result<u64> {
        let e = self.stat(path)?;
        if e.kind != "file" {
            return Err(AgentError::new(
                ErrorKind::FailedPrecondition,
                format!("{path} is a {}, not a regular file", e.kind),
            )
            .with_field("path"));
        }
        let fs = match &self.reader {
            Reader::Ext(fs) => fs,
            Reader::Xfs(fs) => return fs.read_file(path, piece, each),
        };
        let mut file = fs.open(path).map_err(|e| fs_error(&self.part, path, e))?;
        let mut total = 0u64;
        loop {
            let mut buf = vec![0u8; piece.max(1)];
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read_bytes(&mut buf[filled..]).map_err(|e| fs_error(&self.part, path, e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(total);
            }
            buf.truncate(filled);
            total += filled as u64;
            each(buf)?;
        }
    }
}
