//! Hostile input at every gRPC edge: every method of every service each daemon lists by
//! reflection gets requests built from the compiled descriptors, one field at a time set to
//! hostile values (empty, huge, negative, extreme, non-UUID, NUL-containing, path-traversing,
//! unknown enum values, and a wrong wire type), authenticated as an administrator so the
//! values reach validation. Every call must end within a bound with a status that is not a
//! crash (never UNKNOWN or INTERNAL; malformed bytes are INVALID_ARGUMENT naming the field
//! prost failed in); the daemon must stay up (a health check after each method), log no panic, and
//! and a refused call must create or remove no file in its data directory.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{AgentOptions, Daemon, start_agent, start_store};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Raw protobuf bytes in and out: the requests are built by hand.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug, Clone, Default)]
struct RawCoder;

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;
    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }
    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).expect("7 bits") | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).expect("7 bits"));
}

fn key(out: &mut Vec<u8>, number: i32, wire: u64) {
    varint(out, (u64::try_from(number).expect("field number") << 3) | wire);
}

fn len_field(out: &mut Vec<u8>, number: i32, bytes: &[u8]) {
    key(out, number, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn hostile_strings() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("huge", vec![b'a'; 1 << 20]),
        ("path traversal", b"../../../../etc/passwd".to_vec()),
        ("NUL", b"7a1f0e8a\x007b2d4e6f8a9b0c1d2e3f4a5b".to_vec()),
        ("not a uuid", b"not-a-uuid".to_vec()),
        ("dashed uuid", b"7a1f0e8a-7b2d-4e6f-8a9b-0c1d2e3f4a5b".to_vec()),
        ("negative number", b"-1".to_vec()),
        ("format string", b"%s%n%x{}{{}}".to_vec()),
        ("unicode", "ＵＵＩＤ\u{202e}".as_bytes().to_vec()),
        ("condition", b"uuid=1 or 1=1; --".to_vec()),
    ]
}

const EXTREMES: [(&str, u64); 4] =
    [("-1", u64::MAX), ("i64::MIN", 1 << 63), ("i64::MAX", (1 << 63) - 1), ("2^32", 1 << 32)];

/// Hostile encodings of one field (labelled), and one of the wrong wire type.
fn hostile_field(f: &FieldDescriptorProto, messages: &[(String, DescriptorProto)]) -> Vec<(String, Vec<u8>)> {
    let n = f.number();
    let mut out = Vec::new();
    let repeated = f.label() == Label::Repeated;
    match f.r#type() {
        Type::String | Type::Bytes => {
            for (what, v) in hostile_strings() {
                let mut b = Vec::new();
                len_field(&mut b, n, &v);
                out.push((what.to_string(), b));
            }
            if repeated {
                let mut b = Vec::new();
                for _ in 0..10_000 {
                    len_field(&mut b, n, b"x");
                }
                out.push(("10 000 elements".into(), b));
            }
            let mut b = Vec::new();
            key(&mut b, n, 0);
            varint(&mut b, 7);
            out.push(("wire type varint".into(), b));
        }
        Type::Int32
        | Type::Int64
        | Type::Uint32
        | Type::Uint64
        | Type::Enum
        | Type::Bool
        | Type::Sint32
        | Type::Sint64 => {
            for (what, v) in EXTREMES {
                let mut b = Vec::new();
                key(&mut b, n, 0);
                varint(&mut b, v);
                out.push((what.to_string(), b));
            }
            let mut b = Vec::new();
            len_field(&mut b, n, b"not a number");
            out.push(("wire type bytes".into(), b));
        }
        Type::Fixed32 | Type::Sfixed32 | Type::Float => {
            let mut b = Vec::new();
            key(&mut b, n, 5);
            b.extend_from_slice(&[0xff; 4]);
            out.push(("all ones".into(), b));
        }
        Type::Fixed64 | Type::Sfixed64 | Type::Double => {
            let mut b = Vec::new();
            key(&mut b, n, 1);
            b.extend_from_slice(&[0xff; 8]);
            out.push(("all ones (NaN)".into(), b));
        }
        Type::Message | Type::Group => {
            let name = f.type_name().trim_start_matches('.');
            let mut b = Vec::new();
            len_field(&mut b, n, &[]);
            out.push(("empty message".into(), b));
            if let Some((_, inner)) = messages.iter().find(|(full, _)| full == name) {
                // One level down: the inner message with every scalar field extreme.
                let mut body = Vec::new();
                for g in &inner.field {
                    if let Some((_, v)) = hostile_field(g, &[]).into_iter().find(|(w, _)| w == "-1" || w == "huge") {
                        body.extend_from_slice(&v);
                    }
                }
                let mut b = Vec::new();
                len_field(&mut b, n, &body);
                out.push(("inner fields extreme".into(), b));
            }
            let mut b = Vec::new();
            len_field(&mut b, n, &[0xff, 0xff, 0xff]);
            out.push(("garbage message".into(), b));
        }
    }
    out
}

/// Every message type of the descriptor set by its full name.
fn messages(set: &FileDescriptorSet) -> Vec<(String, DescriptorProto)> {
    fn walk(prefix: &str, m: &DescriptorProto, out: &mut Vec<(String, DescriptorProto)>) {
        let full = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk(&full, nested, out);
        }
        out.push((full, m.clone()));
    }
    let mut out = Vec::new();
    for file in &set.file {
        for m in &file.message_type {
            walk(file.package(), m, &mut out);
        }
    }
    out
}

/// Files under `dir` (logs, the catalog database's journal and the audit log excluded):
/// what a refused call must leave as it was.
fn files(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.ends_with("-wal") || name.ends_with("-shm") || name.ends_with(".log") || name.contains("audit") {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p);
            }
        }
    }
    out
}

/// Whether an error message names `field`, in proto or JSON spelling.
fn names_field(message: &str, field: &str) -> bool {
    let camel: String = field
        .split('_')
        .enumerate()
        .map(|(i, w)| if i == 0 { w.to_string() } else { w[..1].to_uppercase() + &w[1..] })
        .collect();
    message.contains(field) || message.contains(&camel)
}

/// What went wrong, one line per call; and how many calls ended with each status code.
#[derive(Default)]
struct Findings(Vec<String>, std::collections::BTreeMap<String, usize>);

async fn fuzz_daemon(daemon: &Daemon, authorization: &str, set: &FileDescriptorSet, findings: &mut Findings) -> usize {
    let all = messages(set);
    let served = common::reflected_services(&daemon.url()).await;
    let channel = common::channel(&daemon.url()).await;
    let mut calls = 0;
    let mut before = files(&daemon.data_dir);
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            if !served.contains(&full) {
                continue;
            }
            for method in &service.method {
                let input = method.input_type().trim_start_matches('.');
                let Some((_, message)) = all.iter().find(|(n, _)| n == input) else {
                    findings.0.push(format!("{full}/{}: input type {input} not in the descriptors", method.name()));
                    continue;
                };
                let path: tonic::codegen::http::uri::PathAndQuery =
                    format!("/{full}/{}", method.name()).parse().expect("method path");
                let mut cases: Vec<(String, Vec<u8>)> = vec![("empty request".into(), Vec::new())];
                for f in &message.field {
                    for (what, bytes) in hostile_field(f, &all) {
                        cases.push((format!("{} = {what}", f.name()), bytes));
                    }
                }
                for (what, body) in cases {
                    calls += 1;
                    let mut grpc = tonic::client::Grpc::new(channel.clone())
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20);
                    let mut request = tonic::Request::new(tokio_stream::iter([body]));
                    request.metadata_mut().insert("authorization", authorization.parse().expect("ascii"));
                    request.set_timeout(Duration::from_secs(20));
                    let call = async {
                        grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        let mut stream = grpc.streaming(request, path.clone(), RawCodec).await?.into_inner();
                        // Server streams (WatchJob) would run on: the first message is enough.
                        stream.message().await.map(|_| ())
                    };
                    let result = tokio::time::timeout(Duration::from_secs(30), call).await;
                    let label = format!("{full}/{} with {what}", method.name());
                    // A refused call changes nothing on disk; an accepted one (a valid
                    // request: an admin's verify, say) may, and sets the new baseline.
                    let after = files(&daemon.data_dir);
                    if matches!(result, Ok(Err(_))) {
                        for p in before.symmetric_difference(&after) {
                            findings.0.push(format!("{label}: refused, but {} was created or removed", p.display()));
                        }
                    }
                    before = after;
                    if let Ok(Err(s)) = &result {
                        *findings.1.entry(format!("{:?}", s.code())).or_default() += 1;
                        if s.message().len() > 4096 {
                            findings.0.push(format!("{label}: a {}-byte status message", s.message().len()));
                        }
                    }
                    match result {
                        Err(_) => findings.0.push(format!("{label}: no answer in 30 s")),
                        Ok(Ok(())) => *findings.1.entry("Ok".into()).or_default() += 1,
                        Ok(Err(s)) => match s.code() {
                            tonic::Code::Unknown => findings.0.push(format!("{label}: UNKNOWN {}", s.message())),
                            tonic::Code::Internal => findings.0.push(format!("{label}: INTERNAL {}", s.message())),
                            tonic::Code::InvalidArgument
                                if !what.contains("wire type")
                                    && !what.contains("garbage")
                                    && !message.field.iter().any(|f| names_field(s.message(), f.name())) =>
                            {
                                findings.0.push(format!("{label}: names no field: {}", s.message()));
                            }
                            // A status too large for the reply's headers breaks the connection.
                            tonic::Code::ResourceExhausted | tonic::Code::Cancelled => {
                                findings.0.push(format!("{label}: {:?} {}", s.code(), s.message()))
                            }
                            tonic::Code::InvalidArgument if what.contains("wire type") || what.contains("garbage") => {
                                // Malformed bytes: the status names the message and field.
                                let field = format!(".{}", what.split(' ').next().unwrap_or_default());
                                if !s.message().contains(&field) {
                                    findings
                                        .0
                                        .push(format!("{label}: does not say what was malformed: {}", s.message()))
                                }
                            }
                            tonic::Code::Unavailable if s.message().contains("connection") => {
                                findings.0.push(format!("{label}: the daemon went away: {}", s.message()))
                            }
                            _ => {}
                        },
                    }
                }
                // Still up after every method.
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
                if let Err(e) = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await {
                    findings.0.push(format!("{full}/{}: health check failed afterwards: {e}", method.name()));
                }
            }
        }
    }
    let log = daemon.log_text();
    if log.contains("panicked") {
        findings.0.push(format!("{}: a panic in the log", daemon.url()));
    }
    calls
}

#[tokio::test(flavor = "multi_thread")]
async fn every_method_of_both_daemons_refuses_hostile_fields_without_crashing_or_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = start_store(dir.path(), "s");
    let agent = start_agent(dir.path(), AgentOptions::default());
    // A storage and a backup, so calls that find their objects get past the lookups.
    let bs = common::add_storage(&agent, &store, "s").await;
    let img = dir.path().join("root.raw");
    std::fs::write(&img, common::pseudo_random(3, 1 << 20)).expect("image");
    common::backup_client(&agent)
        .await
        .create_vm_backup(vmbackup_proto::agent::v1::CreateVmBackupRequest {
            root_volume_uuid: "8b2a1f9b8c3e4d7a9b0c1e2f3a4b5c6d".into(),
            backup_storage_uuid: bs,
            name: "x".into(),
            vm: Some(common::one_volume_vm(
                "7a1f0e8a7b2d4e6f8a9b0c1d2e3f4a5b",
                "8b2a1f9b8c3e4d7a9b0c1e2f3a4b5c6d",
                &img,
                "raw",
            )),
            ..Default::default()
        })
        .await
        .expect("backup");
    let set = FileDescriptorSet::decode(vmbackup_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let mut findings = Findings::default();
    let agent_calls = fuzz_daemon(&agent, &format!("OAuth {}", common::session(&agent)), &set, &mut findings).await;
    let store_calls =
        fuzz_daemon(&store, &format!("Bearer {}", common::store_token(&store)), &set, &mut findings).await;
    eprintln!("hostile calls: {agent_calls} to the agent, {store_calls} to the store; outcomes {:?}", findings.1);
    assert!(agent_calls > 500 && store_calls > 100, "the descriptors were walked");
    assert!(findings.0.is_empty(), "{} findings:\n{}", findings.0.len(), findings.0.join("\n"));
}
