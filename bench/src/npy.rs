//! Minimal NumPy `.npy` (format 1.0) writer and reader for little-endian `f32` and `i64`
//! C-order arrays: how the test and calibration inputs reach the ONNX Runtime side unchanged.

use crate::BenchError;
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types the benchmark exchanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `<f4`
    F32,
    /// `<i8`
    I64,
}

impl Dtype {
    fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::I64 => "<i8",
        }
    }
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::I64 => 8,
        }
    }
}

fn header(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [d] => format!("{d},"),
        _ => shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({dims}), }}",
        dtype.descr()
    );
    // magic(6) + version(2) + header length(2) + dict + padding + '\n', a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut out = Vec::with_capacity(unpadded + pad);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let hlen = (dict.len() + pad + 1) as u16;
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

fn check_len(shape: &[usize], n: usize) -> Result<(), BenchError> {
    if shape.iter().product::<usize>() != n {
        return Err(BenchError::Format(format!(
            "shape {shape:?} does not hold {n} values"
        )));
    }
    Ok(())
}

/// Encodes an `f32` array as `.npy` bytes.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Result<Vec<u8>, BenchError> {
    check_len(shape, data.len())?;
    let mut out = header(Dtype::F32, shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    Ok(out)
}

/// Encodes an `i64` array as `.npy` bytes.
pub fn encode_i64(shape: &[usize], data: &[i64]) -> Result<Vec<u8>, BenchError> {
    check_len(shape, data.len())?;
    let mut out = header(Dtype::I64, shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    Ok(out)
}

/// Writes an `f32` array to `path`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), BenchError> {
    Ok(std::fs::write(path, encode_f32(shape, data)?)?)
}

/// Writes an `i64` array to `path`.
pub fn write_i64(path: &Path, shape: &[usize], data: &[i64]) -> Result<(), BenchError> {
    Ok(std::fs::write(path, encode_i64(shape, data)?)?)
}

/// Parses `.npy` bytes written by this module (or NumPy, same dtypes): dtype, shape and the
/// raw little-endian payload.
pub fn decode(bytes: &[u8]) -> Result<(Dtype, Vec<usize>, &[u8]), BenchError> {
    let bad = |m: &str| BenchError::Format(format!("npy: {m}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC || bytes[6] != 1 {
        return Err(bad("not a version 1 .npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(
        bytes
            .get(10..10 + hlen)
            .ok_or_else(|| bad("short header"))?,
    )
    .map_err(|_| bad("header is not UTF-8"))?;
    let dtype = if dict.contains("'descr': '<f4'") {
        Dtype::F32
    } else if dict.contains("'descr': '<i8'") {
        Dtype::I64
    } else {
        return Err(bad("unsupported dtype"));
    };
    if !dict.contains("'fortran_order': False") {
        return Err(bad("Fortran order"));
    }
    let start = dict.find("'shape': (").ok_or_else(|| bad("no shape"))? + "'shape': (".len();
    let end = start
        + dict[start..]
            .find(')')
            .ok_or_else(|| bad("unterminated shape"))?;
    let shape = dict[start..end]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("bad dimension")))
        .collect::<Result<Vec<_>, _>>()?;
    let payload = &bytes[10 + hlen..];
    if payload.len() != shape.iter().product::<usize>() * dtype.size() {
        return Err(bad("payload length does not match the shape"));
    }
    Ok((dtype, shape, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_and_alignment() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b = encode_f32(&[3, 4], &data).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0, "data must start 64-byte aligned");
        let (dt, shape, payload) = decode(&b).unwrap();
        assert_eq!(dt, Dtype::F32);
        assert_eq!(shape, vec![3, 4]);
        let back: Vec<f32> = payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, data);
        assert!(encode_f32(&[5, 4], &data).is_err());
    }

    #[test]
    fn i64_vector_header_uses_python_tuple_syntax() {
        let b = encode_i64(&[3], &[7, -1, 2]).unwrap();
        let text = String::from_utf8_lossy(&b[10..]);
        assert!(text.contains("'shape': (3,)"), "{text}");
        let (dt, shape, payload) = decode(&b).unwrap();
        assert_eq!((dt, shape), (Dtype::I64, vec![3]));
        assert_eq!(&payload[8..16], &(-1i64).to_le_bytes());
        let mut broken = b.clone();
        broken.pop();
        assert!(decode(&broken).is_err());
    }
}
