//! Shared-bucket objects (digest lists, session records, leases) under arbitrary bytes:
//! see `bucket_harness.rs`.
#![no_main]

#[path = "../bucket_harness.rs"]
mod bucket_harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bucket_harness::run(data));
