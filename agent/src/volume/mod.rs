//! Volumes the agent reads (backup) and writes (restore): raw files and block devices, and
//! qcow2 images with their backing chains.
//!
//! A [`VolumeSource`] answers two questions: *what is where* ([`VolumeSource::extents`]: data,
//! zero, or unallocated through the whole chain) and *read these guest bytes*
//! ([`VolumeSource::read_at`], positioned, callable from many worker threads at once). The
//! formats compute plans from their metadata; the reads are plain `pread`s.
//!
//! Every header and table is untrusted: sizes are bounded ([`Limits`]) before anything is
//! allocated, offsets are checked against the file, and errors name the path, the field and
//! the byte offset.

pub mod lock;
pub mod qcow2;
pub mod raw;
pub mod writer;

use std::path::{Path, PathBuf};

/// What a guest byte range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored somewhere in the chain (may still be zeros).
    Data,
    /// Reads as zeros: a zero cluster, or a hole the format records as zero.
    Zero,
    /// Not allocated anywhere in the chain; reads as zeros.
    Unallocated,
}

/// A run of guest bytes of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: ExtentKind,
}

/// On-disk format of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFormat {
    /// Raw file or block device.
    Raw,
    /// qcow2 image.
    Qcow2,
}

impl VolumeFormat {
    /// `raw` or `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeFormat::Raw => "raw",
            VolumeFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses `raw` or `qcow2`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "raw" => Some(VolumeFormat::Raw),
            "qcow2" => Some(VolumeFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for VolumeFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A readable volume.
pub trait VolumeSource: Send + Sync + std::fmt::Debug {
    /// Virtual size in bytes.
    fn virtual_size(&self) -> u64;
    /// Format of the top layer.
    fn format(&self) -> VolumeFormat;
    /// Allocation map of `[offset, offset + len)`: sorted, contiguous, adjacent runs of one
    /// kind merged. The range is clipped to the virtual size.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Reads guest bytes at `offset` into `buf` (zeros for holes and zero clusters).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Every file the volume's data comes from: its own, then (qcow2) its external data
    /// file and its backing chain, as the images name them. An image can name any file,
    /// so callers judge these before reading guest data.
    fn files(&self) -> Vec<PathBuf>;
}

/// Bounds on what an untrusted image may make the reader allocate or follow.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest L1 table, bytes.
    pub max_l1_bytes: u64,
    /// Deepest backing chain.
    pub max_chain_depth: usize,
    /// L2 tables cached per image.
    pub l2_cache_tables: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_l1_bytes: 32 << 20, max_chain_depth: 64, l2_cache_tables: 64 }
    }
}

/// What went wrong, in a small stable set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The file could not be read.
    Io,
    /// The image's metadata is inconsistent or out of bounds.
    Corrupt,
    /// A valid image using a feature vmbackup does not read (encryption, unknown bits).
    Unsupported,
    /// A running VM holds the image open for writing.
    InUse,
    /// The request itself is wrong (read past the end, unknown format name).
    InvalidArgument,
}

/// A volume error: kind, path, byte offset in the file when known, and what was wrong.
#[derive(Debug)]
pub struct Error {
    /// Kind.
    pub kind: ErrorKind,
    /// The file.
    pub path: PathBuf,
    /// Byte offset in the file, when the error is about a place in it.
    pub offset: Option<u64>,
    /// What was wrong.
    pub message: String,
    source: Option<std::io::Error>,
}

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, path: &Path, offset: Option<u64>, message: impl Into<String>) -> Self {
        Self { kind, path: path.to_path_buf(), offset, message: message.into(), source: None }
    }

    /// An I/O error at `offset` of `path`.
    pub fn io(path: &Path, offset: Option<u64>, what: &str, e: std::io::Error) -> Self {
        Self { kind: ErrorKind::Io, path: path.to_path_buf(), offset, message: what.to_string(), source: Some(e) }
    }

    /// Takes the OS error out (for a caller that reports it as its own cause).
    pub fn take_source(&mut self) -> Option<std::io::Error> {
        self.source.take()
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} (offset {o}): {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Opens a volume for an offline backup; `format` None probes the qcow2 magic. A volume a
/// running VM holds open for writing is refused ([`ErrorKind::InUse`]): its bytes change
/// under the reader, so only the live path (through QEMU) may read it.
pub fn open(path: &Path, format: Option<VolumeFormat>, limits: &Limits) -> Result<Box<dyn VolumeSource>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, None, "opening", e))?;
    lock::check_not_in_use(path, &f, lock::Access::Read)?;
    open_unchecked(path, format, limits)
}

/// Opens a volume without asking whether a VM holds it: for the live-backup path, where
/// QEMU itself provides a consistent view, and for tools reading images known idle.
pub fn open_unchecked(path: &Path, format: Option<VolumeFormat>, limits: &Limits) -> Result<Box<dyn VolumeSource>> {
    let format = match format {
        Some(f) => f,
        None => probe(path)?,
    };
    match format {
        VolumeFormat::Raw => Ok(Box::new(raw::RawVolume::open(path)?)),
        VolumeFormat::Qcow2 => Ok(Box::new(qcow2::Qcow2Volume::open(path, limits)?)),
    }
}

/// qcow2 if the file starts with its magic, raw otherwise.
pub fn probe(path: &Path) -> Result<VolumeFormat> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, None, "opening", e))?;
    let mut magic = [0u8; 4];
    match f.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == qcow2::MAGIC => Ok(VolumeFormat::Qcow2),
        Ok(()) => Ok(VolumeFormat::Raw),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(VolumeFormat::Raw),
        Err(e) => Err(Error::io(path, Some(0), "reading the magic", e)),
    }
}

/// Merges adjacent extents of one kind.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.kind == e.kind
        && last.offset + last.len == e.offset
    {
        last.len += e.len;
        return;
    }
    out.push(e);
}
