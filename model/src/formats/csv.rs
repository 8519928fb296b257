//! Comma-separated text: one sample per line. With a header line, the label is the column
//! named by `label_column` and every other column is a value; without one (Hearth's vendored
//! `label_id,v1,…,vn` files), the label is the first field and rows may differ in length.
//! Empty lines are skipped; `?`/`NaN` are missing values; fields are not quoted (surrounding
//! double quotes on a label are removed).

use super::{parse_value, read_text, FormatError, RawSet};
use std::path::Path;

/// How a CSV file is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvOptions {
    /// The first non-empty line names the columns.
    pub header: bool,
    /// With a header: the name of the label column.
    pub label_column: String,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            header: true,
            label_column: "label".into(),
        }
    }
}

/// Reads a CSV file; each sample is one channel of the row's values.
pub fn read(path: &Path, opts: &CsvOptions) -> Result<RawSet, FormatError> {
    parse(&read_text(path)?, path, opts)
}

/// Parses CSV text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path, opts: &CsvOptions) -> Result<RawSet, FormatError> {
    let mut set = RawSet::default();
    let mut label_at: Option<usize> = if opts.header { None } else { Some(0) };
    let mut width: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let err = |m: String| FormatError::new(path, Some(i + 1), m);
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let Some(at) = label_at else {
            let at = fields
                .iter()
                .position(|f| f.trim_matches('"') == opts.label_column)
                .ok_or_else(|| {
                    err(format!(
                        "header has no label column {:?} (columns: {})",
                        opts.label_column,
                        fields.join(",")
                    ))
                })?;
            label_at = Some(at);
            width = Some(fields.len());
            continue;
        };
        if let Some(w) = width.filter(|&w| w != fields.len()) {
            return Err(err(format!("{} fields, the header has {w}", fields.len())));
        }
        let label = fields.get(at).copied().unwrap_or("").trim_matches('"');
        if label.is_empty() {
            return Err(err("empty label".into()));
        }
        let values = fields
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != at)
            .map(|(_, f)| parse_value(f))
            .collect::<Result<Vec<f32>, String>>()
            .map_err(err)?;
        if values.is_empty() {
            return Err(err("no values".into()));
        }
        set.samples.push(vec![values]);
        set.labels.push(label.to_string());
    }
    if label_at.is_none() {
        return Err(FormatError::new(path, None, "empty file: no header"));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_with_and_without_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(&p, "t0,t1,class,t2\n1,2,on,3\n\n4,?,\"off\",6\n").unwrap();
        let opts = CsvOptions {
            header: true,
            label_column: "class".into(),
        };
        let s = read(&p, &opts).unwrap();
        assert_eq!(s.labels, ["on", "off"]);
        assert_eq!(s.samples[0], vec![vec![1.0, 2.0, 3.0]]);
        assert!(s.samples[1][0][1].is_nan());
        std::fs::write(&p, "3,1,2\n0,5\n").unwrap();
        let opts = CsvOptions {
            header: false,
            ..CsvOptions::default()
        };
        let s = read(&p, &opts).unwrap();
        assert_eq!(s.labels, ["3", "0"]);
        assert_eq!(s.samples[1], vec![vec![5.0]]);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.csv");
        let cases = [
            ("a,b\n1,2\n", true, "no label column"),
            ("label,a\n1,2,3\n", true, "2:"),
            ("label,a\nx,y\n", true, "not a number"),
            ("label,a\n,1\n", true, "empty label"),
            ("label\nx\n", true, "no values"),
            ("", true, "no header"),
            ("1,2\n3,1e39\n", false, ":2: infinite"),
            ("1\n", false, "no values"),
        ];
        for (text, header, want) in cases {
            std::fs::write(&p, text).unwrap();
            let opts = CsvOptions {
                header,
                ..CsvOptions::default()
            };
            let e = read(&p, &opts).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("b.csv"), "{text:?}: {e}");
        }
    }
}
