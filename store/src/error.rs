//! The store library's error type: a small stable kind, what was being done (operation,
//! path, digest), and the cause as `source()`.

use std::fmt;

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The chunk, index, group or session does not exist.
    NotFound,
    /// Stored or received data is damaged (bad CRC, wrong digest, malformed format).
    Corrupt,
    /// A request names something invalid (bad name, wrong digest length, chunk too large).
    InvalidArgument,
    /// The filesystem is full (ENOSPC, EDQUOT). Retry after space is freed.
    NoSpace,
    /// Conflicts with the current state (e.g. a different group with that uuid exists).
    Conflict,
    /// Another I/O failure.
    Io,
}

/// A store error.
#[derive(Debug)]
pub struct StoreError {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// An I/O error while doing `what`; ENOSPC and EDQUOT become [`ErrorKind::NoSpace`],
    /// a missing file [`ErrorKind::NotFound`].
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(c) if c == nix::libc::ENOSPC || c == nix::libc::EDQUOT => ErrorKind::NoSpace,
            _ if e.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        Self { kind, message: what.into(), source: Some(Box::new(e)) }
    }

    /// Attaches a cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message with its causes, for peers that see only text.
    pub fn full_message(&self) -> String {
        let mut s = self.message.clone();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            s.push_str(": ");
            s.push_str(&e.to_string());
            next = e.source();
        }
        s
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<vmbackup_proto::FormatError> for StoreError {
    fn from(e: vmbackup_proto::FormatError) -> Self {
        StoreError::new(ErrorKind::Corrupt, e.to_string())
    }
}

/// A value a caller sent, quoted for an error message and cut to 80 characters: a status
/// echoing a megabyte of input would not fit in the reply's headers.
pub fn shorten(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let cut: String = value.chars().take(MAX).collect();
        format!("{cut:?}…")
    }
}
