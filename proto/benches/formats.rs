//! Micro-benchmarks of the chunk formats: BLAKE3 of a 4 MiB chunk, zero detection, blob
//! encode/decode at a few zstd levels on text-like data, and what sealing adds (keyed
//! BLAKE3, AES-256-GCM) on text-like and on incompressible data.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vmbackup_proto::blob;
use vmbackup_proto::digest::{Digest, is_all_zero};
use vmbackup_proto::seal::ChunkKey;

const CHUNK: usize = 4 << 20;

fn text_like() -> Vec<u8> {
    let words = ["backup ", "volume ", "chunk ", "qemu ", "the ", "of ", "store ", "kvm\n"];
    let mut x: u32 = 1;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        out.extend_from_slice(words[usize::from(x.to_le_bytes()[2]) % words.len()].as_bytes());
    }
    out.truncate(CHUNK);
    out
}

fn formats(c: &mut Criterion) {
    let data = text_like();
    let zeros = vec![0u8; CHUNK];
    let mut g = c.benchmark_group("chunk-4MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.sample_size(20);
    g.bench_function("blake3", |b| b.iter(|| Digest::of(&data)));
    g.bench_function("is_all_zero", |b| b.iter(|| is_all_zero(&zeros)));
    for level in [1, 3] {
        g.bench_function(format!("encode-zstd-{level}"), |b| b.iter(|| blob::encode(&data, level)));
        let encoded = blob::encode(&data, level).expect("encode");
        g.bench_function(format!("decode-zstd-{level}"), |b| b.iter(|| blob::decode(&encoded, CHUNK)));
    }
    // What the agent and the store do per chunk: one context kept across chunks.
    let mut enc = blob::Encoder::new(1).expect("encoder");
    g.bench_function("encoder-zstd-1-reused", |b| b.iter(|| enc.encode(&data)));
    let encoded = blob::encode(&data, 1).expect("encode");
    let digest = Digest::of(&data);
    let mut dec = blob::Decoder::new().expect("decoder");
    g.bench_function("verify-zstd-1-reused", |b| b.iter(|| dec.verify(&encoded, &digest, CHUNK)));
    g.bench_function("decode_and_verify-zstd-1", |b| b.iter(|| blob::decode_and_verify(&encoded, &digest, CHUNK)));
    // Sealed, side by side with plain: text-like data, and incompressible data (stored as
    // is, so AES-GCM is the whole difference).
    let key = std::sync::Arc::new(ChunkKey::new(&[7u8; 32]));
    g.bench_function("blake3-keyed", |b| b.iter(|| key.keyed_hash(&data)));
    // xorshift64 noise: nothing in it for zstd to find (a multiplicative sequence was not).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    assert!(blob::encode(&random, 1).expect("encode").len() > CHUNK, "the noise compressed");
    let mut out = vec![0u8; CHUNK];
    for (name, input) in [("text", &data), ("random", &random)] {
        for sealed in [false, true] {
            let k = sealed.then(|| key.clone());
            let mut enc = blob::Encoder::with_key(1, k.clone()).expect("encoder");
            let n = enc.name(input);
            let d = n.digest;
            let mode = if sealed { "sealed" } else { "plain" };
            g.bench_function(format!("encode-{name}-{mode}"), |b| b.iter(|| enc.encode_named(input, &n)));
            let encoded = enc.encode_named(input, &n).expect("encode");
            let mut dec = blob::Decoder::with_key(k).expect("decoder");
            g.bench_function(format!("decode_and_verify-{name}-{mode}"), |b| {
                b.iter(|| dec.decode_and_verify_into(&encoded, &d, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, formats);
criterion_main!(benches);
