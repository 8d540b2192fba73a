//! Opening a qcow2 image: one layer at a time (its header, the L1 table of the active layer
//! or of an internal snapshot, its external data file), then its backing file, which is
//! opened the same way. The chain is bounded: a backing file that leads back to an image
//! already in the chain, or a chain deeper than [`Limits::max_chain_depth`], is refused as
//! corrupt before anything of that layer is read.
//!
//! Kept apart from the read path in the parent module: opening checks every untrusted
//! offset it keeps once, so planning and reading can rely on them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::header::{self, Header, be64};
use super::{DataFile, Qcow2Volume, read_snapshots};
use crate::volume::raw::RawVolume;
use crate::volume::{Error, ErrorKind, Limits, Result, VolumeFormat, VolumeSource, probe};

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What the opened image shows the guest: its virtual size and the L1 table that maps it
/// (the active layer's, or an internal snapshot's).
struct View {
    size: u64,
    l1_size: u64,
    l1_offset: u64,
}

impl Qcow2Volume {
    /// Opens an image's active layer and its backing chain.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self> {
        let mut seen = HashSet::new();
        Self::open_chain(path, limits, 0, &mut seen, None)
    }

    /// Opens the internal snapshot named (or with the id) `snapshot`, read-only, as it was
    /// when taken.
    pub fn open_snapshot(path: &Path, snapshot: &str, limits: &Limits) -> Result<Self> {
        let mut seen = HashSet::new();
        Self::open_chain(path, limits, 0, &mut seen, Some(snapshot))
    }

    /// Opens the layer at `path`, `depth` images below the one asked for, and every layer
    /// below it; `seen` holds the canonical paths of the layers opened so far.
    fn open_chain(
        path: &Path,
        limits: &Limits,
        depth: usize,
        seen: &mut HashSet<PathBuf>,
        snapshot: Option<&str>,
    ) -> Result<Self> {
        enter_chain(path, limits, depth, seen)?;
        let file = File::open(path).map_err(|e| Error::io(path, None, "opening", e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, None, "stat", e))?.len();
        let header = read_header(path, &file, file_len, limits)?;
        let view = match snapshot {
            Some(name) => snapshot_view(path, &file, file_len, &header, name, limits)?,
            None => View { size: header.size, l1_size: header.l1_size, l1_offset: header.l1_offset },
        };
        let l1 = read_l1(path, &file, file_len, header.cluster_size(), &view)?;
        let data_file = open_data_file(path, &header)?;
        let backing = open_backing(path, &file, &header, limits, depth, seen)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            file_len,
            header,
            size: view.size,
            l1,
            data_file,
            backing,
            l2_cache: Mutex::new(HashMap::new()),
            l2_cache_tables: limits.l2_cache_tables.max(1),
        })
    }
}

/// Admits `path` as layer `depth` of the chain: refused when it is already in the chain
/// (`seen`, by canonical path) or lies deeper than the limit allows.
fn enter_chain(path: &Path, limits: &Limits, depth: usize, seen: &mut HashSet<PathBuf>) -> Result<()> {
    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, None, "resolving", e))?;
    if !seen.insert(canonical) {
        return Err(Error::new(ErrorKind::Corrupt, path, Some(8), "backing chain loops back to this image"));
    }
    if depth > limits.max_chain_depth {
        return Err(Error::new(
            ErrorKind::Corrupt,
            path,
            Some(8),
            format!("backing chain deeper than {}", limits.max_chain_depth),
        ));
    }
    Ok(())
}

/// Reads the first [`header::HEADER_READ`] bytes (fewer in a smaller file) and parses them.
fn read_header(path: &Path, file: &File, file_len: u64, limits: &Limits) -> Result<Header> {
    let mut h = vec![0u8; usize::try_from(file_len).unwrap_or(usize::MAX).min(header::HEADER_READ)];
    file.read_exact_at(&mut h, 0).map_err(|e| Error::io(path, Some(0), "reading the header", e))?;
    Header::parse(path, &h, file_len, limits)
}

/// The view of the internal snapshot named (or with the id) `name`, its L1 table checked as
/// the header's own is: large enough, within `limits`, cluster-aligned and inside the file.
fn snapshot_view(
    path: &Path,
    file: &File,
    file_len: u64,
    header: &Header,
    name: &str,
    limits: &Limits,
) -> Result<View> {
    let corrupt = |msg: String| Error::new(ErrorKind::Corrupt, path, Some(header.snapshots.1), msg);
    let snaps = read_snapshots(path, file, file_len, header)?;
    let s = snaps.iter().find(|s| s.name == name).or_else(|| snaps.iter().find(|s| s.id == name)).ok_or_else(|| {
        Error::new(ErrorKind::InvalidArgument, path, None, format!("no internal snapshot named {name:?}"))
    })?;
    let cluster_size = header.cluster_size();
    let size = s.disk_size.unwrap_or(header.size);
    let (l1_size, l1_offset) = (s.l1_size, s.l1_offset);
    let needed = size.div_ceil(cluster_size).div_ceil(1u64 << header.l2_bits());
    if l1_size < needed || l1_size * 8 > limits.max_l1_bytes {
        return Err(corrupt(format!("snapshot {name:?} has l1_size {l1_size}, out of range for {size} bytes")));
    }
    if !l1_offset.is_multiple_of(cluster_size) || l1_offset.checked_add(l1_size * 8).is_none_or(|end| end > file_len) {
        return Err(corrupt(format!("snapshot {name:?} has its L1 table at {l1_offset}, misaligned or past the end")));
    }
    Ok(View { size, l1_size, l1_offset })
}

/// Reads the L1 table of `view`: each entry that points at an L2 table must point at a
/// whole cluster inside the file.
fn read_l1(path: &Path, file: &File, file_len: u64, cluster_size: u64, view: &View) -> Result<Vec<u64>> {
    let View { l1_size, l1_offset, .. } = *view;
    let mut raw_l1 = vec![0u8; usize::try_from(l1_size * 8).unwrap_or(0)];
    file.read_exact_at(&mut raw_l1, l1_offset)
        .map_err(|e| Error::io(path, Some(l1_offset), "reading the L1 table", e))?;
    let l1: Vec<u64> = raw_l1.chunks_exact(8).map(|c| be64(c, 0) & L1_OFFSET_MASK).collect();
    for (i, &e) in l1.iter().enumerate() {
        if e != 0 && (!e.is_multiple_of(cluster_size) || e.saturating_add(cluster_size) > file_len) {
            let at = l1_offset + u64::try_from(i).unwrap_or(0) * 8;
            return Err(Error::new(
                ErrorKind::Corrupt,
                path,
                Some(at),
                format!("L1 entry {i} points at {e}, misaligned or past the end of the file ({file_len})"),
            ));
        }
    }
    Ok(l1)
}

/// A file the image names (data file, backing file): absolute, or relative to the image's
/// directory.
fn sibling(path: &Path, name: &str) -> PathBuf {
    let named = Path::new(name);
    if named.is_absolute() { named.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).join(named) }
}

/// Opens the external data file the header names, if it names one.
fn open_data_file(path: &Path, header: &Header) -> Result<Option<DataFile>> {
    let Some(name) = &header.data_file else { return Ok(None) };
    let dpath = sibling(path, name);
    let file = File::open(&dpath).map_err(|e| Error::io(&dpath, None, "opening the data file", e))?;
    let len = file.metadata().map_err(|e| Error::io(&dpath, None, "stat", e))?.len();
    Ok(Some(DataFile { path: dpath, file, len }))
}

/// Opens the backing file the header names, if it names one, as the next layer of the
/// chain: a qcow2 image (with its own backing chain) or a raw image.
fn open_backing(
    path: &Path,
    file: &File,
    header: &Header,
    limits: &Limits,
    depth: usize,
    seen: &mut HashSet<PathBuf>,
) -> Result<Option<Box<dyn VolumeSource>>> {
    let Some((offset, len)) = header.backing else { return Ok(None) };
    let bpath = sibling(path, &read_backing_name(path, file, offset, len)?);
    let b: Box<dyn VolumeSource> = match backing_format(path, header, &bpath)? {
        VolumeFormat::Qcow2 => Box::new(Qcow2Volume::open_chain(&bpath, limits, depth + 1, seen, None)?),
        VolumeFormat::Raw => Box::new(RawVolume::open(&bpath)?),
    };
    Ok(Some(b))
}

/// The backing file name: `len` bytes of UTF-8 at `offset`.
fn read_backing_name(path: &Path, file: &File, offset: u64, len: u32) -> Result<String> {
    let mut name = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut name, offset)
        .map_err(|e| Error::io(path, Some(offset), "reading the backing file name", e))?;
    String::from_utf8(name)
        .map_err(|_| Error::new(ErrorKind::Corrupt, path, Some(offset), "backing file name is not UTF-8"))
}

/// The backing file's format: as the backing format extension records it, else probed.
fn backing_format(path: &Path, header: &Header, bpath: &Path) -> Result<VolumeFormat> {
    match header.backing_format.as_deref() {
        Some("qcow2") => Ok(VolumeFormat::Qcow2),
        Some("raw") => Ok(VolumeFormat::Raw),
        Some(other) => Err(Error::new(ErrorKind::Unsupported, path, Some(8), format!("backing format {other:?}"))),
        None => probe(bpath),
    }
}
