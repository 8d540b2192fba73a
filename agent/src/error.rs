//! The agent's error type: a small stable kind, the ZStack error code it maps to, the
//! request field to blame (for bad arguments), a message that says exactly what was wrong,
//! and the cause as `source()`.
//!
//! [`AgentError::report`] gives ZStack's ErrorCode shape as a plain value ([`ErrorReport`]),
//! which jobs record and every API edge renders in its own wire form.

use std::fmt;

/// What kind of failure; decides the gRPC code and the default ZStack code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A request field is malformed or out of range (SYS.1007).
    InvalidArgument,
    /// The named resource does not exist (SYS.1003).
    NotFound,
    /// A resource with that identity exists and differs (SYS.1002).
    AlreadyExists,
    /// The operation is refused in the current state, e.g. a Permissive delete of a storage
    /// still in use (SYS.1006).
    FailedPrecondition,
    /// A peer (store, QEMU) cannot be reached; retrying later may help (SYS.1006).
    Unavailable,
    /// Missing or unknown session (ID.1001).
    Unauthenticated,
    /// Not built yet (SYS.1014).
    Unimplemented,
    /// Timed out (SYS.1001).
    Timeout,
    /// Cancelled by the caller.
    Cancelled,
    /// Out of space or another resource (SYS.1006).
    ResourceExhausted,
    /// A defect or an unexpected local failure (SYS.1000).
    Internal,
}

impl ErrorKind {
    /// ZStack's code and description for this kind.
    pub fn zstack_code(self) -> (&'static str, &'static str) {
        match self {
            ErrorKind::InvalidArgument => ("SYS.1007", "One or more API argument is invalid"),
            ErrorKind::NotFound => ("SYS.1003", "Resource not found"),
            ErrorKind::AlreadyExists => ("SYS.1002", "Failed to create the resource"),
            ErrorKind::FailedPrecondition => ("SYS.1006", "The operation is not allowed in the current state"),
            ErrorKind::Unavailable => ("SYS.1006", "A peer of the operation is unreachable"),
            ErrorKind::Unauthenticated => ("ID.1001", "Invalid session"),
            ErrorKind::Unimplemented => ("SYS.1014", "The operation is not implemented"),
            ErrorKind::Timeout => ("SYS.1001", "A message or a operation timeout"),
            ErrorKind::Cancelled => ("SYS.1017", "The operation was cancelled"),
            ErrorKind::ResourceExhausted => ("SYS.1006", "Out of resources"),
            ErrorKind::Internal => ("SYS.1000", "An internal error happened"),
        }
    }
}

/// An agent error.
#[derive(Debug)]
pub struct AgentError {
    kind: ErrorKind,
    code: Option<(&'static str, &'static str)>,
    field: Option<&'static str>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// The Image Storage could not be reached or did not answer in time: the job may wait
    /// for it to come back (see [`AgentError::is_store_outage`]).
    store_outage: bool,
}

/// Result with [`AgentError`].
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, code: None, field: None, message: message.into(), source: None, store_outage: false }
    }

    /// A bad request field; the message should say what was wrong with it.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message).with_field(field)
    }

    /// `what` with `uuid` does not exist.
    pub fn not_found(what: &str, uuid: &str) -> Self {
        Self::new(ErrorKind::NotFound, format!("{what} {uuid} not found"))
    }

    /// Sets the request field to blame.
    pub fn with_field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    /// Overrides the ZStack code (e.g. `SYS.1016`) and its description.
    pub fn with_code(mut self, code: &'static str, description: &'static str) -> Self {
        self.code = Some((code, description));
        self
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The request field at fault, if any.
    pub fn field(&self) -> Option<&'static str> {
        self.field
    }

    /// The message alone (without the cause).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// ZStack code and description.
    pub fn zstack_code(&self) -> (&'static str, &'static str) {
        self.code.unwrap_or_else(|| self.kind.zstack_code())
    }

    /// Marks an error of a call to an Image Storage: when its kind says the store was
    /// unreachable or silent (not a refusal), a job may wait for the store and resume.
    pub fn from_store(mut self) -> Self {
        self.store_outage = matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout);
        self
    }

    /// Whether this is an Image Storage that could not be reached or did not answer in
    /// time (a restart, a network cut), as opposed to a refusal or a local failure.
    pub fn is_store_outage(&self) -> bool {
        self.store_outage
    }

    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::ResourceExhausted)
    }
}

/// ZStack's ErrorCode of an error, as a plain value: what jobs record and what every API edge
/// renders (the gRPC status details, a REST error body).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ErrorReport {
    /// ZStack's code, e.g. `SYS.1007`.
    pub code: String,
    /// The code's description.
    pub description: String,
    /// What was wrong.
    pub details: String,
    /// More, when there is.
    pub elaboration: String,
    /// Extra values (`field`: the request field at fault).
    pub opaque: std::collections::BTreeMap<String, String>,
    /// The chain of causes.
    pub cause: Option<Box<ErrorReport>>,
}

impl AgentError {
    /// ZStack's ErrorCode for this error; the chain of sources becomes `cause`.
    pub fn report(&self) -> ErrorReport {
        let (code, description) = self.zstack_code();
        let mut opaque = std::collections::BTreeMap::new();
        if let Some(field) = self.field() {
            opaque.insert("field".to_string(), field.to_string());
        }
        let cause = std::error::Error::source(self).map(|s| {
            let mut chain = s.to_string();
            let mut next = s.source();
            while let Some(n) = next {
                chain.push_str(": ");
                chain.push_str(&n.to_string());
                next = n.source();
            }
            Box::new(ErrorReport {
                code: "SYS.1000".into(),
                description: "Cause".into(),
                details: chain,
                ..Default::default()
            })
        });
        ErrorReport {
            code: code.to_string(),
            description: description.to_string(),
            details: self.to_string(),
            elaboration: String::new(),
            opaque,
            cause,
        }
    }

    /// The same error without its source, for a second party to hold (a joined job, a
    /// batch of waiters): kind, code, field and message are kept.
    pub fn detached(&self) -> Self {
        Self {
            kind: self.kind,
            code: self.code,
            field: self.field,
            message: self.message.clone(),
            source: None,
            store_outage: self.store_outage,
        }
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::catalog::CatalogError> for AgentError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        match e {
            crate::catalog::CatalogError::Query(q) => AgentError::invalid(q.field, q.message),
            other => AgentError::new(ErrorKind::Internal, "catalog operation failed").with_source(other),
        }
    }
}

impl From<tokio::task::JoinError> for AgentError {
    fn from(e: tokio::task::JoinError) -> Self {
        AgentError::new(ErrorKind::Internal, "a blocking task failed").with_source(e)
    }
}

/// Runs short blocking work (SQLite, file metadata) off the async runtime.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

impl From<crate::volume::Error> for AgentError {
    fn from(mut e: crate::volume::Error) -> Self {
        // The OS error becomes the cause; the message is the volume error's own (file,
        // offset, what was being done), so neither is said twice.
        let os = e.take_source();
        let full = os
            .as_ref()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|c| c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32);
        let kind = match e.kind {
            crate::volume::ErrorKind::Io if full => ErrorKind::ResourceExhausted,
            crate::volume::ErrorKind::Io => ErrorKind::Unavailable,
            crate::volume::ErrorKind::InUse
            | crate::volume::ErrorKind::Corrupt
            | crate::volume::ErrorKind::Unsupported => ErrorKind::FailedPrecondition,
            crate::volume::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        };
        let err = AgentError::new(kind, e.to_string());
        match os {
            Some(os) => err.with_source(os),
            None => err,
        }
    }
}
