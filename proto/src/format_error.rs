//! The one error type of the byte formats: which format, which field, at which byte offset,
//! what was expected and what was found.

use std::fmt;

/// A malformed digest, chunk blob, volume index or manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// Which format: `digest`, `chunk blob`, `volume index`, `manifest`.
    pub format: &'static str,
    /// Field at fault.
    pub field: &'static str,
    /// Byte offset of the field in the encoded data, when it has one.
    pub offset: Option<usize>,
    /// What was wrong.
    pub message: String,
}

impl FormatError {
    pub(crate) fn new(
        format: &'static str,
        field: &'static str,
        offset: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self { format, field, offset, message: message.into() }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} {} at offset {o}: {}", self.format, self.field, self.message),
            None => write!(f, "{} {}: {}", self.format, self.field, self.message),
        }
    }
}

impl std::error::Error for FormatError {}
