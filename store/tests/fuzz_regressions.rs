//! Replays the `ingest` fuzz target's harness on every input kept in
//! `store/fuzz/regressions/` (crashes the fuzzer found, kept after their fix) and on
//! hand-made hostile request streams, in the ordinary test run.

#[path = "../fuzz/bucket_harness.rs"]
mod bucket_harness;
#[path = "../fuzz/harness.rs"]
mod harness;

fn frame(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&u16::try_from(bytes.len()).expect("short").to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

#[test]
fn kept_fuzz_inputs_run_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regressions directory") {
        let path = entry.expect("entry").path();
        harness::run(&std::fs::read(&path).expect("input"));
        n += 1;
    }
    assert!(n > 0, "no inputs kept in {}", dir.display());
}

#[test]
fn hostile_request_streams_run_clean() {
    use prost::Message;
    use vmbackup_proto::store::v1 as pb;
    let plain = vec![7u8; 1000];
    let d = vmbackup_proto::Digest::of(&plain);
    let good = vmbackup_proto::blob::encode(&plain, 1).expect("encode");
    let mut input = vec![1u8];
    // A chunk uploaded under another chunk's name, a truncated blob, an oversized digest.
    let wrong = pb::UploadChunk { session_id: String::new(), digest: [0xaa; 32].to_vec(), blob: good.clone().into() };
    input.extend(frame(0, &wrong.encode_to_vec()));
    let cut = pb::UploadChunk {
        session_id: String::new(),
        digest: d.0.to_vec(),
        blob: good[..good.len() / 2].to_vec().into(),
    };
    input.extend(frame(0, &cut.encode_to_vec()));
    let long = pb::UploadChunk { session_id: String::new(), digest: vec![1; 33], blob: good.clone().into() };
    input.extend(frame(0, &long.encode_to_vec()));
    // The real chunk, then an index of junk, traversal names, a manifest of junk.
    input.extend(frame(
        0,
        &pb::UploadChunk { session_id: String::new(), digest: d.0.to_vec(), blob: good.into() }.encode_to_vec(),
    ));
    input.extend(frame(
        2,
        &pb::PutIndexRequest { session_id: String::new(), name: "../store.json".into(), data: vec![1, 2, 3] }
            .encode_to_vec(),
    ));
    input.extend(frame(
        3,
        &pb::CommitGroupRequest {
            session_id: String::new(),
            manifest: b"{\"formatVersion\":1}".to_vec(),
            retain_until: u64::MAX,
        }
        .encode_to_vec(),
    ));
    input.extend(frame(
        4,
        &pb::DownloadChunksRequest { digests: vec![vec![0; 32]], index_name: "x/../../y".into() }.encode_to_vec(),
    ));
    // Garbage that is not a message at all, and a flipped well-formed blob.
    input.extend(frame(1, &[0xff; 40]));
    input.extend(frame(6, b"some plaintext"));
    input.extend(frame(5, b"another plaintext"));
    harness::run(&input);
}

#[test]
fn hostile_bucket_objects_are_refused_cleanly() {
    use vmbackup_store::shared::{DIGESTS_HEADER, encode_digests};
    let d = vmbackup_proto::Digest::of(b"x");
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    let list = encode_digests([&d, &d]);
    for cut in [0, 1, DIGESTS_HEADER.len(), DIGESTS_HEADER.len() + 31, list.len()] {
        inputs.push([&[0u8][..], &list[..cut]].concat());
    }
    for json in [
        &b"{}"[..],
        b"{\"client\":\"x\",\"principal\":\"p\",\"namespace\":\"n\",\"server\":\"s\",\"startedMs\":18446744073709551615,\"ttlMs\":18446744073709551615,\"expiresMs\":18446744073709551615}",
        b"[1,2,3]",
        b"{\"holder\":\"h\",\"expiresMs\":-1,\"phase\":\"running\"}",
        b"\xff\xfe",
    ] {
        inputs.push([&[1u8][..], json].concat());
        inputs.push([&[2u8][..], json].concat());
    }
    for input in &inputs {
        bucket_harness::run(input);
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions-bucket");
    for entry in std::fs::read_dir(&dir).into_iter().flatten() {
        bucket_harness::run(&std::fs::read(entry.expect("entry").path()).expect("input"));
    }
}
