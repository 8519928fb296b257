//! Federated averaging as a running weighted sum: memory is O(model) whatever the number of
//! clients. [`validate_update`] checks an update against the global model before it is folded.

use std::collections::BTreeMap;

use hearth_model::bytes::{DecodeError, Put, Reader};
use hearth_model::{Tensor, Weights};

/// Why an update or an aggregate was refused.
#[derive(thiserror::Error, Debug, PartialEq)]
pub enum AggregateError {
    /// Tensor names differ from the global model's.
    #[error("tensor names differ from the global model: {0}")]
    Names(String),
    /// A tensor has the wrong shape or length.
    #[error("tensor {name}: shape {got:?} (len {len}), expected {want:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Shape received.
        got: Vec<usize>,
        /// Data length received.
        len: usize,
        /// Shape expected.
        want: Vec<usize>,
    },
    /// NaN or infinity.
    #[error("tensor {0} holds a non-finite value")]
    NonFinite(String),
    /// L2 norm above the bound.
    #[error("update L2 norm {norm} exceeds the bound {bound}")]
    Norm {
        /// Norm of the update.
        norm: f64,
        /// Configured bound.
        bound: f32,
    },
    /// FedAvg weight must be positive.
    #[error("update weight must be a finite number > 0, got {0}")]
    Weight(f64),
    /// Nothing was folded.
    #[error("no updates were aggregated")]
    Empty,
    /// A robust method cannot combine these updates.
    #[error("{0}")]
    Robust(String),
    /// Serialised aggregate is malformed.
    #[error("malformed aggregate bytes: {0}")]
    Encoding(String),
}

/// Checks `update` has the global model's tensor names and shapes, holds only finite values and
/// has an L2 norm of at most `max_norm`. Returns the norm.
pub fn validate_update(
    update: &Weights,
    global: &Weights,
    max_norm: f32,
) -> Result<f64, AggregateError> {
    if update.len() != global.len() || update.keys().zip(global.keys()).any(|(a, b)| a != b) {
        let missing: Vec<&str> = global
            .keys()
            .filter(|k| !update.contains_key(*k))
            .map(String::as_str)
            .collect();
        let extra: Vec<&str> = update
            .keys()
            .filter(|k| !global.contains_key(*k))
            .map(String::as_str)
            .collect();
        return Err(AggregateError::Names(format!(
            "missing {missing:?}, unexpected {extra:?}"
        )));
    }
    let mut sq = 0f64;
    for (name, t) in update {
        let want = &global[name];
        if t.shape != want.shape || t.data.len() != want.data.len() {
            return Err(AggregateError::Shape {
                name: name.clone(),
                got: t.shape.clone(),
                len: t.data.len(),
                want: want.shape.clone(),
            });
        }
        for &v in &t.data {
            if !v.is_finite() {
                return Err(AggregateError::NonFinite(name.clone()));
            }
            sq += f64::from(v) * f64::from(v);
        }
    }
    let norm = sq.sqrt();
    if norm > f64::from(max_norm) {
        return Err(AggregateError::Norm {
            norm,
            bound: max_norm,
        });
    }
    Ok(norm)
}

/// Scales `update` down so its L2 norm (`norm`, as returned by [`validate_update`]) is at most
/// `bound`; returns whether it was scaled. A `bound` of 0 means no clipping.
pub fn clip_update(update: &mut Weights, norm: f64, bound: f32) -> bool {
    if bound <= 0.0 || norm <= f64::from(bound) {
        return false;
    }
    let scale = (f64::from(bound) / norm) as f32;
    for t in update.values_mut() {
        for v in &mut t.data {
            *v *= scale;
        }
    }
    true
}

const WEIGHTS_MAGIC: &[u8; 5] = b"HWTS1";

/// Writes `w` in the fixed-width state format (f32 values): how the store keeps the decoded
/// updates of a round for the robust methods, and the server optimizer's moments.
pub fn put_weights(b: &mut Vec<u8>, w: &Weights) {
    b.put_bytes(WEIGHTS_MAGIC);
    b.put_u32(w.len() as u32);
    for (name, t) in w {
        b.put_state_header(name, &t.shape);
        b.put_u64(t.data.len() as u64);
        for &v in &t.data {
            b.put_f32(v);
        }
    }
}

/// Reads what [`put_weights`] wrote.
pub fn read_weights(r: &mut Reader<'_>) -> Result<Weights, AggregateError> {
    r.expect(WEIGHTS_MAGIC, "stored weights")?;
    Ok(read_tensors(r, 4, Reader::f32s)?
        .into_iter()
        .map(|(name, shape, data)| (name, Tensor::new(shape, data)))
        .collect())
}

/// A tensor's name, shape and values as read by [`read_tensors`].
type NamedValues<T> = (String, Vec<usize>, Vec<T>);

/// A `u32` count of tensors, each a state header, a `u64` length and `width`-byte values read
/// by `values` (the layout of [`put_weights`] and [`Aggregate::to_bytes`]).
fn read_tensors<'a, T>(
    r: &mut Reader<'a>,
    width: usize,
    values: impl Fn(&mut Reader<'a>, usize) -> Result<Vec<T>, DecodeError>,
) -> Result<Vec<NamedValues<T>>, DecodeError> {
    // Every tensor takes at least 20 bytes, which bounds the count by the input size.
    let n = r.u32_len("tensor count", r.remaining() / 20)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (name, shape) = r.state_header(16, usize::MAX)?;
        let len = r.u64_len("tensor length", r.remaining() / width)?;
        // Found by fuzzing (`state_files`): a shape whose size differs from the values
        // made `Tensor::new` panic.
        if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(len) {
            return Err(DecodeError(format!(
                "tensor {name}: shape {shape:?} does not hold {len} values"
            )));
        }
        out.push((name, shape, values(r, len)?));
    }
    Ok(out)
}

/// [`put_weights`] into a fresh buffer.
pub fn weights_to_bytes(w: &Weights) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + 4 * hearth_model::num_params(w));
    put_weights(&mut b, w);
    b
}

/// [`read_weights`] over a whole buffer.
pub fn weights_from_bytes(bytes: &[u8]) -> Result<Weights, AggregateError> {
    let mut r = Reader::new(bytes);
    let w = read_weights(&mut r)?;
    r.finish()?;
    Ok(w)
}

/// Σ wᵢ·Δᵢ and Σ wᵢ, accumulated in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    total_weight: f64,
    count: u32,
    sum: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

const MAGIC: &[u8; 5] = b"HAGG1";

impl Aggregate {
    /// An empty sum shaped like `template`.
    pub fn new(template: &Weights) -> Aggregate {
        Aggregate {
            total_weight: 0.0,
            count: 0,
            sum: template
                .iter()
                .map(|(k, t)| (k.clone(), (t.shape.clone(), vec![0f64; t.data.len()])))
                .collect(),
        }
    }

    /// Number of folded updates.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Σ weights.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// Adds `weight · update`. The update must match the sum's names and shapes.
    pub fn fold(&mut self, update: &Weights, weight: f64) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::Weight(weight));
        }
        if update.len() != self.sum.len() || update.keys().zip(self.sum.keys()).any(|(a, b)| a != b)
        {
            return Err(AggregateError::Names(
                "update does not match the aggregate".into(),
            ));
        }
        for (name, t) in update {
            let (shape, acc) = &self.sum[name];
            if &t.shape != shape || t.data.len() != acc.len() {
                return Err(AggregateError::Shape {
                    name: name.clone(),
                    got: t.shape.clone(),
                    len: t.data.len(),
                    want: shape.clone(),
                });
            }
        }
        for (name, t) in update {
            let acc = &mut self.sum.get_mut(name).expect("checked above").1;
            for (a, &v) in acc.iter_mut().zip(&t.data) {
                *a += weight * f64::from(v);
            }
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Adds another sum of the same shape (an instance's partial sum of the same round).
    pub fn merge(&mut self, other: &Aggregate) -> Result<(), AggregateError> {
        if self.sum.len() != other.sum.len()
            || self
                .sum
                .iter()
                .zip(&other.sum)
                .any(|((a, (sa, da)), (b, (sb, db)))| a != b || sa != sb || da.len() != db.len())
        {
            return Err(AggregateError::Names(
                "partial sums of different shapes".into(),
            ));
        }
        for ((_, (_, acc)), (_, (_, add))) in self.sum.iter_mut().zip(&other.sum) {
            for (a, b) in acc.iter_mut().zip(add) {
                *a += b;
            }
        }
        self.total_weight += other.total_weight;
        self.count += other.count;
        Ok(())
    }

    /// The weighted mean Σ wᵢ·Δᵢ / Σ wᵢ.
    pub fn finish(&self) -> Result<Weights, AggregateError> {
        if self.count == 0 || self.total_weight <= 0.0 {
            return Err(AggregateError::Empty);
        }
        Ok(self
            .sum
            .iter()
            .map(|(k, (shape, acc))| {
                let data = acc.iter().map(|a| (a / self.total_weight) as f32).collect();
                (k.clone(), Tensor::new(shape.clone(), data))
            })
            .collect())
    }

    /// Compact little-endian encoding (what the store keeps per open round).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n: usize = self
            .sum
            .values()
            .map(|(s, d)| 8 + s.len() * 8 + d.len() * 8)
            .sum();
        let mut b = Vec::with_capacity(MAGIC.len() + 16 + n);
        b.put_bytes(MAGIC);
        b.put_f64(self.total_weight);
        b.put_u32(self.count);
        b.put_u32(self.sum.len() as u32);
        for (name, (shape, data)) in &self.sum {
            b.put_state_header(name, shape);
            b.put_u64(data.len() as u64);
            for &v in data {
                b.put_f64(v);
            }
        }
        b
    }

    /// Inverse of [`Aggregate::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Aggregate, AggregateError> {
        let mut r = Reader::new(bytes);
        r.expect(MAGIC, "an aggregate")?;
        let total_weight = r.f64()?;
        let count = r.u32()?;
        let sum = read_tensors(&mut r, 8, Reader::f64s)?
            .into_iter()
            .map(|(name, shape, data)| (name, (shape, data)))
            .collect();
        r.finish()?;
        Ok(Aggregate {
            total_weight,
            count,
            sum,
        })
    }
}

impl From<DecodeError> for AggregateError {
    fn from(e: DecodeError) -> Self {
        AggregateError::Encoding(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_that_does_not_match_its_values_is_refused_not_a_panic() {
        // Found by the `state_files` fuzz target (its crash input without the selector
        // byte): a 0-dimensional tensor (1 value) stored with 0 values panicked in
        // `Tensor::new`.
        let input: &[u8] = &[
            0x48, 0x57, 0x54, 0x53, 0x31, 0x01, 0x00, 0x00, 0x00, 0x58, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x41, 0x00, 0x00, 0x02, 0x00, 0x00, 0x31, 0x47,
            0xff, 0xff, 0xff, 0xf7, 0xff, 0xff, 0x31,
        ];
        let e = weights_from_bytes(input).unwrap_err().to_string();
        assert!(e.contains("does not hold"), "{e}");
    }

    fn w(a: &[f32], b: &[f32]) -> Weights {
        let mut m = Weights::new();
        m.insert("fc1.weight".into(), Tensor::new(vec![2, 2], a.to_vec()));
        m.insert("fc1.bias".into(), Tensor::new(vec![2], b.to_vec()));
        m
    }

    #[test]
    fn weighted_mean_matches_hand_computation() {
        let g = w(&[0.0; 4], &[0.0; 2]);
        let mut agg = Aggregate::new(&g);
        assert_eq!(agg.finish(), Err(AggregateError::Empty));
        agg.fold(&w(&[1.0, 2.0, 3.0, 4.0], &[1.0, -1.0]), 1.0)
            .unwrap();
        agg.fold(&w(&[3.0, 2.0, 1.0, 0.0], &[-1.0, 1.0]), 3.0)
            .unwrap();
        let m = agg.finish().unwrap();
        assert_eq!(m["fc1.weight"].data, vec![2.5, 2.0, 1.5, 1.0]);
        assert_eq!(m["fc1.bias"].data, vec![-0.5, 0.5]);
        assert_eq!(agg.count(), 2);
        assert_eq!(agg.total_weight(), 4.0);
        let back = Aggregate::from_bytes(&agg.to_bytes()).unwrap();
        assert_eq!(back, agg);
        let bytes = agg.to_bytes();
        assert!(Aggregate::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Aggregate::from_bytes(b"nope").is_err());
        assert!(agg.fold(&w(&[1.0; 4], &[1.0; 2]), 0.0).is_err());
    }

    #[test]
    fn clipping_scales_down_to_the_bound_only_above_it() {
        let mut u = w(&[3.0, 0.0, 0.0, 0.0], &[4.0, 0.0]);
        assert!(!clip_update(&mut u, 5.0, 5.0));
        assert!(!clip_update(&mut u, 5.0, 0.0));
        assert_eq!(u["fc1.bias"].data, vec![4.0, 0.0]);
        assert!(clip_update(&mut u, 5.0, 1.0));
        assert!((u["fc1.weight"].data[0] - 0.6).abs() < 1e-6);
        assert!((u["fc1.bias"].data[0] - 0.8).abs() < 1e-6);
        let g = w(&[0.0; 4], &[0.0; 2]);
        assert!((validate_update(&u, &g, 5.0).unwrap() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn weights_round_trip_through_bytes() {
        let u = w(&[1.5, -2.0, 0.25, 3.0], &[-1.0, 7.0]);
        let b = weights_to_bytes(&u);
        assert_eq!(weights_from_bytes(&b).unwrap(), u);
        assert!(weights_from_bytes(&b[..b.len() - 1]).is_err());
        assert!(weights_from_bytes(b"HWTS1\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn validation_refuses_bad_updates() {
        let g = w(&[0.0; 4], &[0.0; 2]);
        assert!(
            (validate_update(&w(&[3.0, 0.0, 0.0, 0.0], &[4.0, 0.0]), &g, 5.0).unwrap() - 5.0).abs()
                < 1e-9
        );
        assert!(matches!(
            validate_update(&w(&[3.0, 0.0, 0.0, 0.0], &[4.0, 0.1]), &g, 5.0),
            Err(AggregateError::Norm { .. })
        ));
        assert!(matches!(
            validate_update(&w(&[f32::NAN, 0.0, 0.0, 0.0], &[0.0, 0.0]), &g, 5.0),
            Err(AggregateError::NonFinite(_))
        ));
        let mut wrong = w(&[0.0; 4], &[0.0; 2]);
        wrong.insert("fc1.bias".into(), Tensor::new(vec![3], vec![0.0; 3]));
        assert!(matches!(
            validate_update(&wrong, &g, 5.0),
            Err(AggregateError::Shape { .. })
        ));
        let mut renamed = w(&[0.0; 4], &[0.0; 2]);
        let t = renamed.remove("fc1.bias").unwrap();
        renamed.insert("fc2.bias".into(), t);
        assert!(matches!(
            validate_update(&renamed, &g, 5.0),
            Err(AggregateError::Names(_))
        ));
    }
}
