//! The objects store servers read from a shared bucket ([`vmbackup_store::shared`]) under
//! arbitrary bytes: anyone who can write to the bucket can put anything there, so every
//! reader must refuse garbage with an error, never panic or loop. The first byte picks the
//! reader: digest lists (journals, fences), session records, GC leases. A digest list that
//! decodes must encode back to the same bytes (the format has one spelling).

#![allow(dead_code)]

use vmbackup_store::shared::gc::Lease;
use vmbackup_store::shared::{SessionRecord, decode_digests, encode_digests};

/// One input.
pub fn run(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 3 {
        0 => {
            if let Ok(ds) = decode_digests(rest, "fuzz") {
                assert_eq!(encode_digests(&ds), rest, "a decoded digest list encodes back");
            }
        }
        1 => {
            if let Ok(r) = serde_json::from_slice::<SessionRecord>(rest) {
                let _ = (r.started(), r.expires(), r.ttl(), r.owner());
            }
        }
        _ => {
            let _ = serde_json::from_slice::<Lease>(rest);
        }
    }
}
