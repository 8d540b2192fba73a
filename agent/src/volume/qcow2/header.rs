//! The qcow2 header and its extensions, parsed from bytes alone (no I/O), so the parser can
//! be fuzzed directly. Everything here is untrusted: every field is range-checked before it
//! is used and every error names the byte offset of the field at fault.
//!
//! Fields (big-endian), offsets from the start of the file:
//! `0 magic "QFI\xfb"`, `4 version`, `8 backing_file_offset`, `16 backing_file_size`,
//! `20 cluster_bits`, `24 size`, `32 crypt_method`, `36 l1_size`, `40 l1_table_offset`,
//! `48 refcount_table_offset`, `56 refcount_table_clusters`, `60 nb_snapshots`,
//! `64 snapshots_offset`; v3: `72 incompatible_features`, `80 compatible_features`,
//! `88 autoclear_features`, `96 refcount_order`, `100 header_length`,
//! `104 compression_type`. Extensions follow the header: `u32 type`, `u32 length`, data
//! padded to 8 bytes, ended by type 0.

use std::path::Path;

use super::super::{Error, ErrorKind, Limits, Result};

/// qcow2 magic.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Incompatible bit 1: the image was marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits this reader understands (bit 0, dirty, only matters to writers).
pub const INCOMPAT_KNOWN: u64 = 0b1_1111;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Autoclear bit 1: the external data file is a consistent raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Bytes of the header this parser needs at most (the header and its extensions).
pub const HEADER_READ: usize = 4096;

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub count: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// File offset of the directory.
    pub directory_offset: u64,
}

/// A parsed, range-checked qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u64,
    /// File offset of the L1 table.
    pub l1_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// Compressed clusters are zstd (else deflate).
    pub zstd: bool,
    /// L2 entries are 16 bytes with a subcluster bitmap.
    pub extended_l2: bool,
    /// Backing file name: file offset and length.
    pub backing: Option<(u64, u32)>,
    /// Backing format from the extension.
    pub backing_format: Option<String>,
    /// External data file name from the extension (with the data-file bit).
    pub data_file: Option<String>,
    /// Internal snapshots: count and table offset.
    pub snapshots: (u32, u64),
    /// Persistent bitmaps, when the extension is present and consistent.
    pub bitmaps: Option<BitmapsExt>,
}

/// Reads a big-endian u32 (the caller has checked the range).
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a big-endian u64 (the caller has checked the range).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn at(i: usize) -> u64 {
    u64::try_from(i).unwrap_or(u64::MAX)
}

/// The fields at offsets 0..72 that every version has and that decide how the rest is read.
struct Fixed {
    version: u32,
    cluster_bits: u32,
    size: u64,
}

/// The version-3 fields at offsets 72..105 (all clear, and a 72-byte header, in version 2).
struct Features {
    incompatible: u64,
    autoclear: u64,
    header_len: usize,
    zstd: bool,
    extended_l2: bool,
}

/// What the header extensions record, before the feature bits say which of it counts.
#[derive(Default)]
struct Extensions {
    backing_format: Option<String>,
    data_file: Option<String>,
    bitmaps: Option<BitmapsExt>,
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the L2 entries per table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Parses the first bytes of `path` (up to [`HEADER_READ`]); `file_len` bounds offsets.
    pub fn parse(path: &Path, h: &[u8], file_len: u64, limits: &Limits) -> Result<Self> {
        let fixed = parse_fixed(path, h)?;
        let features = parse_features(path, h, &fixed)?;
        let mut extensions = parse_extensions(path, h, features.header_len)?;
        extensions.keep_what_features_allow(path, &features)?;
        let (l1_size, l1_offset) = parse_l1(path, h, &fixed, features.extended_l2, file_len, limits)?;
        let backing = parse_backing(path, h, file_len)?;
        Ok(Self {
            version: fixed.version,
            cluster_bits: fixed.cluster_bits,
            size: fixed.size,
            l1_size,
            l1_offset,
            incompatible: features.incompatible,
            autoclear: features.autoclear,
            zstd: features.zstd,
            extended_l2: features.extended_l2,
            backing,
            backing_format: extensions.backing_format,
            data_file: extensions.data_file,
            snapshots: (be32(h, 60), be64(h, 64)),
            bitmaps: extensions.bitmaps,
        })
    }
}

/// A [`ErrorKind::Corrupt`] error at byte `at` of `path`.
fn corrupt(path: &Path, at: u64, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, path, Some(at), msg)
}

/// An [`ErrorKind::Unsupported`] error at byte `at` of `path`.
fn unsupported(path: &Path, at: u64, msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, path, Some(at), msg)
}

/// Magic, version, cluster size, virtual size and encryption: the fields that say whether
/// this is a qcow2 image this reader can read at all.
fn parse_fixed(path: &Path, h: &[u8]) -> Result<Fixed> {
    if h.len() < 72 {
        return Err(corrupt(path, 0, format!("truncated header: {} bytes, at least 72 needed", h.len())));
    }
    if h[..4] != MAGIC {
        return Err(corrupt(path, 0, "not a qcow2 image (bad magic)"));
    }
    let version = be32(h, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(path, 4, format!("qcow2 version {version}")));
    }
    let cluster_bits = be32(h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(path, 20, format!("cluster_bits {cluster_bits} outside 9..=21")));
    }
    let size = be64(h, 24);
    if size > (1 << 56) {
        return Err(corrupt(path, 24, format!("virtual size {size} is beyond what qcow2 can address")));
    }
    if be32(h, 32) != 0 {
        return Err(unsupported(path, 32, "encrypted images are not supported"));
    }
    Ok(Fixed { version, cluster_bits, size })
}

/// The feature fields of a version-3 header (none in version 2), and the one thing they
/// require of the fixed fields: extended L2 entries need clusters of at least 16 KiB.
fn parse_features(path: &Path, h: &[u8], fixed: &Fixed) -> Result<Features> {
    let features = if fixed.version == 3 {
        parse_v3_features(path, h)?
    } else {
        Features { incompatible: 0, autoclear: 0, header_len: 72, zstd: false, extended_l2: false }
    };
    if features.extended_l2 && fixed.cluster_bits < 14 {
        return Err(corrupt(path, 20, "extended L2 entries need clusters of at least 16 KiB"));
    }
    Ok(features)
}

/// Feature bits, header length and compression type: unknown incompatible bits and images
/// marked corrupt are refused here.
fn parse_v3_features(path: &Path, h: &[u8]) -> Result<Features> {
    if h.len() < 104 {
        return Err(corrupt(path, 0, format!("truncated v3 header: {} bytes, at least 104 needed", h.len())));
    }
    let incompatible = be64(h, 72);
    let autoclear = be64(h, 88);
    let header_len = usize::try_from(be32(h, 100)).unwrap_or(usize::MAX);
    if header_len < 104 || header_len > h.len() {
        return Err(corrupt(path, 100, format!("header_length {header_len} is out of range")));
    }
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(unsupported(
            path,
            72,
            format!("unknown incompatible feature bits {:#x}", incompatible & !INCOMPAT_KNOWN),
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(corrupt(path, 72, "the image is marked corrupt; run qemu-img check -r"));
    }
    let zstd = if incompatible & INCOMPAT_COMPRESSION != 0 { compression_is_zstd(path, h, header_len)? } else { false };
    Ok(Features { incompatible, autoclear, header_len, zstd, extended_l2: incompatible & INCOMPAT_EXTL2 != 0 })
}

/// The compression type byte (offset 104), read only when its incompatible bit is set:
/// 0 is deflate, 1 is zstd, anything else is refused.
fn compression_is_zstd(path: &Path, h: &[u8], header_len: usize) -> Result<bool> {
    match h.get(104) {
        Some(0) if header_len > 104 => Ok(false),
        Some(1) if header_len > 104 => Ok(true),
        Some(t) if header_len > 104 => Err(unsupported(path, 104, format!("compression type {t}"))),
        _ => Err(corrupt(path, 104, "compression type bit set but header too short")),
    }
}

/// Walks the header extensions from `header_len` up to the end marker (type 0), which must
/// come within `h`.
fn parse_extensions(path: &Path, h: &[u8], header_len: usize) -> Result<Extensions> {
    let mut extensions = Extensions::default();
    let mut pos = header_len;
    loop {
        if pos + 8 > h.len() {
            return Err(corrupt(path, at(pos), "header extensions run past the first 4 KiB"));
        }
        let (ty, len) = (be32(h, pos), usize::try_from(be32(h, pos + 4)).unwrap_or(usize::MAX));
        if ty == 0 {
            return Ok(extensions);
        }
        let data = pos + 8;
        if len > h.len().saturating_sub(data) {
            return Err(corrupt(
                path,
                at(pos),
                format!("header extension {ty:#x} of {len} bytes runs past the header"),
            ));
        }
        extensions.record(path, ty, &h[data..data + len], data)?;
        pos = data + len.div_ceil(8) * 8;
    }
}

impl Extensions {
    /// Keeps the extension of type `ty` whose `body` starts at byte `data`; types this
    /// reader does not use are skipped.
    fn record(&mut self, path: &Path, ty: u32, body: &[u8], data: usize) -> Result<()> {
        let name = |what: &str| {
            String::from_utf8(body.to_vec()).map_err(|_| corrupt(path, at(data), format!("{what} name is not UTF-8")))
        };
        match ty {
            EXT_BACKING_FORMAT => self.backing_format = Some(name("backing format")?),
            EXT_DATA_FILE => self.data_file = Some(name("data file")?),
            EXT_BITMAPS => {
                let len = body.len();
                if len < 24 {
                    return Err(corrupt(path, at(data), format!("bitmaps extension of {len} bytes, 24 expected")));
                }
                self.bitmaps = Some(BitmapsExt {
                    count: be32(body, 0),
                    directory_size: be64(body, 8),
                    directory_offset: be64(body, 16),
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// Drops what the feature bits do not vouch for: a data file name without the data-file
    /// bit, and bitmaps without autoclear bit 0. The data-file bit without a name is refused.
    fn keep_what_features_allow(&mut self, path: &Path, features: &Features) -> Result<()> {
        if features.incompatible & INCOMPAT_DATA_FILE == 0 {
            self.data_file = None;
        } else if self.data_file.is_none() {
            return Err(unsupported(path, 72, "the image has an external data file but does not record its name"));
        }
        // The bitmaps extension counts only while autoclear bit 0 says it is consistent.
        if features.autoclear & AUTOCLEAR_BITMAPS == 0 {
            self.bitmaps = None;
        }
        Ok(())
    }
}

/// The active layer's L1 table (entries at 36, offset at 40): large enough to map the
/// virtual size, within `limits`, cluster-aligned and inside the file.
fn parse_l1(
    path: &Path,
    h: &[u8],
    fixed: &Fixed,
    extended_l2: bool,
    file_len: u64,
    limits: &Limits,
) -> Result<(u64, u64)> {
    let Fixed { cluster_bits, size, .. } = *fixed;
    let cluster_size = 1u64 << cluster_bits;
    let l2_bits = cluster_bits - if extended_l2 { 4 } else { 3 };
    let l1_size = u64::from(be32(h, 36));
    let l1_offset = be64(h, 40);
    let needed = size.div_ceil(cluster_size).div_ceil(1u64 << l2_bits);
    if l1_size < needed {
        return Err(corrupt(path, 36, format!("l1_size {l1_size} is too small for {size} bytes (needs {needed})")));
    }
    if l1_size * 8 > limits.max_l1_bytes {
        return Err(corrupt(
            path,
            36,
            format!("l1_size {l1_size} exceeds the limit of {} entries", limits.max_l1_bytes / 8),
        ));
    }
    if !l1_offset.is_multiple_of(cluster_size) || l1_offset.checked_add(l1_size * 8).is_none_or(|end| end > file_len) {
        return Err(corrupt(
            path,
            40,
            format!(
                "L1 table at {l1_offset} ({l1_size} entries) is misaligned or past the end of the file ({file_len})"
            ),
        ));
    }
    Ok((l1_size, l1_offset))
}

/// Where the backing file name is (offset at 8, length at 16), if the image has one: 1 to
/// 1023 bytes inside the file.
fn parse_backing(path: &Path, h: &[u8], file_len: u64) -> Result<Option<(u64, u32)>> {
    let backing_offset = be64(h, 8);
    if backing_offset == 0 {
        return Ok(None);
    }
    let len = be32(h, 16);
    if len == 0 || len > 1023 || backing_offset.saturating_add(u64::from(len)) > file_len {
        return Err(corrupt(path, 8, format!("backing file name at {backing_offset} ({len} bytes) is out of range")));
    }
    Ok(Some((backing_offset, len)))
}
