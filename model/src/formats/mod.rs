//! Readers for labelled data files: UCR/UEA `.ts` ([`ts`]), CSV ([`csv`]) and NumPy
//! `.npy`/`.npz` ([`npy`]). Each turns a file into a [`RawSet`]: per sample one vector per
//! channel (missing values as NaN) and the label exactly as written in the file. Every reader
//! returns a [`FormatError`] naming the file (and line, where there is one) on malformed
//! input; none panics, whatever the bytes.

pub mod csv;
pub mod npy;
pub mod ts;

use std::path::{Path, PathBuf};

/// Samples and their labels as read from a file, before any preprocessing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawSet {
    /// Per sample, one value vector per channel (missing values are NaN).
    pub samples: Vec<Vec<Vec<f32>>>,
    /// Per sample, its label as written in the file (class name, or class id as text).
    pub labels: Vec<String>,
}

/// A malformed or unreadable data file.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct FormatError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, for text formats.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl FormatError {
    /// An error in `path` (at `line`, if known).
    pub fn new(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        FormatError {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// Reads a whole file, mapping the I/O error to a [`FormatError`].
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, FormatError> {
    std::fs::read(path).map_err(|e| FormatError::new(path, None, e.to_string()))
}

/// Reads a whole UTF-8 text file.
pub(crate) fn read_text(path: &Path) -> Result<String, FormatError> {
    String::from_utf8(read_bytes(path)?)
        .map_err(|e| FormatError::new(path, None, format!("not UTF-8 text: {e}")))
}

/// Parses one numeric value; `?` and `NaN` (any case) are missing values (NaN); infinities
/// are refused.
pub(crate) fn parse_value(s: &str) -> Result<f32, String> {
    let s = s.trim();
    if s == "?" || s.eq_ignore_ascii_case("nan") {
        return Ok(f32::NAN);
    }
    let v: f32 = s.parse().map_err(|_| format!("not a number: {s:?}"))?;
    if v.is_infinite() {
        return Err(format!("infinite value {s:?}"));
    }
    Ok(v)
}
