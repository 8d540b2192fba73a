//! qcow2 reader: versions 2 and 3, cluster sizes 512 B ..= 2 MiB, zero clusters, compressed
//! clusters (deflate and zstd), extended L2 entries (subclusters), external data files,
//! backing chains of qcow2 or raw images, internal snapshots (the active layer, or a named
//! snapshot) and the persistent bitmap directory. Encrypted images and unknown incompatible
//! feature bits are refused as unsupported, never read wrongly.
//!
//! The format layer answers "what is at this guest offset" with a [`Plan`]; reads are
//! `pread`s of the planned host ranges, so worker threads share one open image without a
//! lock (only the small L2-table cache has one, never held across I/O). The header and the
//! tables are parsed from bytes in [`header`] and [`tables`]; opening an image and its
//! backing chain, where those untrusted offsets are checked, is in `open`.

pub mod header;
mod open;
pub mod tables;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use self::header::MAGIC;
use self::header::{Header, be64};
use self::tables::{BitmapInfo, MAX_BITMAPS, MAX_SNAPSHOTS, MAX_TABLE_BYTES, SnapshotInfo};
use super::{Error, ErrorKind, Extent, ExtentKind, Result, VolumeFormat, VolumeSource, push_extent};

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

/// Where the bytes at a guest offset come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Stored uncompressed at this host offset (of the external data file, if there is one).
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

/// The file guest data clusters live in: the image itself or its external data file.
#[derive(Debug)]
struct DataFile {
    path: PathBuf,
    file: File,
    len: u64,
}

/// An open qcow2 image (and its backing chain).
#[derive(Debug)]
pub struct Qcow2Volume {
    path: PathBuf,
    file: File,
    file_len: u64,
    header: Header,
    size: u64,
    l1: Vec<u64>,
    data_file: Option<DataFile>,
    backing: Option<Box<dyn VolumeSource>>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    l2_cache_tables: usize,
}

impl Qcow2Volume {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots the image lists.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        read_snapshots(&self.path, &self.file, self.file_len, &self.header)
    }

    /// The persistent dirty bitmaps the image lists (none when the bitmaps extension is
    /// absent or not marked consistent).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let Some(ext) = self.header.bitmaps else { return Ok(Vec::new()) };
        if ext.count > MAX_BITMAPS || ext.directory_size > MAX_TABLE_BYTES {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                None,
                format!("bitmap directory of {} entries, {} bytes, is out of range", ext.count, ext.directory_size),
            ));
        }
        let b = read_table(&self.path, &self.file, self.file_len, ext.directory_offset, ext.directory_size)?;
        tables::parse_bitmaps(&self.path, &b, ext.directory_offset, ext.count)
    }

    /// The guest ranges the persistent bitmap `name` marks dirty, merged. Refused when the
    /// bitmap is missing, was not stored cleanly (`in_use`), or does not track writes
    /// (`auto` clear): its contents would not say what changed.
    pub fn bitmap_dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let bm =
            self.bitmaps()?.into_iter().find(|b| b.name == name).ok_or_else(|| {
                Error::new(ErrorKind::InvalidArgument, &self.path, None, format!("no bitmap {name:?}"))
            })?;
        if bm.in_use || !bm.auto || bm.kind != 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                &self.path,
                None,
                format!("bitmap {name:?} is not a consistent, enabled dirty bitmap"),
            ));
        }
        let cs = self.cluster_size();
        let bits_per_cluster = cs * 8;
        let granules = self.header.size.div_ceil(bm.granularity);
        let want_entries = granules.div_ceil(bits_per_cluster);
        if u64::from(bm.table_size) < want_entries {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(bm.table_offset),
                format!("bitmap {name:?} has {} table entries, {want_entries} needed", bm.table_size),
            ));
        }
        let table = read_table(&self.path, &self.file, self.file_len, bm.table_offset, want_entries * 8)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |g: u64, n: u64| {
            let (start, end) = (g * bm.granularity, ((g + n) * bm.granularity).min(self.header.size));
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
                _ => out.push((start, end - start)),
            }
        };
        let mut cluster = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for (k, e) in table.chunks_exact(8).enumerate() {
            let entry = be64(e, 0);
            let first = u64::try_from(k).unwrap_or(0) * bits_per_cluster;
            let n = bits_per_cluster.min(granules - first);
            let offset = entry & 0x00ff_ffff_ffff_fe00;
            if offset == 0 {
                if entry & 1 != 0 {
                    push(first, n);
                }
                continue;
            }
            self.read_bitmap_cluster(bm.table_offset + u64::try_from(k * 8).unwrap_or(0), offset, &mut cluster)?;
            for bit in 0..n {
                let i = usize::try_from(bit / 8).unwrap_or(0);
                if cluster[i] & (1 << (bit % 8)) != 0 {
                    push(first + bit, 1);
                }
            }
        }
        Ok(out)
    }

    /// Reads the bitmap data cluster at `offset`, which the bitmap table entry at
    /// `entry_at` points at: a whole, aligned cluster inside the file.
    fn read_bitmap_cluster(&self, entry_at: u64, offset: u64, cluster: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || offset.saturating_add(cs) > self.file_len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(entry_at),
                format!("bitmap data cluster at {offset} is misaligned or past the end of the file"),
            ));
        }
        self.file
            .read_exact_at(cluster, offset)
            .map_err(|e| Error::io(&self.path, Some(offset), "reading bitmap data", e))
    }

    /// Where data clusters live: (path, file, length).
    fn data(&self) -> (&Path, &File, u64) {
        match &self.data_file {
            Some(d) => (&d.path, &d.file, d.len),
            None => (&self.path, &self.file, self.file_len),
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.header.cluster_bits
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
        let cluster = g >> self.header.cluster_bits;
        let l1_index = usize::try_from(cluster >> self.header.l2_bits()).unwrap_or(usize::MAX);
        let l2_index = usize::try_from(cluster & ((1 << self.header.l2_bits()) - 1)).unwrap_or(0);
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0);
        if l2_offset == 0 {
            // The whole L2 range is unallocated in this layer.
            let span = cs << self.header.l2_bits();
            return Ok((Plan::Unallocated, span - (g & (span - 1))));
        }
        let table = self.l2_table(l2_offset)?;
        let stride = if self.header.extended_l2 { 2 } else { 1 };
        let entry = table[l2_index * stride];
        let entry_at = l2_offset + u64::try_from(l2_index * stride * 8).unwrap_or(0);
        let rest_of_cluster = cs - in_cluster;
        if entry & COMPRESSED != 0 {
            return Ok((self.compressed_plan(entry, entry_at)?, rest_of_cluster));
        }
        let host = entry & L2_OFFSET_MASK;
        // An external data file reads like a raw file (zeros past its end); the image
        // itself must hold every cluster it points at.
        let past_end = self.data_file.is_none() && host >= self.file_len;
        // With an external data file, offset 0 is a real place: bit 63 ("copied") then says
        // the cluster is allocated there.
        let allocated = host != 0 || (self.data_file.is_some() && entry & (1 << 63) != 0);
        if host != 0 && (!host.is_multiple_of(cs) || past_end) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(entry_at),
                format!("L2 entry points at {host}, misaligned or past the end of the file ({})", self.file_len),
            ));
        }
        if self.header.extended_l2 {
            let bitmap = table[l2_index * 2 + 1];
            return self.subcluster_plan(bitmap, host, allocated, in_cluster, entry_at);
        }
        let plan = if self.header.version >= 3 && entry & 1 != 0 {
            Plan::Zero
        } else if !allocated {
            Plan::Unallocated
        } else {
            Plan::Data { host: host + in_cluster }
        };
        Ok((plan, rest_of_cluster))
    }

    /// The plan of a compressed L2 entry (at `entry_at`): where its data starts and how
    /// many bytes to read, which must start inside the image itself.
    fn compressed_plan(&self, entry: u64, entry_at: u64) -> Result<Plan> {
        let x = 62 - (self.header.cluster_bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (self.header.cluster_bits - 8)) - 1);
        let len = (sectors + 1) * 512 - (host & 511);
        if self.data_file.is_some() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(entry_at),
                "compressed cluster in an image with an external data file",
            ));
        }
        if host >= self.file_len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                &self.path,
                Some(entry_at),
                format!("compressed cluster at {host} is past the end of the file ({})", self.file_len),
            ));
        }
        Ok(Plan::Compressed { host, len })
    }

    /// What is at byte `in_cluster` of a cluster with an extended L2 entry (at `entry_at`,
    /// pointing at `host`, with subcluster `bitmap`), and for how many bytes: the rest of
    /// its subcluster.
    fn subcluster_plan(
        &self,
        bitmap: u64,
        host: u64,
        allocated: bool,
        in_cluster: u64,
        entry_at: u64,
    ) -> Result<(Plan, u64)> {
        let sc_size = self.cluster_size() / 32;
        let sc = in_cluster / sc_size;
        let rest = sc_size - (in_cluster % sc_size);
        let plan = if bitmap & (1 << sc) != 0 {
            if !allocated {
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
        Ok((plan, rest))
    }

    fn decompress(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let len = len.min(self.file_len - host);
        let mut compressed = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.file
            .read_exact_at(&mut compressed, host)
            .map_err(|e| Error::io(&self.path, Some(host), "reading a compressed cluster", e))?;
        let mut out = vec![0u8; usize::try_from(self.cluster_size()).unwrap_or(0)];
        let result = if self.header.zstd {
            zstd::stream::read::Decoder::with_buffer(&compressed[..]).and_then(|mut d| d.read_exact(&mut out))
        } else {
            flate2::read::DeflateDecoder::new(&compressed[..]).read_exact(&mut out)
        };
        result.map_err(|e| {
            let algo = if self.header.zstd { "zstd" } else { "deflate" };
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

    fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.path.clone()];
        out.extend(self.data_file.as_ref().map(|d| d.path.clone()));
        out.extend(self.backing.as_ref().map(|b| b.files()).unwrap_or_default());
        out
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
                    let (dpath, dfile, dlen) = self.data();
                    let end = host.saturating_add(u64::try_from(n).unwrap_or(0));
                    let have = if self.data_file.is_some() {
                        usize::try_from(dlen.saturating_sub(host)).unwrap_or(usize::MAX).min(n)
                    } else if end > dlen {
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            dpath,
                            Some(host),
                            format!("data cluster runs past the end of the file ({dlen})"),
                        ));
                    } else {
                        n
                    };
                    dfile
                        .read_exact_at(&mut dst[..have], host)
                        .map_err(|e| Error::io(dpath, Some(host), "reading data", e))?;
                    dst[have..].fill(0);
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

fn read_table(path: &Path, file: &File, file_len: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            path,
            Some(offset),
            format!("table of {len} bytes at {offset} runs past the end of the file ({file_len})"),
        ));
    }
    let mut b = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut b, offset).map_err(|e| Error::io(path, Some(offset), "reading a table", e))?;
    Ok(b)
}

fn read_snapshots(path: &Path, file: &File, file_len: u64, header: &Header) -> Result<Vec<SnapshotInfo>> {
    let (count, offset) = header.snapshots;
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_SNAPSHOTS {
        return Err(Error::new(
            ErrorKind::Corrupt,
            path,
            Some(60),
            format!("{count} snapshots, at most {MAX_SNAPSHOTS}"),
        ));
    }
    let len = (file_len.saturating_sub(offset)).min(MAX_TABLE_BYTES);
    let b = read_table(path, file, file_len, offset, len)?;
    tables::parse_snapshots(path, &b, offset, count)
}
