//! The volume readers against QEMU's own tools: for a matrix of images made with qemu-img
//! and qemu-io, a full read equals `qemu-img convert -O raw` byte for byte and the
//! allocation map agrees with `qemu-img map --output=json`; the restore writers copy each
//! image to raw and qcow2 files that `qemu-img compare` calls identical, and `qemu-img check`
//! calls the qcow2 copy clean. A missing tool fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmbackup_agent::volume::writer::{self, Mode};
use vmbackup_agent::volume::{self, ErrorKind, ExtentKind, Limits, VolumeFormat, VolumeSource};

fn run(tool: &str, args: &[&str]) -> String {
    let out =
        Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("{tool} not found ({e}): install qemu-utils"));
    assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(img));
    run("qemu-io", &args);
}

/// Guest ranges qemu-img map reports as data, merged.
fn qemu_data_ranges(img: &Path) -> Vec<(u64, u64)> {
    let json = run("qemu-img", &["map", "--output=json", p(img)]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("map json");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("array") {
        if e["data"].as_bool() == Some(true) {
            let (s, l) = (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length"));
            match out.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += l,
                _ => out.push((s, l)),
            }
        }
    }
    out
}

fn our_data_ranges(v: &dyn VolumeSource) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.extents(0, v.virtual_size()).expect("extents") {
        if e.kind == ExtentKind::Data {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == e.offset => last.1 += e.len,
                _ => out.push((e.offset, e.len)),
            }
        }
    }
    out
}

/// Reads the whole volume in 192 KiB pieces from two threads.
fn read_all(v: &dyn VolumeSource) -> Vec<u8> {
    let size = usize::try_from(v.virtual_size()).expect("fits");
    let mut buf = vec![0u8; size];
    let piece = 192 << 10;
    let mut pieces: [Vec<(usize, &mut [u8])>; 2] = [Vec::new(), Vec::new()];
    for (i, c) in buf.chunks_mut(piece).enumerate() {
        pieces[i % 2].push((i, c));
    }
    std::thread::scope(|s| {
        for part in pieces {
            s.spawn(move || {
                for (i, c) in part {
                    v.read_at(u64::try_from(i * piece).expect("fits"), c).expect("read");
                }
            });
        }
    });
    buf
}

fn check(img: &Path, name: &str) {
    let v = volume::open(img, None, &Limits::default()).unwrap_or_else(|e| panic!("{name}: open: {e}"));
    let dir = img.parent().expect("dir");
    let reference = dir.join(format!("{name}.reference.raw"));
    run("qemu-img", &["convert", "-O", "raw", p(img), p(&reference)]);
    let want = std::fs::read(&reference).expect("reference");
    let got = read_all(v.as_ref());
    assert_eq!(got.len(), want.len(), "{name}: size");
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{name}: first difference at guest offset {i}");
    }
    assert_eq!(our_data_ranges(v.as_ref()), qemu_data_ranges(img), "{name}: allocation map differs from qemu-img map");
    for format in [VolumeFormat::Raw, VolumeFormat::Qcow2] {
        let out = dir.join(format!("{name}.restored.{}", format.as_str()));
        copy_with_writer(v.as_ref(), &out, format);
        run("qemu-img", &["compare", "-q", p(img), p(&out)]);
        if format == VolumeFormat::Qcow2 {
            let report = run("qemu-img", &["check", "--output=json", p(&out)]);
            let r: serde_json::Value = serde_json::from_str(&report).expect("check json");
            for key in ["corruptions", "leaks", "check-errors"] {
                assert_eq!(r[key].as_u64().unwrap_or(0), 0, "{name}: qemu-img check: {report}");
            }
        }
    }
}

/// Copies the data extents of `v` through a restore writer, 1 MiB at a time from two
/// threads, as a restore would.
fn copy_with_writer(v: &dyn VolumeSource, out: &Path, format: VolumeFormat) {
    let w = writer::create(out, format, v.virtual_size(), Mode::Create).expect("writer");
    let piece = 1u64 << 20;
    let mut pieces = Vec::new();
    for e in v.extents(0, v.virtual_size()).expect("extents") {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut at = e.offset / piece * piece;
        while at < e.offset + e.len {
            if pieces.last() != Some(&at) {
                pieces.push(at);
            }
            at += piece;
        }
    }
    let wr = &w;
    std::thread::scope(|s| {
        for part in [0, 1] {
            let pieces = &pieces;
            s.spawn(move || {
                for &at in pieces.iter().skip(part).step_by(2) {
                    let n = piece.min(v.virtual_size() - at);
                    let mut buf = vec![0u8; usize::try_from(n).expect("fits")];
                    v.read_at(at, &mut buf).expect("read");
                    wr.write_at(at, &buf).expect("write");
                }
            });
        }
    });
    w.finish().expect("finish");
}

struct Matrix {
    dir: tempfile::TempDir,
}

impl Matrix {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn qcow2(&self, name: &str, size: &str, opts: &str) -> PathBuf {
        let img = self.path(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&img), size]);
        run("qemu-img", &args);
        img
    }
}

const WRITES: &[&str] =
    &["write -P 0x11 0 64k", "write -P 0x22 300k 100k", "write -P 0x33 1M 4097", "write -z 2M 128k"];

fn matrix() -> Matrix {
    Matrix { dir: tempfile::tempdir().expect("tempdir") }
}

#[test]
fn raw_sparse_file() {
    let m = matrix();
    let img = m.path("sparse.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&img), "5M"]);
    qemu_io(&img, "raw", &["write -P 0x11 0 64k", "write -P 0x22 1M 8k", "write -P 0x33 4M 4096"]);
    check(&img, "sparse-raw");
}

#[test]
fn qcow2_versions_and_cluster_sizes() {
    let m = matrix();
    for (name, opts) in [
        ("v2", "compat=0.10"),
        ("v3-512", "cluster_size=512"),
        ("v3-4k", "cluster_size=4096"),
        ("v3-64k", ""),
        ("v3-2m", "cluster_size=2M"),
        ("prealloc", "preallocation=metadata"),
        ("lazy", "lazy_refcounts=on"),
    ] {
        let img = m.qcow2(&format!("{name}.qcow2"), "5M", opts);
        qemu_io(&img, "qcow2", WRITES);
        check(&img, name);
    }
}

#[test]
fn unaligned_size_and_internal_snapshot_and_bitmap() {
    let m = matrix();
    let img = m.qcow2("odd.qcow2", "1052673", ""); // 1 MiB + 4097 bytes
    qemu_io(&img, "qcow2", &["write -P 0x44 1044480 8193"]);
    run("qemu-img", &["snapshot", "-c", "snap1", p(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0x55 0 4096"]);
    run("qemu-img", &["bitmap", "--add", p(&img), "bitmap0"]);
    check(&img, "odd");
}

#[test]
fn compressed_deflate_and_zstd() {
    let m = matrix();
    let src = m.qcow2("src.qcow2", "4M", "");
    qemu_io(&src, "qcow2", &["write -P 0x61 0 1M", "write -P 0x62 2M 300k"]);
    for (name, opts) in [("deflate", "compression_type=zlib"), ("zstd", "compression_type=zstd")] {
        let img = m.path(&format!("{name}.qcow2"));
        run("qemu-img", &["convert", "-q", "-c", "-O", "qcow2", "-o", opts, p(&src), p(&img)]);
        check(&img, name);
    }
}

#[test]
fn extended_l2_with_a_512_byte_island() {
    let m = matrix();
    let img = m.qcow2("ext.qcow2", "4M", "extended_l2=on,cluster_size=64k");
    qemu_io(&img, "qcow2", &["write -P 0x71 1000 512", "write -P 0x72 200k 3k", "write -z 1M 64k"]);
    check(&img, "extended-l2");
}

#[test]
fn backing_chains_zero_clusters_hide_backing_data() {
    let m = matrix();
    let base = m.path("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "4M"]);
    qemu_io(&base, "raw", &["write -P 0x01 0 4M"]);
    // mid names base relatively, top names mid by absolute path.
    let mid = m.path("mid.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p(&mid)]);
    qemu_io(&mid, "qcow2", &["write -P 0x02 1M 64k"]);
    let top = m.path("top.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&mid), "-F", "qcow2", p(&top), "5M"]);
    qemu_io(&top, "qcow2", &["write -P 0x03 3M 4k", "write -z 0 128k", "write -z 1M 64k"]);
    check(&top, "chain");
}

#[test]
fn external_data_files_raw_and_not() {
    let m = matrix();
    // QEMU opens a relative data file name against its working directory, so images in
    // use name it absolutely; both flavours here do.
    let abs = format!("data_file={}", p(&m.path("df.data")));
    let img = m.qcow2("df.qcow2", "3M", &abs);
    qemu_io(&img, "qcow2", &["write -P 0x11 0 64k", "write -P 0x22 1M 100k", "write -z 2M 64k"]);
    check(&img, "df");
    let raw = format!("data_file={},data_file_raw=on", p(&m.path("df-raw.data")));
    let img = m.qcow2("df-raw.qcow2", "3M", &raw);
    qemu_io(&img, "qcow2", &["write -P 0x33 4k 60k", "write -P 0x44 2M 1M"]);
    check(&img, "df-raw");
}

#[test]
fn persistent_bitmaps_are_listed_as_qemu_img_info_shows_them() {
    let m = matrix();
    let img = m.qcow2("bm.qcow2", "4M", "");
    run("qemu-img", &["bitmap", "--add", "-g", "64k", p(&img), "daily"]);
    run("qemu-img", &["bitmap", "--add", "-g", "1M", "--disable", p(&img), "weekly"]);
    let q = volume::qcow2::Qcow2Volume::open(&img, &Limits::default()).expect("open");
    let ours: Vec<(String, u64, bool)> =
        q.bitmaps().expect("bitmaps").into_iter().map(|b| (b.name, b.granularity, b.auto)).collect();
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", p(&img)])).expect("info json");
    let theirs: Vec<(String, u64, bool)> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps in qemu-img info")
        .iter()
        .map(|b| {
            let auto = b["flags"].as_array().expect("flags").iter().any(|f| f == "auto");
            (b["name"].as_str().expect("name").to_string(), b["granularity"].as_u64().expect("granularity"), auto)
        })
        .collect();
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 2);
}

#[test]
fn a_named_internal_snapshot_reads_as_qemu_img_convert_l_shows_it() {
    let m = matrix();
    let img = m.qcow2("snap.qcow2", "2M", "");
    qemu_io(&img, "qcow2", &["write -P 0x01 0 1M"]);
    run("qemu-img", &["snapshot", "-c", "before", p(&img)]);
    qemu_io(&img, "qcow2", &["write -P 0x02 64k 64k", "write -z 512k 64k", "write -P 0x03 1M 64k"]);
    let q = volume::qcow2::Qcow2Volume::open(&img, &Limits::default()).expect("open");
    let names: Vec<String> = q.snapshots().expect("snapshots").into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["before"]);
    let snap = volume::qcow2::Qcow2Volume::open_snapshot(&img, "before", &Limits::default()).expect("snapshot");
    let reference = m.path("before.raw");
    run("qemu-img", &["convert", "-O", "raw", "-l", "snapshot.name=before", p(&img), p(&reference)]);
    assert_eq!(read_all(&snap), std::fs::read(&reference).expect("reference"), "snapshot contents");
    let active = read_all(&q);
    assert_eq!(active[65536], 0x02, "the active layer still reads the later write");
    let e = volume::qcow2::Qcow2Volume::open_snapshot(&img, "nope", &Limits::default()).expect_err("unknown");
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn an_image_a_running_qemu_writes_is_refused_while_it_runs() {
    use std::io::Write;
    let m = matrix();
    let img = m.qcow2("busy.qcow2", "1M", "");
    assert!(volume::open(&img, None, &Limits::default()).is_ok(), "idle image opens");
    // qemu-io in interactive mode keeps the image open read-write, with QEMU's locks, until
    // its input closes.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "qcow2", p(&img)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io not found: install qemu-utils");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let e = loop {
        match volume::open(&img, None, &Limits::default()) {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            Ok(_) => panic!("qemu-io holds the image but it opened"),
        }
    };
    assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    assert!(e.message.contains("volume in use by a running VM"), "{e}");
    // Restoring over it is refused too, and the image is untouched.
    let before = std::fs::read(&img).expect("read");
    let e = writer::create(&img, VolumeFormat::Qcow2, 1 << 20, Mode::Revert).expect_err("revert of a busy image");
    assert_eq!(e.kind, ErrorKind::InUse, "{e}");
    assert_eq!(std::fs::read(&img).expect("read"), before);
    // The live path may still read it.
    assert!(volume::open_unchecked(&img, None, &Limits::default()).is_ok());
    qemu.stdin.take().expect("stdin").write_all(b"quit\n").expect("quit");
    assert!(qemu.wait().expect("wait").success());
    assert!(volume::open(&img, None, &Limits::default()).is_ok(), "opens again once QEMU is gone");
}

#[test]
fn unsupported_and_corrupt_images_are_refused_clearly() {
    let m = matrix();
    // Encrypted.
    let enc = m.path("enc.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            p(&enc),
            "1M",
        ],
    );
    let e = volume::open(&enc, None, &Limits::default()).expect_err("encrypted");
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");

    // A backing loop: a -> b -> a.
    let a = m.qcow2("a.qcow2", "1M", "");
    let b = m.path("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-b", p(&a), "-F", "qcow2", p(&b)]);
    run("qemu-img", &["rebase", "-u", "-b", p(&b), "-F", "qcow2", p(&a)]);
    let e = volume::open(&b, None, &Limits::default()).expect_err("loop");
    assert!(e.message.contains("loops"), "{e}");

    // Header fields made invalid one at a time.
    let good = m.qcow2("good.qcow2", "1M", "");
    qemu_io(&good, "qcow2", &["write -P 0x01 0 64k"]);
    let bytes = std::fs::read(&good).expect("read");
    let mut cases: Vec<(&str, Vec<u8>, u64)> = Vec::new();
    cases.push(("truncated header", bytes[..40].to_vec(), 0));
    let mut c = bytes.clone();
    c[20..24].copy_from_slice(&8u32.to_be_bytes());
    cases.push(("cluster_bits 8", c, 20));
    let mut c = bytes.clone();
    c[20..24].copy_from_slice(&22u32.to_be_bytes());
    cases.push(("cluster_bits 22", c, 20));
    let mut c = bytes.clone();
    c[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    cases.push(("huge l1_size", c, 36));
    let mut c = bytes.clone();
    c[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    cases.push(("L1 past the end", c, 40));
    let mut c = bytes.clone();
    c[72..80].copy_from_slice(&(1u64 << 20).to_be_bytes());
    cases.push(("unknown incompatible bit", c, 72));
    for (what, data, offset) in cases {
        let f = m.path("bad.qcow2");
        std::fs::write(&f, &data).expect("write");
        let e = volume::open(&f, Some(volume::VolumeFormat::Qcow2), &Limits::default()).expect_err(what);
        assert_eq!(e.offset, Some(offset), "{what}: {e}");
    }

    // An L2 entry pointing past the end of the file: the read names the L2 entry's offset.
    let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().expect("8 bytes"));
    let l1_at = usize::try_from(l1_offset).expect("fits");
    let l1_entry = u64::from_be_bytes(bytes[l1_at..l1_at + 8].try_into().expect("8 bytes"));
    let l2 = usize::try_from(l1_entry & 0x00ff_ffff_ffff_fe00).expect("fits");
    let mut c = bytes.clone();
    c[l2..l2 + 8].copy_from_slice(&((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let f = m.path("bad-l2.qcow2");
    std::fs::write(&f, &c).expect("write");
    let v = volume::open(&f, None, &Limits::default()).expect("header is fine");
    let mut buf = vec![0u8; 4096];
    let e = v.read_at(0, &mut buf).expect_err("bad L2 entry");
    assert_eq!((e.kind, e.offset), (ErrorKind::Corrupt, Some(u64::try_from(l2).expect("fits"))), "{e}");

    // Garbage in a compressed cluster.
    let src = m.qcow2("csrc.qcow2", "1M", "");
    qemu_io(&src, "qcow2", &["write -P 0x61 0 64k"]);
    let comp = m.path("comp.qcow2");
    run("qemu-img", &["convert", "-q", "-c", "-O", "qcow2", p(&src), p(&comp)]);
    let v = volume::open(&comp, None, &Limits::default()).expect("open");
    let host = match v.extents(0, 65536).expect("extents")[0].kind {
        ExtentKind::Data => {
            let q = volume::qcow2::Qcow2Volume::open(&comp, &Limits::default()).expect("open");
            match q.plan(0).expect("plan").0 {
                volume::qcow2::Plan::Compressed { host, .. } => host,
                other => panic!("expected a compressed cluster, got {other:?}"),
            }
        }
        other => panic!("expected data, got {other:?}"),
    };
    let mut c = std::fs::read(&comp).expect("read");
    let at = usize::try_from(host).expect("fits");
    for b in &mut c[at..at + 64] {
        *b = 0xff;
    }
    std::fs::write(&comp, &c).expect("write");
    let v = volume::open(&comp, None, &Limits::default()).expect("open");
    let e = v.read_at(0, &mut buf).expect_err("garbage");
    assert_eq!((e.kind, e.offset), (ErrorKind::Corrupt, Some(host)), "{e}");
}
