//! kiln's one error type.

use std::path::PathBuf;

/// Every fallible operation in kiln returns this error.
///
/// Messages name the op, tensor, file or key involved and the offending values, so
/// that a user can act on them without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument does not satisfy an op's or function's contract (shape, dtype,
    /// length, alignment, range).
    #[error("invalid argument to {op}: {msg}")]
    InvalidArgument { op: String, msg: String },
    /// A valid request that kiln does not implement (an architecture, a dtype for an
    /// op, a file version).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An I/O failure on a named file.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Malformed data in a file or buffer: `context` names the file, tensor or key.
    #[error("format error in {context}: {msg}")]
    Format { context: String, msg: String },
    /// An allocation that could not be satisfied.
    #[error("out of memory: {what} needs {requested} bytes{}", available.map(|a| format!(", {a} available")).unwrap_or_default())]
    OutOfMemory {
        what: String,
        requested: u64,
        available: Option<u64>,
    },
    /// A failure reported by a compute backend (driver, compiler, launch).
    #[error("{backend} backend: {msg}")]
    Backend { backend: &'static str, msg: String },
}

/// kiln's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `op`.
    pub fn invalid(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op: op.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Format`] in `context`.
    pub fn format(context: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format {
            context: context.into(),
            msg: msg.into(),
        }
    }

    /// An [`Error::Io`] on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
