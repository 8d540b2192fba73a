//! A real VM for the live tests: Debian's `qemu-system-x86_64` (TCG, no KVM), unpacked by
//! `scripts/test.sh` into `$VMBACKUP_QEMU_SYSTEM_DIR` (default /opt/vmbackup-test/
//! qemu-system), with a qcow2 root and a raw data disk on virtio-scsi. It has two QMP
//! monitors: one for the agent, one for the test, which writes as the guest through HMP
//! `qemu-io` on the scsi-hd devices.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A running VM.
pub struct QemuVm {
    child: Child,
    /// The QMP socket the agent is told about.
    pub qmp: PathBuf,
    test_monitor: PathBuf,
}

impl QemuVm {
    /// Starts a VM on `root` (qcow2, device `disk0`) and `data` (raw, `disk1`).
    pub fn start(dir: &Path, root: &Path, data: &Path) -> QemuVm {
        Self::start_with(dir, root, data, dir.join("vm-qmp.sock"), &[])
    }

    /// [`QemuVm::start`] with the agent's QMP socket at `qmp` and `extra` arguments
    /// (`-uuid`, `-name`); a data disk named `*.qcow2` is opened as qcow2.
    pub fn start_with(dir: &Path, root: &Path, data: &Path, qmp: PathBuf, extra: &[&str]) -> QemuVm {
        let base = PathBuf::from(
            std::env::var("VMBACKUP_QEMU_SYSTEM_DIR").unwrap_or_else(|_| "/opt/vmbackup-test/qemu-system".into()),
        );
        let program = base.join("usr/bin/qemu-system-x86_64");
        assert!(
            program.exists(),
            "{} not found: run scripts/test.sh as root once (it unpacks Debian's qemu-system-x86 there)",
            program.display()
        );
        let test_monitor = dir.join("vm-test.sock");
        let data_driver = if data.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
        let child = Command::new(&program)
            .args(["-L", &p(&base.join("usr/share/qemu")), "-L", &p(&base.join("usr/share/seabios"))])
            .args(["-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "64"])
            .args(["-blockdev", &format!("driver=file,node-name=f0,filename={}", p(root))])
            .args(["-blockdev", "driver=qcow2,node-name=root0,file=f0"])
            .args(["-blockdev", &format!("driver=file,node-name=f1,filename={}", p(data))])
            .args(["-blockdev", &format!("driver={data_driver},node-name=data0,file=f1")])
            .args(["-device", "virtio-scsi-pci,id=scsi0"])
            .args(["-device", "scsi-hd,drive=root0,id=disk0", "-device", "scsi-hd,drive=data0,id=disk1"])
            .args(["-chardev", &format!("socket,id=m0,path={},server=on,wait=off", p(&qmp))])
            .args(["-mon", "chardev=m0,mode=control"])
            .args(["-chardev", &format!("socket,id=m1,path={},server=on,wait=off", p(&test_monitor))])
            .args(["-mon", "chardev=m1,mode=control"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(qmp.exists() && test_monitor.exists()) {
            assert!(Instant::now() < deadline, "qemu-system-x86_64 did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuVm { child, qmp, test_monitor }
    }

    /// Runs a QMP command on the test's monitor and returns its `return` value.
    pub fn qmp(&self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let s = UnixStream::connect(&self.test_monitor).expect("test monitor");
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("greeting");
        let mut reply = |w: &mut UnixStream, msg: serde_json::Value| -> serde_json::Value {
            writeln!(w, "{msg}").expect("send");
            loop {
                line.clear();
                r.read_line(&mut line).expect("reply");
                let v: serde_json::Value = serde_json::from_str(&line).expect("json");
                if v.get("event").is_none() {
                    return v;
                }
            }
        };
        reply(&mut w, serde_json::json!({ "execute": "qmp_capabilities" }));
        let mut msg = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let v = reply(&mut w, msg);
        assert!(v.get("error").is_none(), "{command}: {v}");
        v["return"].clone()
    }

    /// HMP `qemu-io -d <device> "<cmd>"`: the guest's I/O on `disk0` or `disk1`. Returns
    /// what qemu-io printed (empty when a read's pattern matched).
    pub fn guest_io(&self, device: &str, cmd: &str) -> String {
        let line = format!("qemu-io -d {device} \"{cmd}\"");
        self.qmp("human-monitor-command", serde_json::json!({ "command-line": line }))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The image files in the VM's block graph.
    pub fn image_files(&self) -> Vec<String> {
        let nodes = self.qmp("query-named-block-nodes", serde_json::json!({ "flat": true }));
        let mut files: Vec<String> = nodes
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["image"]["filename"].as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        files
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
