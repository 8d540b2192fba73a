//! A QMP client: JSON lines over QEMU's unix socket. Connecting reads the greeting and
//! negotiates capabilities; commands carry ids, and a reader task routes each reply to its
//! caller and every asynchronous event (BLOCK_JOB_READY, BLOCK_JOB_COMPLETED,
//! BLOCK_JOB_ERROR, JOB_STATUS_CHANGE, ...) to subscribers. Every wait has a timeout, and a
//! QEMU that goes away fails the pending calls with [`QmpError::Gone`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

/// Longest QMP line accepted (a reply to query-named-block-nodes can be large).
const MAX_LINE: usize = 16 << 20;

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket {0}: {1}")]
    Io(String, std::io::Error),
    /// QEMU closed the connection (it exited or crashed).
    #[error("QEMU went away (QMP socket {0} closed)")]
    Gone(String),
    /// QEMU answered with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer in time.
    #[error("QEMU did not answer {0} within {1:?}")]
    Timeout(String, Duration),
    /// Not QMP.
    #[error("QMP socket {0} sent something that is not QMP: {1}")]
    Protocol(String, String),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// Its data.
    pub data: Value,
}

type Pending = Arc<std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>>;

/// A connected QMP session.
#[derive(Debug)]
pub struct Qmp {
    path: String,
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
    timeout: Duration,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Arc<Qmp>, QmpError> {
        let name = path.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into(), timeout))?
            .map_err(|e| QmpError::Io(name.clone(), e))?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let greeting = tokio::time::timeout(timeout, read_line(&mut lines, &name))
            .await
            .map_err(|_| QmpError::Timeout("the greeting".into(), timeout))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(name, greeting.to_string()));
        }
        let (events, _) = broadcast::channel(256);
        let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
        let qmp = Arc::new(Qmp {
            path: name.clone(),
            writer: Mutex::new(write),
            pending: pending.clone(),
            events: events.clone(),
            next_id: AtomicU64::new(1),
            timeout,
        });
        tokio::spawn(async move {
            loop {
                match read_line(&mut lines, &name).await {
                    Ok(v) => {
                        if let Some(ev) = v.get("event").and_then(Value::as_str) {
                            let data = v.get("data").cloned().unwrap_or(Value::Null);
                            let _ = events.send(Event { name: ev.to_string(), data });
                        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
                            let tx = pending
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .as_mut()
                                .and_then(|p| p.remove(&id));
                            if let Some(tx) = tx {
                                let _ = tx.send(v);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "QMP reader ends");
                        // Dropping the senders fails every pending call with Gone.
                        pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                        return;
                    }
                }
            }
        });
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `command` with `arguments` (Null for none) and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(QmpError::Gone(self.path.clone())),
        };
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await.map_err(|_| QmpError::Gone(self.path.clone()))?;
        }
        let reply = tokio::time::timeout(self.timeout, rx)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string(), self.timeout))?
            .map_err(|_| QmpError::Gone(self.path.clone()))?;
        if let Some(err) = reply.get("error") {
            return Err(QmpError::Command {
                command: command.to_string(),
                class: err.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_string(),
                desc: err.get("desc").and_then(Value::as_str).unwrap_or_default().to_string(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Waits for the first event (from `rx`) that `want` accepts, up to `timeout`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<Event>,
        timeout: Duration,
        what: &str,
        mut want: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        let fut = async {
            loop {
                match rx.recv().await {
                    Ok(ev) if want(&ev) => return Ok(ev),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Gone(self.path.clone())),
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| QmpError::Timeout(what.to_string(), timeout))?
    }
}

async fn read_line(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>, name: &str) -> Result<Value, QmpError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await.map_err(|e| QmpError::Io(name.to_string(), e))?;
        if chunk.is_empty() {
            return Err(QmpError::Gone(name.to_string()));
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&chunk[..i]);
                r.consume(i + 1);
                break;
            }
            None => {
                let n = chunk.len();
                buf.extend_from_slice(chunk);
                r.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol(name.to_string(), format!("a line longer than {MAX_LINE} bytes")));
        }
    }
    serde_json::from_slice(&buf).map_err(|e| QmpError::Protocol(name.to_string(), e.to_string()))
}
