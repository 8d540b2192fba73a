//! The chunks of one volume a backup job may store, held sparsely: one slot per chunk that
//! holds data somewhere (to be read) or that an incremental takes from the previous
//! backup, and nothing for the chunks that are zero from the start. Memory grows with the
//! data (about 44 bytes a slot), not with the virtual size: a 4 TiB volume holding 2 GiB
//! has a few hundred slots at 4 MiB chunks, not a million.
//!
//! Each slot has its chunk number, its digest (zero until the chunk is read and found to
//! hold data) and its [`Settled`] state in the resume ledger. The index the job stores is
//! made from the slots ([`Slots::index`]), encoded piece by piece as it is sent.

use std::sync::Mutex;

use vmbackup_proto::Digest;
use vmbackup_proto::index::{SparseIndex, VolumeFormat};

use super::outage::{Ledger, Settled};

/// The slots of one volume; made once by the first attempt's plan.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Chunk number of each slot, ascending.
    chunks: Vec<usize>,
    /// Digest of each slot ([`Digest::ZERO_CHUNK`] until read, and for a chunk read as zero).
    digests: Mutex<Vec<Digest>>,
    /// Which slots are done, so an attempt after a store outage resumes.
    pub(crate) ledger: Ledger,
}

/// Slots being planned, in ascending chunk order.
#[derive(Debug, Default)]
pub(crate) struct Planned {
    chunks: Vec<usize>,
    digests: Vec<Digest>,
    states: Vec<Settled>,
}

impl Planned {
    /// Adds chunk `chunk` (above every chunk added before) with its digest and state;
    /// returns its slot.
    pub(crate) fn push(&mut self, chunk: usize, digest: Digest, state: Settled) -> usize {
        debug_assert!(self.chunks.last().is_none_or(|&c| c < chunk));
        self.chunks.push(chunk);
        self.digests.push(digest);
        self.states.push(state);
        self.chunks.len() - 1
    }

    /// The slots, ready for the workers.
    pub(crate) fn done(self) -> Slots {
        let ledger = Ledger::new(self.chunks.len());
        for (slot, s) in self.states.into_iter().enumerate() {
            ledger.set(slot, s);
        }
        Slots { chunks: self.chunks, digests: Mutex::new(self.digests), ledger }
    }
}

impl Slots {
    /// Chunk number of `slot`.
    pub(crate) fn chunk(&self, slot: usize) -> usize {
        self.chunks.get(slot).copied().unwrap_or(usize::MAX)
    }

    /// Records the digest a worker found for `slot`.
    pub(crate) fn set_digest(&self, slot: usize, digest: Digest) {
        if let Some(d) = self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(slot) {
            *d = digest;
        }
    }

    /// `(slot, digest)` of every slot holding data.
    pub(crate) fn with_data(&self) -> Vec<(usize, Digest)> {
        let digests = self.digests.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        digests.iter().enumerate().filter(|(_, d)| !d.is_zero_chunk()).map(|(s, d)| (s, *d)).collect()
    }

    /// The volume's index: every slot holding data, every other chunk zero.
    pub(crate) fn index(
        &self,
        volume_uuid: [u8; 16],
        virtual_size: u64,
        chunk_size: u32,
        format: VolumeFormat,
    ) -> SparseIndex {
        let entries =
            self.with_data().into_iter().map(|(s, d)| (u64::try_from(self.chunk(s)).unwrap_or(u64::MAX), d)).collect();
        SparseIndex { volume_uuid, virtual_size, chunk_size, format, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_sparse_volume_takes_memory_for_its_data_chunks_only() {
        // 4 TiB at 4 MiB chunks is 1 Mi chunks; 512 of them hold data.
        let mut p = Planned::default();
        for i in 0..512 {
            p.push(i * 2048, Digest::ZERO_CHUNK, Settled::No);
        }
        let slots = p.done();
        for s in (0..512).step_by(2) {
            slots.set_digest(s, Digest::of(&s.to_le_bytes()));
        }
        let held = slots.chunks.capacity() * 8 + slots.digests.lock().expect("digests").capacity() * 32;
        assert!(held < 64 << 10, "{held} bytes for 512 slots");
        let ix = slots.index([1; 16], 4 << 40, 4 << 20, VolumeFormat::Raw);
        assert_eq!(ix.entries.len(), 256);
        assert_eq!(ix.entries[1], (4096, Digest::of(&2usize.to_le_bytes())));
        assert_eq!(ix.encoded_len(), 48 + ((1 << 20) + 1) * 32);
    }
}
