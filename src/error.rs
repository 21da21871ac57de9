//! The library's error type. Anything that comes from outside (files, flags, checkpoints) is
//! reported through it with the file and key named; only programming errors panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The io error is shown inline and deliberately not a source (a field named `source` would
    // be one): `{:#}` chains would print it twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype} (expected f32, f16 or bf16)")]
    UnsupportedDType {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: tensor `{key}` not found")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{key}` holds {count} of {total} values not finite (NaN or infinite): \
         a diverged or damaged checkpoint"
    )]
    NonFinite {
        path: PathBuf,
        key: String,
        count: usize,
        total: usize,
    },
    #[error("{0}")]
    Invalid(String),
    // Shown inline and not a source, as `Io`'s error.
    #[error("device: {0}")]
    Kernel(crate::device::kernel::KernelError),
}

impl From<crate::device::kernel::KernelError> for Error {
    fn from(e: crate::device::kernel::KernelError) -> Error {
        Error::Kernel(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{emu::EmuError, kernel::KernelError};

    #[test]
    fn a_device_error_chain_says_each_message_once() {
        let e = anyhow::Error::from(Error::from(KernelError::from(EmuError::Fault("x".into()))));
        assert_eq!(format!("{e:#}"), "device: emulator: fault: x");
        let io = Error::io("f", std::io::Error::other("gone"));
        assert_eq!(format!("{:#}", anyhow::Error::from(io)), "f: gone");
    }
}
