//! NumPy `.npy` arrays (format versions 1–3; little-endian `f4`/`f8`, signed and unsigned
//! integers of 1–8 bytes, `b1`; C order) and `.npz` archives (a zip of `.npy` members, as
//! written by `numpy.savez`: *stored*, uncompressed members, with or without zip64 fields;
//! `savez_compressed` archives are refused with a clear message). Values are read as f64.

use super::{read_bytes, FormatError};
use std::path::Path;

/// An n-dimensional array in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// The values, C order.
    pub data: Vec<f64>,
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray, FormatError> {
    parse(&read_bytes(path)?).map_err(|m| FormatError::new(path, None, m))
}

/// Reads array `key` (the member `key.npy`) of a `.npz` file.
pub fn read_npz(path: &Path, key: &str) -> Result<NpyArray, FormatError> {
    let bytes = read_bytes(path)?;
    let err = |m: String| FormatError::new(path, None, m);
    parse_npz(&bytes, key).map_err(err)
}

/// The array `key` of an `.npz` archive held in memory (stored members only).
pub fn parse_npz(bytes: &[u8], key: &str) -> Result<NpyArray, String> {
    let member = zip_member(bytes, &format!("{key}.npy"))?;
    parse(member).map_err(|m| format!("{key}.npy: {m}"))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| "truncated".to_string())
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| "truncated".to_string())
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    let s = b.get(at..at + 8).ok_or_else(|| "truncated".to_string())?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// Parses `.npy` bytes.
pub fn parse(b: &[u8]) -> Result<NpyArray, String> {
    if b.get(..6) != Some(b"\x93NUMPY".as_slice()) {
        return Err("not a .npy file (bad magic)".into());
    }
    let (hlen, start) = match b.get(6) {
        Some(1) => (usize::from(u16_at(b, 8)?), 10usize),
        Some(2 | 3) => (u32_at(b, 8)? as usize, 12),
        v => return Err(format!("unsupported .npy version {v:?}")),
    };
    let header = b
        .get(start..start.saturating_add(hlen))
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr")?
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    if dict_value(header, "fortran_order")?.trim() != "False" {
        return Err("Fortran-order arrays are not supported (save in C order)".into());
    }
    let shape_text = dict_value(header, "shape")?;
    let shape = shape_text
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("bad shape {shape_text:?}"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_text:?}"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape too large")?;
    let (kind, size) = descr.split_at(descr.len().min(2));
    let size: usize = size
        .parse()
        .map_err(|_| format!("unsupported dtype {descr:?}"))?;
    let conv: fn(&[u8]) -> f64 = match (kind, size) {
        ("<f", 4) => |s| f64::from(f32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        ("<f", 8) => |s| f64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        ("|i" | "<i", 1) => |s| f64::from(s[0] as i8),
        ("|u" | "<u" | "|b", 1) => |s| f64::from(s[0]),
        ("<i", 2) => |s| f64::from(i16::from_le_bytes([s[0], s[1]])),
        ("<u", 2) => |s| f64::from(u16::from_le_bytes([s[0], s[1]])),
        ("<i", 4) => |s| f64::from(i32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        ("<u", 4) => |s| f64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        ("<i", 8) => {
            |s| i64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f64
        }
        ("<u", 8) => {
            |s| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]) as f64
        }
        _ => {
            return Err(format!(
                "unsupported dtype {descr:?} (little-endian float, int or uint)"
            ))
        }
    };
    let body = &b[start + hlen..];
    let need = count.checked_mul(size).ok_or("shape too large")?;
    if body.len() != need {
        return Err(format!(
            "{} data bytes, shape {shape:?} of {descr} needs {need}",
            body.len()
        ));
    }
    let data = if size == 0 {
        Vec::new()
    } else {
        body.chunks_exact(size).map(conv).collect()
    };
    Ok(NpyArray { shape, data })
}

/// The text of `'key': value` in the header dict (up to the next top-level comma).
fn dict_value<'a>(header: &'a str, key: &str) -> Result<&'a str, String> {
    let missing = || format!("header has no {key:?}");
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))
        .ok_or_else(missing)?;
    let rest = &header[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':').ok_or_else(missing)?;
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth <= 0 => return Ok(&rest[..i]),
            _ => {}
        }
    }
    Err(missing())
}

/// The bytes of a stored member of a zip archive, CRC-checked.
fn zip_member<'a>(z: &'a [u8], name: &str) -> Result<&'a [u8], String> {
    const EOCD: u32 = 0x0605_4b50;
    let lowest = z.len().saturating_sub(22 + 65_535);
    let eocd = (lowest..=z.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(z, i) == Ok(EOCD))
        .ok_or("not a zip archive (.npz): no end-of-central-directory record")?;
    let entries = u16_at(z, eocd + 10)?;
    let mut at = u32_at(z, eocd + 16)? as usize;
    let mut names = Vec::new();
    for _ in 0..entries {
        if u32_at(z, at)? != 0x0201_4b50 {
            return Err("corrupt zip central directory".into());
        }
        let method = u16_at(z, at + 10)?;
        let crc = u32_at(z, at + 16)?;
        let mut comp = u64::from(u32_at(z, at + 20)?);
        let mut size = u64::from(u32_at(z, at + 24)?);
        let name_len = usize::from(u16_at(z, at + 28)?);
        let extra_len = usize::from(u16_at(z, at + 30)?);
        let comment_len = usize::from(u16_at(z, at + 32)?);
        let mut offset = u64::from(u32_at(z, at + 42)?);
        let this = z.get(at + 46..at + 46 + name_len).ok_or("truncated")?;
        let extra = z
            .get(at + 46 + name_len..at + 46 + name_len + extra_len)
            .ok_or("truncated")?;
        at += 46 + name_len + extra_len + comment_len;
        let this = String::from_utf8_lossy(this);
        if this != name {
            names.push(this.trim_end_matches(".npy").to_string());
            continue;
        }
        // zip64: the fields saturated at 0xFFFFFFFF are in the 0x0001 extra, in this order.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let (id, len) = (u16_at(extra, e)?, usize::from(u16_at(extra, e + 2)?));
            if id == 1 {
                let mut f = e + 4;
                for field in [&mut size, &mut comp, &mut offset] {
                    if *field == 0xFFFF_FFFF {
                        *field = u64_at(extra, f)?;
                        f += 8;
                    }
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(format!(
                "{name} is compressed (method {method}); only stored members are read: \
                 write the file with numpy.savez, not savez_compressed"
            ));
        }
        let local = usize::try_from(offset).map_err(|_| "bad offset")?;
        if u32_at(z, local)? != 0x0403_4b50 {
            return Err("corrupt zip local header".into());
        }
        let data_at =
            local + 30 + usize::from(u16_at(z, local + 26)?) + usize::from(u16_at(z, local + 28)?);
        let len = usize::try_from(size).map_err(|_| "bad size")?;
        if comp != size {
            return Err("stored member with differing sizes".into());
        }
        let data = z
            .get(data_at..data_at.checked_add(len).ok_or("bad size")?)
            .ok_or("truncated member")?;
        if crc32fast::hash(data) != crc {
            return Err(format!("{name}: CRC mismatch"));
        }
        return Ok(data);
    }
    Err(format!(
        "no array {:?} in the archive (arrays: {names:?})",
        name.trim_end_matches(".npy")
    ))
}

#[cfg(test)]
/// A `.npy` v1 file: header padded so the data starts at a multiple of 64.
pub(crate) fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_npy_dtypes() {
        let f: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse(&npy_bytes("<f4", "(2, 3)", &f)).unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(a.data, [1.5, -2.0, 3.25, 0.0, 5.0, 6.0]);
        let i: Vec<u8> = [-3i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            parse(&npy_bytes("<i8", "(2,)", &i)).unwrap().data,
            [-3.0, 7.0]
        );
        assert_eq!(
            parse(&npy_bytes("|u1", "(2,)", &[9, 255])).unwrap().data,
            [9.0, 255.0]
        );
        let d: Vec<u8> = 0.1f64.to_le_bytes().to_vec();
        assert_eq!(parse(&npy_bytes("<f8", "()", &d)).unwrap().data, [0.1]);
    }

    #[test]
    fn malformed_npy_is_an_error() {
        let good = npy_bytes("<f4", "(2,)", &[0; 8]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\x93NUMPX".to_vec(), "magic"),
            (npy_bytes("<f4", "(3,)", &[0; 8]), "needs 12"),
            (npy_bytes(">f4", "(2,)", &[0; 8]), "unsupported dtype"),
            (npy_bytes("<U3", "(2,)", &[0; 8]), "unsupported dtype"),
            (npy_bytes("<f4", "(a,)", &[0; 8]), "bad shape"),
            (
                npy_bytes("<f4", "(99999999999,99999999999,9999999)", &[]),
                "too large",
            ),
            (good[..9].to_vec(), "truncated"),
            (good[..20].to_vec(), "truncated header"),
            (
                npy_bytes("<f4", "(2,)", &[0; 8]).replace_at(6, 9),
                "version",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse(&bytes).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let mut fortran = good.clone();
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        assert!(parse(&fortran).unwrap_err().contains("Fortran"));
        // Every truncation of a valid file is an error, never a panic.
        for n in 0..good.len() {
            assert!(parse(&good[..n]).is_err());
        }
    }

    trait ReplaceAt {
        fn replace_at(self, at: usize, v: u8) -> Self;
    }
    impl ReplaceAt for Vec<u8> {
        fn replace_at(mut self, at: usize, v: u8) -> Self {
            self[at] = v;
            self
        }
    }

    /// `model/tests/fixtures/small.npz`: written by Python's zipfile exactly as numpy.savez
    /// does (stored, `force_zip64=True`): `x` = f8 (3, 2, 4) = arange(24) / 4, `y` = i8 [0, 2, 1].
    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/small.npz")
    }

    #[test]
    fn reads_npz_written_like_numpy_savez() {
        let x = read_npz(&fixture(), "x").unwrap();
        assert_eq!(x.shape, [3, 2, 4]);
        assert_eq!(
            x.data,
            (0..24).map(|v| f64::from(v) / 4.0).collect::<Vec<_>>()
        );
        assert_eq!(read_npz(&fixture(), "y").unwrap().data, [0.0, 2.0, 1.0]);
        let e = read_npz(&fixture(), "z").unwrap_err().to_string();
        assert!(
            e.contains("no array \"z\"") && e.contains("small.npz"),
            "{e}"
        );
    }

    #[test]
    fn malformed_npz_is_an_error_never_a_panic() {
        let good = std::fs::read(fixture()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npz");
        // Every truncation and every single-byte corruption: an error or the right data.
        for n in 0..good.len() {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(read_npz(&p, "x").is_err());
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xA5;
            std::fs::write(&p, &b).unwrap();
            if let Ok(a) = read_npz(&p, "x") {
                assert_eq!(a.data.len(), a.shape.iter().product::<usize>());
            }
        }
        std::fs::write(&p, b"PK\x05\x06").unwrap();
        assert!(read_npz(&p, "x").is_err());
    }
}
