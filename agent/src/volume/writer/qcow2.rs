//! The qcow2 restore writer: a qcow2 v3 image with 64 KiB clusters and 16-bit refcounts in
//! which only clusters holding non-zero data are allocated.
//!
//! Layout, decided as the restore goes: cluster 0 is the header; data clusters are handed
//! out in the order writes arrive (many threads; one short lock per write to reserve a run
//! of clusters, the data itself written without it); [`VolumeWriter::finish`] then appends
//! the L2 tables, the L1 table, the refcount blocks and the refcount table, and writes the
//! header last. Every cluster of the file is referenced exactly once, so `qemu-img check`
//! finds no leak and no error. The L2 tables are kept in memory until then: 64 KiB per
//! 512 MiB of allocated guest data.
//!
//! Header as written (big-endian): magic, version 3, no backing file, `cluster_bits` 16,
//! size, no encryption, `l1_size`, `l1_table_offset`, `refcount_table_offset`,
//! `refcount_table_clusters`, no snapshots, no feature bits, `refcount_order` 4,
//! `header_length` 104, then the end-of-extensions marker.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use super::{Target, VolumeWriter, check_range};
use crate::volume::qcow2::MAGIC;
use crate::volume::{Error, ErrorKind, Result};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// "Refcount is exactly one": set on L1 and L2 entries of clusters nothing else shares.
const COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 104;
/// Largest virtual size written (QEMU's own limit for 64 KiB clusters is far above this).
pub const MAX_SIZE: u64 = 1 << 50;

#[derive(Debug, Default)]
struct Map {
    /// Next free cluster index (cluster 0 is the header).
    next: u64,
    /// L1 index → the L2 table's host offsets, by guest cluster within the table.
    l2: BTreeMap<u64, Box<[u64]>>,
}

/// A qcow2 volume being restored.
#[derive(Debug)]
pub struct Qcow2Writer {
    target: Target,
    size: u64,
    map: Mutex<Map>,
}

impl Qcow2Writer {
    /// A writer for a `size`-byte qcow2 volume into `target` (a new file).
    pub fn new(target: Target, size: u64) -> Result<Self> {
        if target.in_place {
            return Err(Error::new(ErrorKind::InvalidArgument, &target.path, None, "qcow2 cannot be written in place"));
        }
        if size > MAX_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                &target.path,
                None,
                format!("virtual size {size} is larger than {MAX_SIZE}"),
            ));
        }
        Ok(Self { target, size, map: Mutex::new(Map { next: 1, l2: BTreeMap::new() }) })
    }

    /// Reserves host clusters for guest clusters `first..first + n` and returns the host
    /// offset of the first (they are contiguous).
    fn allocate(&self, first: u64, n: u64) -> Result<u64> {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in first..first + n {
            let table = map
                .l2
                .entry(c / L2_ENTRIES)
                .or_insert_with(|| vec![0u64; usize::try_from(L2_ENTRIES).unwrap_or(0)].into_boxed_slice());
            if table[usize::try_from(c % L2_ENTRIES).unwrap_or(0)] != 0 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    &self.target.written,
                    Some(c * CLUSTER),
                    "guest cluster written twice",
                ));
            }
        }
        let host = map.next * CLUSTER;
        for (i, c) in (first..first + n).enumerate() {
            let at = usize::try_from(c % L2_ENTRIES).unwrap_or(0);
            let entry = (host + u64::try_from(i).unwrap_or(0) * CLUSTER) | COPIED;
            if let Some(t) = map.l2.get_mut(&(c / L2_ENTRIES)) {
                t[at] = entry;
            }
        }
        map.next += n;
        Ok(host)
    }

    fn write_run(&self, first: u64, data: &[u8]) -> Result<()> {
        let n = u64::try_from(data.len()).unwrap_or(0).div_ceil(CLUSTER);
        let host = self.allocate(first, n)?;
        self.target.write_data(data, host)
    }
}

fn be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

impl VolumeWriter for Qcow2Writer {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        check_range(&self.target, self.size, offset, len)?;
        if !offset.is_multiple_of(CLUSTER) || (!len.is_multiple_of(CLUSTER) && offset + len != self.size) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                &self.target.written,
                Some(offset),
                format!("qcow2 restore writes must be whole 64 KiB clusters (got {len} bytes)"),
            ));
        }
        // Runs of non-zero clusters each get contiguous host clusters; zero clusters stay
        // unallocated and read as zeros.
        let cluster = usize::try_from(CLUSTER).unwrap_or(usize::MAX);
        let mut run_start: Option<usize> = None;
        for (i, piece) in data.chunks(cluster).enumerate() {
            let zero = vmbackup_proto::digest::is_all_zero(piece);
            match (zero, run_start) {
                (false, None) => run_start = Some(i),
                (true, Some(s)) => {
                    self.write_run(offset / CLUSTER + u64::try_from(s).unwrap_or(0), &data[s * cluster..i * cluster])?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            self.write_run(offset / CLUSTER + u64::try_from(s).unwrap_or(0), &data[s * cluster..])?;
        }
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        check_range(&self.target, self.size, offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let Self { target, size, map } = *self;
        let map = map.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = map.next;
        let file = &target.file;
        let write = |at: u64, b: &[u8], what: &str| file.write_all_at(b, at).map_err(|e| target.io(Some(at), what, e));

        // L2 tables.
        let l1_size = size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES).max(1);
        let mut l1 = vec![0u8; usize::try_from(l1_size * 8).unwrap_or(0)];
        for (&index, table) in &map.l2 {
            let at = next * CLUSTER;
            next += 1;
            let mut b = vec![0u8; usize::try_from(CLUSTER).unwrap_or(0)];
            for (i, &e) in table.iter().enumerate() {
                be64(&mut b, i * 8, e);
            }
            write(at, &b, "writing an L2 table")?;
            be64(&mut l1, usize::try_from(index).unwrap_or(0) * 8, at | COPIED);
        }
        // L1 table.
        let l1_offset = next * CLUSTER;
        next += u64::try_from(l1.len()).unwrap_or(0).div_ceil(CLUSTER);
        write(l1_offset, &l1, "writing the L1 table")?;
        // Refcount blocks and table: they must count themselves too.
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = next + blocks + table_clusters;
            let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let t = (b * 8).div_ceil(CLUSTER);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let total = next + blocks + table_clusters;
        let blocks_at = next * CLUSTER;
        let table_at = blocks_at + blocks * CLUSTER;
        let mut table = vec![0u8; usize::try_from(table_clusters * CLUSTER).unwrap_or(0)];
        for b in 0..blocks {
            let mut block = vec![0u8; usize::try_from(CLUSTER).unwrap_or(0)];
            let first = b * REFCOUNTS_PER_BLOCK;
            for c in first..total.min(first + REFCOUNTS_PER_BLOCK) {
                let at = usize::try_from((c - first) * 2).unwrap_or(0);
                block[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            }
            write(blocks_at + b * CLUSTER, &block, "writing a refcount block")?;
            be64(&mut table, usize::try_from(b * 8).unwrap_or(0), blocks_at + b * CLUSTER);
        }
        write(table_at, &table, "writing the refcount table")?;
        file.set_len(total * CLUSTER).map_err(|e| target.io(None, "sizing the image", e))?;

        // The header last: until now the file is not a qcow2 image at all.
        let mut h = vec![0u8; usize::try_from(HEADER_LENGTH).unwrap_or(0) + 8];
        h[..4].copy_from_slice(&MAGIC);
        be32(&mut h, 4, 3);
        be32(&mut h, 20, CLUSTER_BITS);
        be64(&mut h, 24, size);
        be32(&mut h, 36, u32::try_from(l1_size).unwrap_or(u32::MAX));
        be64(&mut h, 40, l1_offset);
        be64(&mut h, 48, table_at);
        be32(&mut h, 56, u32::try_from(table_clusters).unwrap_or(u32::MAX));
        be32(&mut h, 96, 4);
        be32(&mut h, 100, HEADER_LENGTH);
        write(0, &h, "writing the header")?;
        target.commit()
    }
}
