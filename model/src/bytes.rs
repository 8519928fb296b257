//! Byte coding shared by Hearth's binary formats: the update codec, the compact model
//! package, the coordinator's aggregate state and the agent's residuals.
//!
//! Fixed-width integers and floats are little-endian; lengths in the compact formats are
//! LEB128 varints. Reading never panics: every length is checked against the bytes left and a
//! caller-given bound before anything is allocated.

/// Malformed or truncated bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err(msg: impl Into<String>) -> DecodeError {
    DecodeError(msg.into())
}

/// Appending values to a byte buffer.
pub trait Put {
    /// One byte.
    fn put_u8(&mut self, v: u8);
    /// Raw bytes.
    fn put_bytes(&mut self, v: &[u8]);
    /// A LEB128 varint (1–10 bytes).
    fn put_varint(&mut self, v: u64);
    /// Little-endian `u32`.
    fn put_u32(&mut self, v: u32) {
        self.put_bytes(&v.to_le_bytes());
    }
    /// Little-endian `u64`.
    fn put_u64(&mut self, v: u64) {
        self.put_bytes(&v.to_le_bytes());
    }
    /// Little-endian `f32`.
    fn put_f32(&mut self, v: f32) {
        self.put_bytes(&v.to_le_bytes());
    }
    /// Little-endian `f64`.
    fn put_f64(&mut self, v: f64) {
        self.put_bytes(&v.to_le_bytes());
    }
    /// A tensor header in the compact formats: name length, name, rank, dimensions (varints).
    fn put_header(&mut self, name: &str, shape: &[usize]) {
        self.put_varint(name.len() as u64);
        self.put_bytes(name.as_bytes());
        self.put_varint(shape.len() as u64);
        for &d in shape {
            self.put_varint(d as u64);
        }
    }
    /// A tensor header in the fixed-width state formats (the coordinator's aggregate, the
    /// agent's residuals): `u32` name length, name, `u32` rank, `u64` dimensions.
    fn put_state_header(&mut self, name: &str, shape: &[usize]) {
        self.put_u32(name.len() as u32);
        self.put_bytes(name.as_bytes());
        self.put_u32(shape.len() as u32);
        for &d in shape {
            self.put_u64(d as u64);
        }
    }
    /// Sorted, distinct positions as varint gaps (`i − previous − 1`, the first from 0).
    fn put_gaps(&mut self, positions: impl IntoIterator<Item = usize>) {
        let mut next = 0;
        for i in positions {
            debug_assert!(i >= next, "positions must be sorted and distinct");
            self.put_varint((i - next) as u64);
            next = i + 1;
        }
    }
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_bytes(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
    fn put_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }
}

/// A cursor over bytes being decoded.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The bytes not read yet (without consuming them).
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(err(format!(
                "truncated: need {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Expects the next bytes to be `magic` (a format's header).
    pub fn expect(&mut self, magic: &[u8], what: &str) -> Result<(), DecodeError> {
        if self.take(magic.len()).ok() != Some(magic) {
            return Err(err(format!("not {what}: bad magic")));
        }
        Ok(())
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    /// Little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Little-endian `f32`.
    pub fn f32(&mut self) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    /// Little-endian `f64`.
    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// A LEB128 varint of at most 64 bits.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(err("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(err("varint longer than 10 bytes"))
    }

    /// A varint count or size, refused above `max`.
    pub fn usize(&mut self, what: &str, max: usize) -> Result<usize, DecodeError> {
        let v = self.varint()?;
        bounded(v, what, max)
    }

    /// A little-endian `u32` count or size, refused above `max`.
    pub fn u32_len(&mut self, what: &str, max: usize) -> Result<usize, DecodeError> {
        let v = self.u32()?;
        bounded(u64::from(v), what, max)
    }

    /// A little-endian `u64` count or size, refused above `max`.
    pub fn u64_len(&mut self, what: &str, max: usize) -> Result<usize, DecodeError> {
        let v = self.u64()?;
        bounded(v, what, max)
    }

    /// `len` bytes of UTF-8.
    pub fn str(&mut self, len: usize, what: &str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.take(len)?).map_err(|_| err(format!("{what} is not UTF-8")))
    }

    /// A tensor header written by [`Put::put_header`]: name and shape, with the rank at most
    /// `max_rank` and the element count at most `max_elements`.
    pub fn header(
        &mut self,
        max_rank: usize,
        max_elements: usize,
    ) -> Result<(String, Vec<usize>), DecodeError> {
        let name_len = self.usize("name length", 4096)?;
        let name = self.str(name_len, "tensor name")?.to_string();
        let rank = self.usize("rank", max_rank)?;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(self.usize("dimension", max_elements)?);
        }
        elements(&shape, max_elements).map_err(|e| err(format!("tensor {name}: {e}")))?;
        Ok((name, shape))
    }

    /// A tensor header written by [`Put::put_state_header`], with the same bounds as
    /// [`Reader::header`].
    pub fn state_header(
        &mut self,
        max_rank: usize,
        max_elements: usize,
    ) -> Result<(String, Vec<usize>), DecodeError> {
        let name_len = self.u32_len("name length", 4096)?;
        let name = self.str(name_len, "tensor name")?.to_string();
        let rank = self.u32_len("rank", max_rank)?;
        let mut shape = Vec::with_capacity(rank);
        for _ in 0..rank {
            shape.push(self.u64_len("dimension", max_elements)?);
        }
        elements(&shape, max_elements).map_err(|e| err(format!("tensor {name}: {e}")))?;
        Ok((name, shape))
    }

    /// `count` sorted positions below `n` written by [`Put::put_gaps`].
    pub fn gaps(&mut self, count: usize, n: usize) -> Result<Vec<usize>, DecodeError> {
        if count > n {
            return Err(err(format!("{count} positions in {n} values")));
        }
        // Every gap takes at least one byte: a count beyond the bytes left is refused before
        // anything is allocated.
        if count > self.remaining() {
            return Err(err(format!(
                "{count} positions in {} bytes",
                self.remaining()
            )));
        }
        let mut out = Vec::with_capacity(count);
        let mut next = 0usize;
        for _ in 0..count {
            let i = next
                .checked_add(self.usize("index gap", n)?)
                .filter(|&i| i < n)
                .ok_or_else(|| err(format!("position out of range (n = {n})")))?;
            out.push(i);
            next = i + 1;
        }
        Ok(out)
    }

    /// `n` little-endian `f32`s.
    pub fn f32s(&mut self, n: usize) -> Result<Vec<f32>, DecodeError> {
        let raw = self.take(n.checked_mul(4).ok_or_else(|| err("size overflows"))?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// `n` little-endian `f64`s.
    pub fn f64s(&mut self, n: usize) -> Result<Vec<f64>, DecodeError> {
        let raw = self.take(n.checked_mul(8).ok_or_else(|| err("size overflows"))?)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a)
            })
            .collect())
    }

    /// Succeeds only when every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(err(format!("{n} trailing bytes"))),
        }
    }
}

fn bounded(v: u64, what: &str, max: usize) -> Result<usize, DecodeError> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v <= max)
        .ok_or_else(|| err(format!("{what} {v} exceeds {max}")))
}

/// The element count of `shape`, refused on overflow or above `max`.
pub fn elements(shape: &[usize], max: usize) -> Result<usize, DecodeError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= max)
        .ok_or_else(|| err(format!("shape {shape:?} exceeds {max} elements")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let mut b = Vec::new();
        b.put_bytes(b"MAGC");
        b.put_u8(7);
        b.put_u32(0xdead_beef);
        b.put_u64(u64::MAX - 1);
        b.put_f32(-1.5);
        b.put_f64(1e300);
        for v in [0, 127, 128, 300, u64::MAX] {
            b.put_varint(v);
        }
        b.put_header("fc1.weight", &[3, 4]);
        b.put_gaps([0, 2, 3, 9]);
        b.put_state_header("b", &[]);
        let mut r = Reader::new(&b);
        r.expect(b"MAGC", "a test").unwrap();
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.u64().unwrap(), u64::MAX - 1);
        assert_eq!(r.f32().unwrap(), -1.5);
        assert_eq!(r.f64().unwrap(), 1e300);
        for v in [0, 127, 128, 300, u64::MAX] {
            assert_eq!(r.varint().unwrap(), v);
        }
        assert_eq!(
            r.header(8, 100).unwrap(),
            ("fc1.weight".to_string(), vec![3, 4])
        );
        assert_eq!(r.gaps(4, 10).unwrap(), vec![0, 2, 3, 9]);
        assert_eq!(r.state_header(8, 1).unwrap(), ("b".to_string(), vec![]));
        r.finish().unwrap();
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(Reader::new(&[1, 2]).u32().is_err());
        assert!(Reader::new(&[0xff; 11]).varint().is_err());
        // 2^64 does not fit.
        let mut b = vec![0xff; 9];
        b.push(0x02);
        assert!(Reader::new(&b).varint().is_err());
        let mut b = Vec::new();
        b.put_varint(5000);
        assert!(Reader::new(&b).usize("count", 4999).is_err());
        assert!(Reader::new(&b).usize("count", 5000).is_ok());
        // A header whose dimensions multiply past the bound.
        let mut b = Vec::new();
        b.put_header("w", &[1 << 20, 1 << 20]);
        assert!(Reader::new(&b).header(8, 1 << 30).is_err());
        let mut b = Vec::new();
        b.put_state_header("w", &[1 << 20, 1 << 20]);
        assert!(Reader::new(&b).state_header(8, 1 << 30).is_err());
        assert!(Reader::new(&b).state_header(1, usize::MAX).is_err());
        // Gaps that leave the range, and more positions than values.
        let mut b = Vec::new();
        b.put_gaps([5]);
        assert!(Reader::new(&b).gaps(1, 5).is_err());
        assert!(Reader::new(&b).gaps(6, 5).is_err());
        // A count the bytes cannot hold is refused before allocating.
        assert!(Reader::new(&[0, 0]).gaps(1 << 40, usize::MAX).is_err());
        assert!(Reader::new(&[0xff, 0xfe]).str(2, "name").is_err());
        assert!(Reader::new(&[1]).finish().is_err());
        assert!(Reader::new(b"XXXX").expect(b"HUPD", "an update").is_err());
        assert!(Reader::new(&[0; 7]).f32s(2).is_err());
    }
}
