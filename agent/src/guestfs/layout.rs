//! Where the filesystems of a disk are: a GPT, an MBR's primary partitions, or the whole
//! disk, and what each one holds by its magic number. Every field read from the disk is
//! untrusted: counts and sizes are bounded, partitions must lie inside the disk, and a
//! table that does not hold together is reported naming the field, never trusted.
//!
//! Both tables are small enough to read directly (an MBR is four 16-byte entries; a GPT
//! header names an array of fixed-size entries). The `gpt` and `mbrman` crates read them
//! too, through a `Read + Seek` (and, for `gpt`, `Write`) device; the few bounded fields a
//! lister needs are shorter than that adapter.

use super::Disk;
use crate::error::{AgentError, ErrorKind, Result};

/// What a partition (or the whole disk) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4 (magic 0xEF53 at byte 1080).
    Ext,
    /// XFS (`XFSB` at byte 0).
    Xfs,
    /// An LVM physical volume (`LABELONE` in one of its first four sectors).
    Lvm,
    /// Nothing this agent recognises.
    Unknown,
}

impl FsKind {
    /// Its name in listings and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext => "ext",
            FsKind::Xfs => "xfs",
            FsKind::Lvm => "lvm",
            FsKind::Unknown => "unknown",
        }
    }
}

/// One place a filesystem may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Partition number as the table numbers it (1-based); 0 is the whole disk.
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: FsKind,
}

const SECTOR: u64 = 512;
/// GPT entries read at most (the specification's minimum array is 128).
const MAX_GPT_ENTRIES: u32 = 1024;

fn bad(what: &str) -> AgentError {
    AgentError::new(ErrorKind::FailedPrecondition, format!("partition table: {what}"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn read(disk: &dyn Disk, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if offset.saturating_add(len as u64) > disk.size() {
        return Ok(Vec::new());
    }
    disk.read_at(offset, &mut buf).map_err(|e| {
        AgentError::new(ErrorKind::Unavailable, format!("reading the disk at offset {offset}")).with_source(e)
    })?;
    Ok(buf)
}

/// What the bytes at `start` hold.
pub fn kind_at(disk: &dyn Disk, start: u64, len: u64) -> Result<FsKind> {
    if len < 2048 {
        return Ok(FsKind::Unknown);
    }
    let head = read(disk, start, 2048)?;
    if head.len() < 2048 {
        return Ok(FsKind::Unknown);
    }
    if head[1080..1082] == [0x53, 0xEF] {
        return Ok(FsKind::Ext);
    }
    if &head[..4] == b"XFSB" {
        return Ok(FsKind::Xfs);
    }
    if (0..4).any(|s| &head[s * 512..s * 512 + 8] == b"LABELONE") {
        return Ok(FsKind::Lvm);
    }
    Ok(FsKind::Unknown)
}

/// The partitions of `disk` with what each holds; the whole disk (number 0) when it has no
/// partition table.
pub fn parts(disk: &dyn Disk) -> Result<Vec<Part>> {
    let size = disk.size();
    let mbr = read(disk, 0, 512)?;
    let whole = |disk: &dyn Disk| -> Result<Vec<Part>> {
        Ok(vec![Part { number: 0, start: 0, len: size, kind: kind_at(disk, 0, size)? }])
    };
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xAA] {
        return whole(disk);
    }
    // A filesystem on the whole disk may end its first sector with 0x55AA too (FAT does);
    // ext and XFS do not, so a recognised one wins over a table.
    if kind_at(disk, 0, size)? != FsKind::Unknown {
        return whole(disk);
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
            (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
        })
        .collect();
    if entries.iter().any(|(t, _, _)| *t == 0xEE) {
        return gpt(disk);
    }
    let mut out = Vec::new();
    for (i, (kind, first, count)) in entries.into_iter().enumerate() {
        if kind == 0 || count == 0 {
            continue;
        }
        let number = u32::try_from(i + 1).unwrap_or(0);
        if matches!(kind, 0x05 | 0x0F | 0x85) {
            tracing::info!(partition = number, "extended MBR partition: its logical partitions are not listed");
            continue;
        }
        out.push(checked(disk, number, first, count, "MBR")?);
    }
    if out.is_empty() {
        return whole(disk);
    }
    Ok(out)
}

/// A partition of `count` sectors from sector `first`, which must lie inside the disk.
fn checked(disk: &dyn Disk, number: u32, first: u64, count: u64, table: &str) -> Result<Part> {
    let start = first.checked_mul(SECTOR);
    let len = count.checked_mul(SECTOR);
    match (start, len) {
        (Some(start), Some(len)) if start.checked_add(len).is_some_and(|end| end <= disk.size()) && start > 0 => {
            Ok(Part { number, start, len, kind: kind_at(disk, start, len)? })
        }
        _ => Err(bad(&format!(
            "{table} partition {number} (sectors {first} + {count}) does not lie inside the {}-byte disk",
            disk.size()
        ))),
    }
}

/// The partitions a GPT (header at LBA 1, 512-byte sectors) names.
fn gpt(disk: &dyn Disk) -> Result<Vec<Part>> {
    let h = read(disk, SECTOR, 512)?;
    if h.len() < 92 || &h[..8] != b"EFI PART" {
        return Err(bad("the MBR is a GPT's protective one but LBA 1 has no GPT header (signature)"));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let entry_size = le32(&h, 84);
    if count > MAX_GPT_ENTRIES {
        return Err(bad(&format!("GPT names {count} partition entries; at most {MAX_GPT_ENTRIES} are read")));
    }
    if !(128..=4096).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return Err(bad(&format!("GPT partition entry size {entry_size} is not a multiple of 8 in 128..=4096")));
    }
    let table_len = usize::try_from(u64::from(count) * u64::from(entry_size)).unwrap_or(usize::MAX);
    let table_at = entries_lba.checked_mul(SECTOR).ok_or_else(|| bad("GPT partition entry LBA overflows"))?;
    let table = read(disk, table_at, table_len)?;
    if table.len() < table_len {
        return Err(bad(&format!("GPT partition entries at LBA {entries_lba} lie beyond the disk")));
    }
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let number = u32::try_from(i + 1).unwrap_or(0);
        if last < first {
            return Err(bad(&format!("GPT partition {number} ends (LBA {last}) before it starts (LBA {first})")));
        }
        out.push(checked(disk, number, first, last - first + 1, "GPT")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl Disk for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let at = usize::try_from(offset).expect("fits");
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
    }

    fn ext_at(d: &mut [u8], start: usize) {
        d[start + 1080] = 0x53;
        d[start + 1081] = 0xEF;
    }

    #[test]
    fn whole_disk_mbr_and_gpt_layouts_are_found_and_bad_tables_named() {
        let mut d = vec![0u8; 4 << 20];
        ext_at(&mut d, 0);
        assert_eq!(
            parts(&Mem(d.clone())).expect("whole")[0],
            Part { number: 0, start: 0, len: 4 << 20, kind: FsKind::Ext }
        );

        // MBR: partition 2 at sector 2048 (1 MiB), 2048 sectors, holding ext.
        let mut d = vec![0u8; 4 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        let e = 446 + 16;
        d[e + 4] = 0x83;
        d[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
        d[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        ext_at(&mut d, 1 << 20);
        let p = parts(&Mem(d.clone())).expect("mbr");
        assert_eq!(p, vec![Part { number: 2, start: 1 << 20, len: 1 << 20, kind: FsKind::Ext }]);
        d[e + 12..e + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = parts(&Mem(d)).expect_err("beyond the disk");
        assert!(err.to_string().contains("MBR partition 2"), "{err}");

        // GPT: protective MBR, header at LBA 1, 4 entries of 128 bytes at LBA 2.
        let mut d = vec![0u8; 4 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        d[446 + 4] = 0xEE;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024 + 128;
        d[e] = 1;
        d[e + 32..e + 40].copy_from_slice(&4096u64.to_le_bytes());
        d[e + 40..e + 48].copy_from_slice(&6143u64.to_le_bytes());
        d[2 << 20] = b'X';
        d[(2 << 20) + 1..(2 << 20) + 4].copy_from_slice(b"FSB");
        let p = parts(&Mem(d.clone())).expect("gpt");
        assert_eq!(p, vec![Part { number: 2, start: 2 << 20, len: 1 << 20, kind: FsKind::Xfs }]);
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = parts(&Mem(d)).expect_err("huge count");
        assert!(err.to_string().contains("partition entries"), "{err}");
    }
}
