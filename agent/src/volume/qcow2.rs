//! qcow2 reader: versions 2 and 3, cluster sizes 512 B ..= 2 MiB, zero clusters, compressed
//! clusters (deflate and zstd), extended L2 entries (subclusters) and backing chains of
//! qcow2 or raw images. Encrypted images, external data files and unknown incompatible
//! feature bits are refused as unsupported, never read wrongly.
//!
//! The format layer answers "what is at this guest offset" with a [`Plan`]; reads are
//! `pread`s of the planned host ranges, so worker threads share one open image without a
//! lock (only the small L2-table cache has one, never held across I/O).
//!
//! Header fields (big-endian) used here, offsets from the start of the file:
//! `0 magic "QFI\xfb"`, `4 version`, `8 backing_file_offset`, `16 backing_file_size`,
//! `20 cluster_bits`, `24 size`, `32 crypt_method`, `36 l1_size`, `40 l1_table_offset`,
//! v3: `72 incompatible_features`, `100 header_length`, `104 compression_type`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Error, ErrorKind, Extent, ExtentKind, Limits, Result, VolumeFormat, VolumeSource, push_extent};

/// qcow2 magic.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0b1_1111;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Where the bytes at a guest offset come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Stored uncompressed at this host offset.
    Data {
        /// Host offset of the guest offset asked for.
        host: u64,
    },
    /// In a compressed cluster.
    Compressed {
        /// Host offset of the compressed data.
        host: u64,
        /// Bytes to read (may run into the next sector's padding).
        len: u64,
    },
    /// Reads as zeros.
    Zero,
    /// Not allocated in this layer: the backing file (or zeros).
    Unallocated,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An open qcow2 image (and its backing chain).
#[derive(Debug)]
pub struct Qcow2Volume {
    path: PathBuf,
    file: File,
    file_len: u64,
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    l2_bits: u32,
    extended_l2: bool,
    zstd: bool,
    backing: Option<Box<dyn VolumeSource>>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    l2_cache_tables: usize,
}

impl Qcow2Volume {
    /// Opens an image and its backing chain.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self> {
        let mut seen = HashSet::new();
        Self::open_chain(path, limits, 0, &mut seen)
    }

    fn open_chain(path: &Path, limits: &Limits, depth: usize, seen: &mut HashSet<PathBuf>) -> Result<Self> {
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
        let file = File::open(path).map_err(|e| Error::io(path, None, "opening", e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, None, "stat", e))?.len();
        let corrupt = |at: u64, msg: String| Error::new(ErrorKind::Corrupt, path, Some(at), msg);
        let unsupported = |at: u64, msg: String| Error::new(ErrorKind::Unsupported, path, Some(at), msg);

        let mut h = vec![0u8; usize::try_from(file_len.min(4096)).unwrap_or(4096)];
        file.read_exact_at(&mut h, 0).map_err(|e| Error::io(path, Some(0), "reading the header", e))?;
        if h.len() < 72 {
            return Err(corrupt(0, format!("truncated header: {} bytes, at least 72 needed", h.len())));
        }
        if h[..4] != MAGIC {
            return Err(corrupt(0, "not a qcow2 image (bad magic)".into()));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(4, format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(20, format!("cluster_bits {cluster_bits} outside 9..=21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(&h, 24);
        if be32(&h, 32) != 0 {
            return Err(unsupported(32, "encrypted images are not supported".into()));
        }
        let (mut incompatible, mut header_len, mut zstd) = (0u64, 72usize, false);
        if version == 3 {
            if h.len() < 104 {
                return Err(corrupt(0, format!("truncated v3 header: {} bytes, at least 104 needed", h.len())));
            }
            incompatible = be64(&h, 72);
            header_len = usize::try_from(be32(&h, 100)).unwrap_or(usize::MAX);
            if header_len < 104 || header_len > h.len() {
                return Err(corrupt(100, format!("header_length {header_len} is out of range")));
            }
            if incompatible & !INCOMPAT_KNOWN != 0 {
                return Err(unsupported(
                    72,
                    format!("unknown incompatible feature bits {:#x}", incompatible & !INCOMPAT_KNOWN),
                ));
            }
            if incompatible & INCOMPAT_CORRUPT != 0 {
                return Err(corrupt(72, "the image is marked corrupt; run qemu-img check -r".into()));
            }
            if incompatible & INCOMPAT_DATA_FILE != 0 {
                return Err(unsupported(72, "images with an external data file are not supported yet".into()));
            }
            if incompatible & INCOMPAT_COMPRESSION != 0 {
                match h.get(104) {
                    Some(0) => {}
                    Some(1) => zstd = true,
                    Some(t) => return Err(unsupported(104, format!("compression type {t}"))),
                    None => return Err(corrupt(104, "compression type bit set but header too short".into())),
                }
            }
        }
        let extended_l2 = incompatible & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(corrupt(20, "extended L2 entries need clusters of at least 16 KiB".into()));
        }

        // Header extensions: backing format; an external data file is refused above.
        let mut backing_format = None;
        let mut at = header_len;
        loop {
            if at + 8 > h.len() {
                return Err(corrupt(
                    u64::try_from(at).unwrap_or(0),
                    "header extensions run past the first 4 KiB".into(),
                ));
            }
            let (ty, len) = (be32(&h, at), usize::try_from(be32(&h, at + 4)).unwrap_or(usize::MAX));
            if ty == 0 {
                break;
            }
            let data = at + 8;
            if len > h.len().saturating_sub(data) {
                return Err(corrupt(
                    u64::try_from(at).unwrap_or(0),
                    format!("header extension {ty:#x} of {len} bytes runs past the header"),
                ));
            }
            match ty {
                EXT_BACKING_FORMAT => backing_format = Some(String::from_utf8_lossy(&h[data..data + len]).to_string()),
                EXT_DATA_FILE => return Err(unsupported(u64::try_from(at).unwrap_or(0), "external data file".into())),
                _ => {}
            }
            at = data + len.div_ceil(8) * 8;
        }

        // L1 table.
        let entry_bytes: u32 = if extended_l2 { 16 } else { 8 };
        let l2_bits = cluster_bits - entry_bytes.trailing_zeros();
        let l1_size = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);
        let clusters = size.div_ceil(cluster_size);
        let needed = clusters.div_ceil(1u64 << l2_bits);
        if l1_size < needed {
            return Err(corrupt(36, format!("l1_size {l1_size} is too small for {size} bytes (needs {needed})")));
        }
        if l1_size * 8 > limits.max_l1_bytes {
            return Err(corrupt(
                36,
                format!("l1_size {l1_size} exceeds the limit of {} entries", limits.max_l1_bytes / 8),
            ));
        }
        if !l1_offset.is_multiple_of(cluster_size)
            || l1_offset.checked_add(l1_size * 8).is_none_or(|end| end > file_len)
        {
            return Err(corrupt(
                40,
                format!(
                    "L1 table at {l1_offset} ({l1_size} entries) is misaligned or past the end of the file ({file_len})"
                ),
            ));
        }
        let mut raw_l1 = vec![0u8; usize::try_from(l1_size * 8).unwrap_or(0)];
        file.read_exact_at(&mut raw_l1, l1_offset)
            .map_err(|e| Error::io(path, Some(l1_offset), "reading the L1 table", e))?;
        let l1: Vec<u64> = raw_l1.chunks_exact(8).map(|c| be64(c, 0) & L1_OFFSET_MASK).collect();
        for (i, &e) in l1.iter().enumerate() {
            if e != 0 && (!e.is_multiple_of(cluster_size) || e.saturating_add(cluster_size) > file_len) {
                let at = l1_offset + u64::try_from(i).unwrap_or(0) * 8;
                return Err(corrupt(
                    at,
                    format!("L1 entry {i} points at {e}, misaligned or past the end of the file ({file_len})"),
                ));
            }
        }

        // Backing file.
        let backing_offset = be64(&h, 8);
        let backing = if backing_offset != 0 {
            let len = u64::from(be32(&h, 16));
            if len == 0 || len > 1023 || backing_offset.saturating_add(len) > file_len {
                return Err(corrupt(8, format!("backing file name at {backing_offset} ({len} bytes) is out of range")));
            }
            let mut name = vec![0u8; usize::try_from(len).unwrap_or(0)];
            file.read_exact_at(&mut name, backing_offset)
                .map_err(|e| Error::io(path, Some(backing_offset), "reading the backing file name", e))?;
            let name = String::from_utf8(name)
                .map_err(|_| corrupt(backing_offset, "backing file name is not UTF-8".into()))?;
            let named = Path::new(&name);
            let bpath = if named.is_absolute() {
                named.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).join(named)
            };
            let format = match backing_format.as_deref() {
                Some("qcow2") => VolumeFormat::Qcow2,
                Some("raw") => VolumeFormat::Raw,
                Some(other) => return Err(unsupported(8, format!("backing format {other:?}"))),
                None => super::probe(&bpath)?,
            };
            let b: Box<dyn VolumeSource> = match format {
                VolumeFormat::Qcow2 => Box::new(Self::open_chain(&bpath, limits, depth + 1, seen)?),
                VolumeFormat::Raw => Box::new(super::raw::RawVolume::open(&bpath)?),
            };
            Some(b)
        } else {
            None
        };

        Ok(Self {
            path: path.to_path_buf(),
            file,
            file_len,
            version,
            cluster_bits,
            size,
            l1,
            l2_bits,
            extended_l2,
            zstd,
            backing,
            l2_cache: Mutex::new(HashMap::new()),
            l2_cache_tables: limits.l2_cache_tables.max(1),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(t) = self.l2_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&offset) {
            return Ok(t.clone());
        }
        let mut raw = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        self.file
            .read_exact_at(&mut raw, offset)
            .map_err(|e| Error::io(&self.path, Some(offset), "reading an L2 table", e))?;
        let table = Arc::new(raw.chunks_exact(8).map(|c| be64(c, 0)).collect::<Vec<_>>());
        let mut cache = self.l2_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= self.l2_cache_tables {
            cache.clear();
        }
        cache.insert(offset, table.clone());
        Ok(table)
    }

    /// What is at guest offset `g` (< size), and for how many bytes the answer holds.
    pub fn plan(&self, g: u64) -> Result<(Plan, u64)> {
        let cs = self.cluster_size();
        let in_cluster = g & (cs - 1);
        let cluster = g >> self.cluster_bits;
        let l1_index = usize::try_from(cluster >> self.l2_bits).unwrap_or(usize::MAX);
        let l2_index = usize::try_from(cluster & ((1 << self.l2_bits) - 1)).unwrap_or(0);
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0);
        if l2_offset == 0 {
            // The whole L2 range is unallocated in this layer.
            let span = cs << self.l2_bits;
            return Ok((Plan::Unallocated, span - (g & (span - 1))));
        }
        let table = self.l2_table(l2_offset)?;
        let stride = if self.extended_l2 { 2 } else { 1 };
        let entry = table[l2_index * stride];
        let entry_at = l2_offset + u64::try_from(l2_index * stride * 8).unwrap_or(0);
        let rest_of_cluster = cs - in_cluster;
        if entry & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << x) - 1);
            let sectors = (entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            if host >= self.file_len {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    &self.path,
                    Some(entry_at),
                    format!("compressed cluster at {host} is past the end of the file ({})", self.file_len),
                ));
            }
            return Ok((Plan::Compressed { host, len }, rest_of_cluster));
        }
        let host = entry & L2_OFFSET_MASK;
        if host != 0 && (!host.is_multiple_of(cs) || host >= self.file_len) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(entry_at),
                format!("L2 entry points at {host}, misaligned or past the end of the file ({})", self.file_len),
            ));
        }
        if self.extended_l2 {
            let bitmap = table[l2_index * 2 + 1];
            let sc_size = cs / 32;
            let sc = in_cluster / sc_size;
            let rest = sc_size - (in_cluster % sc_size);
            let plan = if bitmap & (1 << sc) != 0 {
                if host == 0 {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        &self.path,
                        Some(entry_at),
                        "allocated subcluster in an unallocated cluster",
                    ));
                }
                Plan::Data { host: host + in_cluster }
            } else if bitmap & (1 << (32 + sc)) != 0 {
                Plan::Zero
            } else {
                Plan::Unallocated
            };
            return Ok((plan, rest));
        }
        let plan = if self.version >= 3 && entry & 1 != 0 {
            Plan::Zero
        } else if host == 0 {
            Plan::Unallocated
        } else {
            Plan::Data { host: host + in_cluster }
        };
        Ok((plan, rest_of_cluster))
    }

    fn decompress(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let len = len.min(self.file_len - host);
        let mut compressed = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.file
            .read_exact_at(&mut compressed, host)
            .map_err(|e| Error::io(&self.path, Some(host), "reading a compressed cluster", e))?;
        let mut out = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        let result = if self.zstd {
            zstd::stream::read::Decoder::with_buffer(&compressed[..]).and_then(|mut d| d.read_exact(&mut out))
        } else {
            flate2::read::DeflateDecoder::new(&compressed[..]).read_exact(&mut out)
        };
        result.map_err(|e| {
            let algo = if self.zstd { "zstd" } else { "deflate" };
            Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(host),
                format!("compressed cluster does not decompress ({algo}): {e}"),
            )
        })?;
        Ok(out)
    }
}

impl VolumeSource for Qcow2Volume {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> VolumeFormat {
        VolumeFormat::Qcow2
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut g = offset;
        while g < end {
            let (plan, run) = self.plan(g)?;
            let n = run.min(end - g);
            match plan {
                Plan::Data { .. } | Plan::Compressed { .. } => {
                    push_extent(&mut out, Extent { offset: g, len: n, kind: ExtentKind::Data })
                }
                Plan::Zero => push_extent(&mut out, Extent { offset: g, len: n, kind: ExtentKind::Zero }),
                Plan::Unallocated => match &self.backing {
                    Some(b) if g < b.virtual_size() => {
                        let in_backing = n.min(b.virtual_size() - g);
                        for e in b.extents(g, in_backing)? {
                            push_extent(&mut out, e);
                        }
                        push_extent(
                            &mut out,
                            Extent { offset: g + in_backing, len: n - in_backing, kind: ExtentKind::Unallocated },
                        );
                    }
                    _ => push_extent(&mut out, Extent { offset: g, len: n, kind: ExtentKind::Unallocated }),
                },
            }
            g += n;
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let total = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if offset.checked_add(total).is_none_or(|e| e > self.size) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                &self.path,
                None,
                format!("read of {total} bytes at {offset} past the virtual size {}", self.size),
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + u64::try_from(done).unwrap_or(0);
            let (plan, run) = self.plan(g)?;
            let n = usize::try_from(run).unwrap_or(usize::MAX).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match plan {
                Plan::Data { host } => {
                    if host.saturating_add(u64::try_from(n).unwrap_or(0)) > self.file_len {
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            &self.path,
                            Some(host),
                            format!("data cluster runs past the end of the file ({})", self.file_len),
                        ));
                    }
                    self.file
                        .read_exact_at(dst, host)
                        .map_err(|e| Error::io(&self.path, Some(host), "reading data", e))?;
                }
                Plan::Compressed { host, len } => {
                    let cluster = self.decompress(host, len)?;
                    let start = usize::try_from(g & (self.cluster_size() - 1)).unwrap_or(0);
                    dst.copy_from_slice(&cluster[start..start + n]);
                }
                Plan::Zero => dst.fill(0),
                Plan::Unallocated => match &self.backing {
                    Some(b) if g < b.virtual_size() => {
                        let k = usize::try_from(b.virtual_size() - g).unwrap_or(usize::MAX).min(n);
                        b.read_at(g, &mut dst[..k])?;
                        dst[k..].fill(0);
                    }
                    _ => dst.fill(0),
                },
            }
            done += n;
        }
        Ok(())
    }
}
