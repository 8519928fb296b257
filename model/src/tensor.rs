//! Dense f32 tensors and named weight maps (keyed by ONNX initializer name).

use crate::error::ModelError;
use std::collections::BTreeMap;

/// A dense, row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` equals the product of `shape`.
    pub data: Vec<f32>,
}

/// Model weights by ONNX initializer name.
pub type Weights = BTreeMap<String, Tensor>;

impl Tensor {
    /// A tensor from a shape and its row-major values.
    ///
    /// # Panics
    /// If `data.len()` is not the product of `shape` (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        let n: usize = shape.iter().product();
        assert_eq!(
            n,
            data.len(),
            "tensor shape {shape:?} does not match {} values",
            data.len()
        );
        Tensor { shape, data }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Euclidean norm over every value of every tensor.
pub fn l2_norm(w: &Weights) -> f32 {
    w.values()
        .flat_map(|t| t.data.iter())
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt() as f32
}

fn check_same(a: &Weights, b: &Weights) -> Result<(), ModelError> {
    if a.len() != b.len() {
        return Err(ModelError::Shape(format!(
            "{} tensors vs {}",
            a.len(),
            b.len()
        )));
    }
    for (name, ta) in a {
        let tb = b
            .get(name)
            .ok_or_else(|| ModelError::Shape(format!("missing tensor {name}")))?;
        if ta.shape != tb.shape {
            return Err(ModelError::Shape(format!(
                "tensor {name}: shape {:?} vs {:?}",
                ta.shape, tb.shape
            )));
        }
    }
    Ok(())
}

/// `a - b`, tensor by tensor; names and shapes must match.
pub fn sub(a: &Weights, b: &Weights) -> Result<Weights, ModelError> {
    check_same(a, b)?;
    Ok(a.iter()
        .map(|(name, ta)| {
            let tb = &b[name];
            let data = ta.data.iter().zip(&tb.data).map(|(x, y)| x - y).collect();
            (
                name.clone(),
                Tensor {
                    shape: ta.shape.clone(),
                    data,
                },
            )
        })
        .collect())
}

/// `y += alpha * x`, tensor by tensor; names and shapes must match.
pub fn axpy(y: &mut Weights, alpha: f32, x: &Weights) -> Result<(), ModelError> {
    check_same(y, x)?;
    for (name, ty) in y.iter_mut() {
        for (a, b) in ty.data.iter_mut().zip(&x[name].data) {
            *a += alpha * b;
        }
    }
    Ok(())
}

/// Total number of scalar parameters.
pub fn num_params(w: &Weights) -> usize {
    w.values().map(Tensor::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(vals: &[(&str, Vec<usize>, Vec<f32>)]) -> Weights {
        vals.iter()
            .map(|(n, s, d)| (n.to_string(), Tensor::new(s.clone(), d.clone())))
            .collect()
    }

    #[test]
    fn arithmetic() {
        let a = w(&[("a", vec![2], vec![3.0, 4.0]), ("b", vec![1], vec![1.0])]);
        let b = w(&[("a", vec![2], vec![1.0, 1.0]), ("b", vec![1], vec![1.0])]);
        let d = sub(&a, &b).unwrap();
        assert_eq!(d["a"].data, vec![2.0, 3.0]);
        assert_eq!(d["b"].data, vec![0.0]);
        assert!((l2_norm(&a) - 26f32.sqrt()).abs() < 1e-6);
        assert_eq!(num_params(&a), 3);
        let mut y = b.clone();
        axpy(&mut y, 2.0, &d).unwrap();
        assert_eq!(y["a"].data, vec![5.0, 7.0]);
        let bad = w(&[("a", vec![1, 2], vec![1.0, 1.0]), ("b", vec![1], vec![1.0])]);
        assert!(sub(&a, &bad).is_err());
        let missing = w(&[("a", vec![2], vec![1.0, 1.0])]);
        assert!(axpy(&mut y, 1.0, &missing).is_err());
        assert_eq!(Tensor::zeros(&[2, 3]).len(), 6);
    }
}
