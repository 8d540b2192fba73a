//! The internal snapshot table and the persistent bitmap directory, parsed from bytes alone
//! (no I/O). Both are untrusted: counts and sizes are bounded before anything is allocated,
//! and errors name the file offset of the entry at fault.
//!
//! Snapshot table entry (big-endian): `0 l1_table_offset u64`, `8 l1_size u32`,
//! `12 id_str_size u16`, `14 name_size u16`, `16 date_sec u32`, `20 date_nsec u32`,
//! `24 vm_clock_nsec u64`, `32 vm_state_size u32`, `36 extra_data_size u32`, `40 extra data`
//! (bytes 8..16 of it: the snapshot's disk size), then the id, the name, padding to 8.
//!
//! Bitmap directory entry: `0 bitmap_table_offset u64`, `8 bitmap_table_size u32`,
//! `12 flags u32` (bit 0 in use, bit 1 auto), `16 type u8` (1 = dirty tracking),
//! `17 granularity_bits u8`, `18 name_size u16`, `20 extra_data_size u32`, `24 extra data`,
//! then the name, padding to 8. Bitmap table entry: bits 9..=55 the offset of a cluster of
//! bitmap data, or 0 with bit 0 telling all-ones from all-zeros; in the data, bit `j` of
//! byte `i` is granule `8 * i + j`.

use std::path::Path;

use super::super::{Error, ErrorKind, Result};
use super::header::{be32, be64};

/// Most snapshots an image may list (QEMU's own limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table or bitmap directory read, bytes.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Most bitmaps an image may list (QEMU's own limit).
pub const MAX_BITMAPS: u32 = 65535;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its id string.
    pub id: String,
    /// Its name.
    pub name: String,
    /// File offset of its L1 table.
    pub l1_offset: u64,
    /// Its L1 entries.
    pub l1_size: u64,
    /// Virtual size when it was taken (v3 extra data), if recorded.
    pub disk_size: Option<u64>,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
}

/// One persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Flag `in_use`: the bitmap was not stored cleanly and cannot be trusted.
    pub in_use: bool,
    /// Flag `auto`: QEMU updates it on every write.
    pub auto: bool,
    /// Bitmap type (1 = dirty tracking).
    pub kind: u8,
    /// File offset of its bitmap table.
    pub table_offset: u64,
    /// Entries in its bitmap table.
    pub table_size: u32,
}

fn corrupt(path: &Path, at: u64, msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, path, Some(at), msg)
}

fn off(base: u64, i: usize) -> u64 {
    base.saturating_add(u64::try_from(i).unwrap_or(u64::MAX))
}

fn utf8(path: &Path, at: u64, b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| corrupt(path, at, format!("{what} is not UTF-8")))
}

/// Parses `count` snapshot entries from `b`, which was read at file offset `base`.
pub fn parse_snapshots(path: &Path, b: &[u8], base: u64, count: u32) -> Result<Vec<SnapshotInfo>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for n in 0..count {
        if pos + 40 > b.len() {
            return Err(corrupt(
                path,
                off(base, pos.min(b.len())),
                format!("snapshot {n} runs past the snapshot table"),
            ));
        }
        let (id_len, name_len) = (usize::from(u16::from_be_bytes([b[pos + 12], b[pos + 13]])), {
            usize::from(u16::from_be_bytes([b[pos + 14], b[pos + 15]]))
        });
        let extra = usize::try_from(be32(b, pos + 36)).unwrap_or(usize::MAX);
        let end = (pos + 40).saturating_add(extra).saturating_add(id_len).saturating_add(name_len);
        if end > b.len() {
            return Err(corrupt(path, off(base, pos), format!("snapshot {n} runs past the snapshot table")));
        }
        let e = pos + 40;
        let disk_size = (extra >= 16).then(|| be64(b, e + 8));
        let id = utf8(path, off(base, e + extra), &b[e + extra..e + extra + id_len], "a snapshot id")?;
        let name = utf8(path, off(base, e + extra + id_len), &b[e + extra + id_len..end], "a snapshot name")?;
        out.push(SnapshotInfo {
            id,
            name,
            l1_offset: be64(b, pos),
            l1_size: u64::from(be32(b, pos + 8)),
            disk_size,
            date_sec: be32(b, pos + 16),
        });
        pos = end.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Parses `count` bitmap directory entries from `b`, read at file offset `base`.
pub fn parse_bitmaps(path: &Path, b: &[u8], base: u64, count: u32) -> Result<Vec<BitmapInfo>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for n in 0..count {
        if pos + 24 > b.len() {
            return Err(corrupt(
                path,
                off(base, pos.min(b.len())),
                format!("bitmap {n} runs past the bitmap directory"),
            ));
        }
        let flags = be32(b, pos + 12);
        let (kind, granularity_bits) = (b[pos + 16], b[pos + 17]);
        let name_len = usize::from(u16::from_be_bytes([b[pos + 18], b[pos + 19]]));
        let extra = usize::try_from(be32(b, pos + 20)).unwrap_or(usize::MAX);
        let end = (pos + 24).saturating_add(extra).saturating_add(name_len);
        if end > b.len() {
            return Err(corrupt(path, off(base, pos), format!("bitmap {n} runs past the bitmap directory")));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(corrupt(
                path,
                off(base, pos + 17),
                format!("bitmap {n} has granularity_bits {granularity_bits} outside 9..=31"),
            ));
        }
        let name = utf8(path, off(base, pos + 24 + extra), &b[pos + 24 + extra..end], "a bitmap name")?;
        out.push(BitmapInfo {
            name,
            granularity: 1u64 << granularity_bits,
            in_use: flags & 1 != 0,
            auto: flags & 2 != 0,
            kind,
            table_offset: be64(b, pos),
            table_size: be32(b, pos + 8),
        });
        pos = end.div_ceil(8) * 8;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `qcow2_header` fuzz target: the second entry would start past the end
    /// of the table (after the first one's padding); the error must name an offset inside.
    #[test]
    fn an_entry_starting_past_the_table_names_its_end() {
        let crash: [u8; 43] = [
            0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x9a, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let rest = &crash[1..];
        for e in [
            parse_snapshots(Path::new("t"), rest, 0, 16).expect_err("short table"),
            parse_bitmaps(Path::new("t"), rest, 0, 16).expect_err("short directory"),
        ] {
            assert!(e.offset.is_some_and(|o| o <= 42), "{e}");
        }
    }
}
