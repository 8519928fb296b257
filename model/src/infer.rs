//! Inference with tract: the plans are optimised once when a [`Classifier`] is built and
//! reused for every call (one plan fixed to batch 1 for per-event `predict`, one with a
//! symbolic batch for `predict_batch`).

use crate::data::Dataset;
use crate::error::ModelError;
use crate::onnx::OnnxModel;
use std::sync::Arc;
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

/// A loaded, optimised classifier. `Send + Sync`: share it behind an `Arc`.
#[derive(Clone)]
pub struct Classifier {
    single: Plan,
    batch: Plan,
    classes: Vec<String>,
    input_len: usize,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("classes", &self.classes)
            .field("input_len", &self.input_len)
            .finish_non_exhaustive()
    }
}

impl Classifier {
    /// Loads the model into tract and optimises a batch-1 plan and a batch-N plan.
    pub fn new(model: &OnnxModel) -> Result<Classifier, ModelError> {
        let input_len = model.input_len();
        if input_len == 0 {
            return Err(ModelError::Onnx("cannot determine the input length".into()));
        }
        let inference = tract_onnx::onnx()
            .model_for_proto_model(model.proto())
            .map_err(ModelError::tract)?;
        let single = inference
            .clone()
            .with_input_fact(0, f32::fact([1, input_len]).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::tract)?;
        let batch_sym = inference.sym("N");
        let batch = inference
            .with_input_fact(
                0,
                f32::fact([TDim::from(batch_sym), TDim::from(input_len as i64)]).into(),
            )
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::tract)?;
        let mut classes = model.classes();
        // Probe once: checks the plan runs and learns the output width.
        let probe = run(&single, &vec![0.0; input_len], 1, input_len)?;
        if classes.len() != probe.len() {
            if model
                .proto()
                .metadata_props
                .iter()
                .any(|e| e.key == crate::onnx::META_CLASSES)
            {
                return Err(ModelError::Onnx(format!(
                    "{} classes in metadata, model outputs {}",
                    classes.len(),
                    probe.len()
                )));
            }
            classes = (0..probe.len()).map(|i| format!("class_{i}")).collect();
        }
        Ok(Classifier {
            single,
            batch,
            classes,
            input_len,
        })
    }

    /// Class probabilities for one preprocessed input.
    pub fn predict(&self, input: &[f32]) -> Result<Vec<f32>, ModelError> {
        if input.len() != self.input_len {
            return Err(ModelError::Shape(format!(
                "input has {} values, model expects {}",
                input.len(),
                self.input_len
            )));
        }
        run(&self.single, input, 1, self.input_len)
    }

    /// Class probabilities for `n` inputs laid out row-major in `x` (`n * classes` values).
    pub fn predict_batch(&self, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        if x.len() != n * self.input_len {
            return Err(ModelError::Shape(format!(
                "{} values for {n} inputs of {}",
                x.len(),
                self.input_len
            )));
        }
        match n {
            0 => Ok(Vec::new()),
            1 => run(&self.single, x, 1, self.input_len),
            _ => run(&self.batch, x, n, self.input_len),
        }
    }

    /// Class labels by output index.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Input vector length.
    pub fn input_len(&self) -> usize {
        self.input_len
    }
}

fn run(plan: &Plan, x: &[f32], n: usize, input_len: usize) -> Result<Vec<f32>, ModelError> {
    let input =
        tract_onnx::prelude::Tensor::from_shape(&[n, input_len], x).map_err(ModelError::tract)?;
    let out = plan.run(tvec!(input.into())).map_err(ModelError::tract)?;
    let first = out
        .first()
        .ok_or_else(|| ModelError::Tract("model has no output".into()))?;
    let view = first.try_as_plain_ram().map_err(ModelError::tract)?;
    Ok(view.as_slice::<f32>().map_err(ModelError::tract)?.to_vec())
}

/// Index of the largest value (first on ties); `None` for an empty slice.
pub fn argmax(p: &[f32]) -> Option<usize> {
    p.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// Share of samples whose most probable class is the label (0 for an empty set).
pub fn accuracy(c: &Classifier, ds: &Dataset) -> Result<f32, ModelError> {
    if ds.is_empty() {
        return Ok(0.0);
    }
    const CHUNK: usize = 256;
    let k = c.classes().len();
    let mut correct = 0usize;
    let mut start = 0;
    while start < ds.len() {
        let end = (start + CHUNK).min(ds.len());
        let probs =
            c.predict_batch(&ds.x[start * ds.input_len..end * ds.input_len], end - start)?;
        for (row, &y) in probs.chunks(k.max(1)).zip(&ds.y[start..end]) {
            if argmax(row) == Some(y as usize) {
                correct += 1;
            }
        }
        start = end;
    }
    Ok(correct as f32 / ds.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Task;

    #[test]
    fn classifier_is_send_sync_and_runs() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Classifier>();
        let model = OnnxModel::build_mlp(&Task::Digits.default_spec(), 5);
        let c = Classifier::new(&model).unwrap();
        assert_eq!(c.classes().len(), 10);
        let x: Vec<f32> = (0..64).map(|i| (i % 17) as f32 / 16.0).collect();
        let p = c.predict(&x).unwrap();
        assert_eq!(p.len(), 10);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let mut xs = x.clone();
        xs.extend(x.iter().map(|v| 1.0 - v));
        xs.extend(&x);
        let pb = c.predict_batch(&xs, 3).unwrap();
        assert_eq!(pb.len(), 30);
        for (a, b) in p.iter().zip(&pb[..10]) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(&pb[..10], &pb[20..]);
        assert!(c.predict(&x[..10]).is_err());
        assert!(c.predict_batch(&xs, 2).is_err());
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), Some(1));
    }
}
