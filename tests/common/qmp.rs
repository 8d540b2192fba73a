//! One QMP command on a monitor socket, from the test: connect, negotiate, run, disconnect.
//! QEMU's monitor serves one client at a time, so call it only while no agent job is
//! talking to that QEMU.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Runs `command` with `arguments` (JSON null: none) on the QMP monitor at `socket` and
/// returns its `return` value, or the error QEMU (or the connection) gave.
pub fn qmp(socket: &Path, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| format!("read timeout: {e}"))?;
    let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("QMP greeting: {e}"))?;
    let mut reply = |w: &mut UnixStream, msg: serde_json::Value| -> Result<serde_json::Value, String> {
        writeln!(w, "{msg}").map_err(|e| format!("sending {msg}: {e}"))?;
        loop {
            line.clear();
            let n = r.read_line(&mut line).map_err(|e| format!("QMP reply: {e}"))?;
            if n == 0 {
                return Err("QMP monitor closed the connection".into());
            }
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("QMP JSON {line:?}: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    reply(&mut w, serde_json::json!({ "execute": "qmp_capabilities" }))?;
    let mut msg = serde_json::json!({ "execute": command });
    if !arguments.is_null() {
        msg["arguments"] = arguments;
    }
    let v = reply(&mut w, msg)?;
    match v.get("error") {
        Some(e) => Err(format!("{command}: {e}")),
        None => Ok(v["return"].clone()),
    }
}
