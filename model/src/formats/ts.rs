//! UCR/UEA `.ts` files (the sktime/aeon text format): `#` comments, `@` header lines
//! (`@problemName`, `@univariate`, `@dimensions`, `@equalLength`, `@seriesLength`,
//! `@classLabel true <labels…>`, …), then after `@data` one series per line: channels
//! separated by `:`, values by `,`, the class label last. Univariate and multivariate, equal
//! and unequal length; `?` is a missing value (NaN). Time-stamped series (`@timeStamps true`)
//! are refused.

use super::{parse_value, read_text, FormatError, RawSet};
use std::path::Path;

/// Reads a `.ts` file.
pub fn read(path: &Path) -> Result<RawSet, FormatError> {
    parse(&read_text(path)?, path)
}

/// Parses `.ts` text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<RawSet, FormatError> {
    let mut set = RawSet::default();
    let mut in_data = false;
    let mut has_labels = true;
    let mut allowed: Option<Vec<String>> = None;
    let mut dimensions: Option<usize> = None;
    let mut series_len: Option<usize> = None;
    let mut equal_length = false;
    for (i, line) in text.lines().enumerate() {
        let lineno = Some(i + 1);
        let err = |m: String| FormatError::new(path, lineno, m);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !in_data {
            let Some(header) = line.strip_prefix('@') else {
                return Err(err("data line before @data".into()));
            };
            let mut words = header.split_whitespace();
            let key = words.next().unwrap_or("").to_ascii_lowercase();
            let rest: Vec<&str> = words.collect();
            let flag = |rest: &[&str]| -> Result<bool, FormatError> {
                match rest.first().map(|s| s.to_ascii_lowercase()).as_deref() {
                    Some("true") => Ok(true),
                    Some("false") => Ok(false),
                    _ => Err(err(format!("@{key}: expected true or false"))),
                }
            };
            let number = |rest: &[&str]| -> Result<usize, FormatError> {
                rest.first()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| err(format!("@{key}: expected a count")))
            };
            match key.as_str() {
                "data" => in_data = true,
                "timestamps" if flag(&rest)? => {
                    return Err(err("time-stamped .ts series are not supported".into()))
                }
                "classlabel" => {
                    has_labels = flag(&rest)?;
                    if has_labels && rest.len() > 1 {
                        allowed = Some(rest[1..].iter().map(|s| s.to_string()).collect());
                    }
                }
                "dimensions" => dimensions = Some(number(&rest)?.max(1)),
                "univariate" if flag(&rest)? => dimensions = Some(1),
                "equallength" => equal_length = flag(&rest)?,
                "serieslength" => series_len = Some(number(&rest)?),
                _ => {}
            }
            continue;
        }
        let mut fields: Vec<&str> = line.split(':').collect();
        let label = if has_labels {
            if fields.len() < 2 {
                return Err(err("no class label after the last ':'".into()));
            }
            fields.pop().unwrap_or_default().trim().to_string()
        } else {
            String::new()
        };
        if has_labels {
            if label.is_empty() {
                return Err(err("empty class label".into()));
            }
            if let Some(a) = &allowed {
                if !a.contains(&label) {
                    return Err(err(format!(
                        "label {label:?} is not among @classLabel {a:?}"
                    )));
                }
            }
        }
        if let Some(d) = dimensions {
            if fields.len() != d {
                return Err(err(format!(
                    "{} channels, @dimensions says {d}",
                    fields.len()
                )));
            }
        } else if let Some(first) = set.samples.first() {
            if first.len() != fields.len() {
                return Err(err(format!(
                    "{} channels, earlier series have {}",
                    fields.len(),
                    first.len()
                )));
            }
        }
        let mut channels = Vec::with_capacity(fields.len());
        for (c, f) in fields.iter().enumerate() {
            if f.trim().is_empty() {
                return Err(err(format!("channel {c} is empty")));
            }
            if f.trim_start().starts_with('(') {
                return Err(err("time-stamped values are not supported".into()));
            }
            let values = f
                .split(',')
                .map(parse_value)
                .collect::<Result<Vec<f32>, String>>()
                .map_err(|m| err(format!("channel {c}: {m}")))?;
            if equal_length {
                if let Some(n) = series_len.filter(|&n| n != values.len()) {
                    return Err(err(format!(
                        "channel {c}: {} values, @seriesLength says {n}",
                        values.len()
                    )));
                }
            }
            channels.push(values);
        }
        set.samples.push(channels);
        set.labels.push(label);
    }
    if !in_data {
        return Err(FormatError::new(path, None, "no @data section"));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
        let p = dir.path().join("x.ts");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_univariate_multivariate_unequal_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "# comment\n@problemName t\n@univariate false\n@dimensions 2\n@equalLength false\n\
             @classLabel true walk run\n@data\n1,2,3:4,5,?:walk\n0.5,-1e-3:7,8:run\n",
        );
        let s = read(&p).unwrap();
        assert_eq!(s.labels, ["walk", "run"]);
        assert_eq!(s.samples[0][0], [1.0, 2.0, 3.0]);
        assert_eq!(s.samples[0][1][..2], [4.0, 5.0]);
        assert!(s.samples[0][1][2].is_nan());
        assert_eq!(s.samples[1][0], [0.5, -1e-3]);
        let p = write(
            &dir,
            "@univariate true\n@classLabel true 1 2\n@data\n1,2:2\n3,4,5:1\n",
        );
        let s = read(&p).unwrap();
        assert_eq!(s.samples[1], vec![vec![3.0, 4.0, 5.0]]);
    }

    #[test]
    fn malformed_files_are_errors_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("@data\n1,2\n", "no class label"),
            ("@classLabel true a b\n@data\n1,2:c\n", "not among"),
            ("@dimensions 2\n@data\n1,2:a\n", "@dimensions says 2"),
            ("@data\n1,x:a\n", "not a number"),
            ("@data\n1,:a\n", "not a number"),
            ("@data\n1,inf:a\n", "infinite"),
            ("@data\n1:2,3:a\n1:a\n", "earlier series"),
            ("@timeStamps true\n@data\n(1,2):a\n", "time-stamped"),
            ("1,2:a\n", "before @data"),
            ("@problemName x\n", "no @data"),
            (
                "@equalLength true\n@seriesLength 3\n@data\n1,2:a\n",
                "@seriesLength",
            ),
            ("@data\n:a\n", "empty"),
            ("@data\n1,2:\n", "empty class label"),
            ("@dimensions x\n@data\n", "expected a count"),
        ];
        for (text, want) in cases {
            let e = read(&write(&dir, text)).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains("x.ts"), "{e}");
        }
        std::fs::write(dir.path().join("bin.ts"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(read(&dir.path().join("bin.ts")).is_err());
        assert!(read(&dir.path().join("missing.ts")).is_err());
    }
}
