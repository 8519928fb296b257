//! On-device training of the sequential Gemm/Relu models Hearth ships.
//!
//! # Why a hand-written trainer
//! tract is inference-only, so training needs its own engine. The lead chose a hand-written
//! reverse-mode trainer over the sequential graph (Gemm with `transB` + Relu layers, softmax
//! cross-entropy), with matrix products from the ndarray that tract already re-exports
//! (`tract_onnx::prelude::tract_ndarray`), rather than candle: candle adds about 130 crates to
//! a 2-core build, and the families Hearth ships need explicit control over the backward pass
//! for what comes next (pruning masks, straight-through estimators for quantization-aware
//! fine-tuning, distillation losses), which is simplest when the few backward rules are ours.
//!
//! # The ONNX file is the single source of truth
//! The trainer reads the layer structure and the initializers from the ONNX graph by name
//! ([`OnnxModel::dense_layers`]) and returns the new weights by initializer name; nothing about
//! the architecture is duplicated in Rust.
//!
//! # Algorithm
//! Mini-batch SGD with (heavy-ball) momentum, `v = μ·v + g; w -= lr·v`, on the mean softmax
//! cross-entropy of each batch. The sample order is shuffled every epoch from `seed`, so a run
//! is deterministic.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::onnx::{DenseLayer, OnnxModel};
use crate::tensor::{Tensor, Weights};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tract_onnx::prelude::tract_ndarray::{Array1, Array2, ArrayView2, Axis};

/// Hyper-parameters of [`train`].
///
/// The default (20 epochs, lr 0.01, batch 32, momentum 0.9) trains all three shipped MLPs
/// well (`examples/train_eval.rs`); a learning rate of 0.05 works for the image tasks but
/// diverges on PLAID's log-spectrum inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: u32,
    /// SGD step size.
    pub learning_rate: f32,
    /// Samples per mini-batch.
    pub batch_size: usize,
    /// Momentum coefficient μ (0 = plain SGD).
    pub momentum: f32,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            learning_rate: 0.01,
            batch_size: 32,
            momentum: 0.9,
            seed: 0,
        }
    }
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Epochs run.
    pub epochs: u32,
    /// Samples seen per epoch.
    pub samples: usize,
    /// Mean cross-entropy over the last epoch's batches.
    pub final_loss: f32,
}

/// One layer's parameters, weight always held `[out, in]`.
struct Param {
    spec: DenseLayer,
    w: Array2<f32>,
    b: Array1<f32>,
}

/// The sequential network read from an ONNX model.
struct Net {
    layers: Vec<Param>,
}

/// Gradients of one layer.
struct Grad {
    w: Array2<f32>,
    b: Array1<f32>,
}

impl Net {
    fn from_model(model: &OnnxModel) -> Result<Net, ModelError> {
        let specs = model.dense_layers()?;
        let weights = model.weights();
        let layers = specs
            .into_iter()
            .map(|spec| {
                let wt = &weights[&spec.weight];
                let stored = Array2::from_shape_vec((wt.shape[0], wt.shape[1]), wt.data.clone())
                    .map_err(|e| ModelError::Shape(e.to_string()))?;
                let w = if spec.trans_b {
                    stored
                } else {
                    stored.t().to_owned()
                };
                let b = match &spec.bias {
                    Some(name) => Array1::from(weights[name].data.clone()),
                    None => Array1::zeros(spec.outputs),
                };
                Ok(Param { spec, w, b })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Net { layers })
    }

    fn input_len(&self) -> usize {
        self.layers[0].spec.inputs
    }

    fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.spec.outputs)
    }

    /// Forward pass; returns every layer's output (after Relu where there is one), the last
    /// being the logits. `acts[0]` is the input.
    fn forward(&self, x: ArrayView2<f32>) -> Vec<Array2<f32>> {
        let mut acts = vec![x.to_owned()];
        for p in &self.layers {
            let mut z = acts.last().expect("non-empty").dot(&p.w.t());
            z += &p.b;
            if p.spec.relu {
                z.mapv_inplace(|v| v.max(0.0));
            }
            acts.push(z);
        }
        acts
    }

    /// Mean softmax cross-entropy of the batch and the gradients of every layer.
    fn loss_and_grads(&self, x: ArrayView2<f32>, y: &[u32]) -> (f32, Vec<Grad>) {
        let n = x.nrows() as f32;
        let acts = self.forward(x);
        let (loss, mut delta) = softmax_xent(acts.last().expect("logits"), y);
        delta.mapv_inplace(|v| v / n);
        let mut grads: Vec<Grad> = Vec::with_capacity(self.layers.len());
        for (l, p) in self.layers.iter().enumerate().rev() {
            let input = &acts[l];
            grads.push(Grad {
                w: delta.t().dot(input),
                b: delta.sum_axis(Axis(0)),
            });
            if l > 0 {
                let mut d = delta.dot(&p.w);
                // acts[l] is the Relu output of layer l-1: the derivative is 1 where it is > 0.
                if self.layers[l - 1].spec.relu {
                    d.zip_mut_with(input, |g, &a| {
                        if a <= 0.0 {
                            *g = 0.0
                        }
                    });
                }
                delta = d;
            }
        }
        grads.reverse();
        (loss / n, grads)
    }

    fn weights(&self) -> Weights {
        let mut out = Weights::new();
        for p in &self.layers {
            let (w, shape) = if p.spec.trans_b {
                (
                    p.w.iter().copied().collect::<Vec<_>>(),
                    vec![p.spec.outputs, p.spec.inputs],
                )
            } else {
                (
                    p.w.t().iter().copied().collect(),
                    vec![p.spec.inputs, p.spec.outputs],
                )
            };
            out.insert(p.spec.weight.clone(), Tensor::new(shape, w));
            if let Some(b) = &p.spec.bias {
                out.insert(b.clone(), Tensor::new(vec![p.spec.outputs], p.b.to_vec()));
            }
        }
        out
    }

    fn grads_to_weights(&self, grads: &[Grad]) -> Weights {
        let mut out = Weights::new();
        for (p, g) in self.layers.iter().zip(grads) {
            let (w, shape) = if p.spec.trans_b {
                (
                    g.w.iter().copied().collect::<Vec<_>>(),
                    vec![p.spec.outputs, p.spec.inputs],
                )
            } else {
                (
                    g.w.t().iter().copied().collect(),
                    vec![p.spec.inputs, p.spec.outputs],
                )
            };
            out.insert(p.spec.weight.clone(), Tensor::new(shape, w));
            if let Some(b) = &p.spec.bias {
                out.insert(b.clone(), Tensor::new(vec![p.spec.outputs], g.b.to_vec()));
            }
        }
        out
    }
}

/// Sum over the batch of the cross-entropy, and `softmax - onehot` per row.
fn softmax_xent(logits: &Array2<f32>, y: &[u32]) -> (f32, Array2<f32>) {
    let mut probs = logits.clone();
    let mut loss = 0.0f64;
    for (mut row, &label) in probs.rows_mut().into_iter().zip(y) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
        let p = row[label as usize].max(1e-30);
        loss -= f64::from(p.ln());
        row[label as usize] -= 1.0;
    }
    (loss as f32, probs)
}

fn check_data(net: &Net, x: &[f32], y: &[u32]) -> Result<(), ModelError> {
    let k = net.input_len();
    if x.len() != y.len() * k {
        return Err(ModelError::Shape(format!(
            "{} values for {} samples of {k} inputs",
            x.len(),
            y.len()
        )));
    }
    if let Some(&bad) = y.iter().find(|&&c| c as usize >= net.classes()) {
        return Err(ModelError::Data(format!(
            "label {bad} but the model has {} classes",
            net.classes()
        )));
    }
    Ok(())
}

/// Mean softmax cross-entropy of `model` on `n` samples and its gradient with respect to
/// every trainable initializer (by name, in the initializer's own layout).
pub fn gradients(model: &OnnxModel, x: &[f32], y: &[u32]) -> Result<(f32, Weights), ModelError> {
    let net = Net::from_model(model)?;
    check_data(&net, x, y)?;
    if y.is_empty() {
        return Err(ModelError::Data("no samples".into()));
    }
    let xv = ArrayView2::from_shape((y.len(), net.input_len()), x)
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let (loss, grads) = net.loss_and_grads(xv, y);
    Ok((loss, net.grads_to_weights(&grads)))
}

/// The trainer's own forward pass: softmax probabilities for `n` samples (`n * classes`).
/// Used to check tract against the trainer.
pub fn forward_probs(model: &OnnxModel, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    let net = Net::from_model(model)?;
    let xv = ArrayView2::from_shape((n, net.input_len()), x)
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let mut logits = net.forward(xv).pop().expect("logits");
    for mut row in logits.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    Ok(logits.iter().copied().collect())
}

/// Trains `model`'s Gemm layers on `data`; returns the new weights by initializer name (the
/// model itself is not modified: apply them with [`OnnxModel::set_weights`]).
pub fn train(
    model: &OnnxModel,
    data: &Dataset,
    cfg: &TrainConfig,
) -> Result<(Weights, TrainReport), ModelError> {
    let mut net = Net::from_model(model)?;
    if data.input_len != net.input_len() {
        return Err(ModelError::Shape(format!(
            "data has {} inputs, model expects {}",
            data.input_len,
            net.input_len()
        )));
    }
    check_data(&net, &data.x, &data.y)?;
    if data.is_empty() {
        return Err(ModelError::Data("cannot train on an empty data set".into()));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0 && cfg.momentum.is_finite()) {
        return Err(ModelError::Data(
            "learning rate must be > 0 and momentum finite".into(),
        ));
    }
    let batch = cfg.batch_size.clamp(1, data.len());
    let k = net.input_len();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut vel: Vec<Grad> = net
        .layers
        .iter()
        .map(|p| Grad {
            w: Array2::zeros(p.w.raw_dim()),
            b: Array1::zeros(p.b.len()),
        })
        .collect();
    let (lr, mu) = (cfg.learning_rate, cfg.momentum);
    let mut final_loss = f32::NAN;
    let mut xb: Vec<f32> = Vec::with_capacity(batch * k);
    let mut yb: Vec<u32> = Vec::with_capacity(batch);
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut batches) = (0.0f64, 0usize);
        for chunk in order.chunks(batch) {
            xb.clear();
            yb.clear();
            for &i in chunk {
                xb.extend_from_slice(data.sample(i));
                yb.push(data.y[i]);
            }
            let xv = ArrayView2::from_shape((chunk.len(), k), &xb[..])
                .map_err(|e| ModelError::Shape(e.to_string()))?;
            let (loss, grads) = net.loss_and_grads(xv, &yb);
            if !loss.is_finite() {
                return Err(ModelError::Data(format!(
                    "training diverged (loss {loss}); lower the learning rate"
                )));
            }
            loss_sum += f64::from(loss);
            batches += 1;
            for ((p, g), v) in net.layers.iter_mut().zip(&grads).zip(vel.iter_mut()) {
                v.w.zip_mut_with(&g.w, |v, &g| *v = mu * *v + g);
                v.b.zip_mut_with(&g.b, |v, &g| *v = mu * *v + g);
                p.w.scaled_add(-lr, &v.w);
                p.b.scaled_add(-lr, &v.b);
            }
        }
        final_loss = (loss_sum / batches.max(1) as f64) as f32;
    }
    let report = TrainReport {
        epochs: cfg.epochs,
        samples: data.len(),
        final_loss,
    };
    Ok((net.weights(), report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Task;
    use crate::onnx::MlpSpec;
    use rand::Rng;

    fn tiny_model(seed: u64) -> OnnxModel {
        let spec = MlpSpec {
            task: Task::Digits,
            input_len: 5,
            hidden: vec![7, 6],
            classes: (0..4).map(|i| format!("digit_{i}")).collect(),
        };
        let mut m = OnnxModel::build_mlp(&spec, seed);
        // Non-zero biases so their gradients are exercised away from the init point.
        let mut w = m.weights();
        let mut rng = StdRng::seed_from_u64(seed + 100);
        for t in w.values_mut() {
            if t.shape.len() == 1 {
                t.data
                    .iter_mut()
                    .for_each(|v| *v = rng.gen_range(-0.3..0.3));
            }
        }
        m.set_weights(&w).unwrap();
        m
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let model = tiny_model(11);
        let mut rng = StdRng::seed_from_u64(5);
        let n = 9;
        let x: Vec<f32> = (0..n * 5).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..4)).collect();
        let (_, grads) = gradients(&model, &x, &y).unwrap();
        let base = model.weights();
        let loss_at = |w: &Weights| -> f64 {
            let mut m = model.clone();
            m.set_weights(w).unwrap();
            // Loss in f64 from the f32 probabilities, per sample.
            let p = forward_probs(&m, &x, n).unwrap();
            y.iter()
                .enumerate()
                .map(|(i, &c)| -f64::from(p[i * 4 + c as usize]).ln())
                .sum::<f64>()
                / n as f64
        };
        let eps = 1e-3f32;
        let mut checked = 0;
        for (name, t) in &base {
            for i in (0..t.len()).step_by(3) {
                let mut plus = base.clone();
                plus.get_mut(name).unwrap().data[i] += eps;
                let mut minus = base.clone();
                minus.get_mut(name).unwrap().data[i] -= eps;
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * f64::from(eps));
                let analytic = f64::from(grads[name].data[i]);
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                    "{name}[{i}]: numeric {numeric} vs analytic {analytic}"
                );
                checked += 1;
            }
        }
        assert!(checked > 30);
    }

    #[test]
    fn training_fits_a_separable_problem_deterministically() {
        let spec = MlpSpec {
            task: Task::Faces,
            input_len: 2,
            hidden: vec![8],
            classes: vec!["none".into(), "person".into()],
        };
        let model = OnnxModel::build_mlp(&spec, 1);
        let mut rng = StdRng::seed_from_u64(2);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..200 {
            let (a, b): (f32, f32) = (rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0));
            x.extend([a, b]);
            y.push(u32::from(a * b > 0.0));
        }
        let ds = Dataset {
            task: Task::Faces,
            classes: spec.classes.clone(),
            input_len: 2,
            x,
            y,
        };
        let cfg = TrainConfig {
            epochs: 60,
            learning_rate: 0.1,
            batch_size: 16,
            momentum: 0.9,
            seed: 3,
        };
        let (w, report) = train(&model, &ds, &cfg).unwrap();
        assert_eq!(report.samples, 200);
        assert!(report.final_loss < 0.3, "loss {}", report.final_loss);
        let (w2, _) = train(&model, &ds, &cfg).unwrap();
        assert_eq!(w, w2, "same seed, same weights");
        let mut trained = model.clone();
        trained.set_weights(&w).unwrap();
        let p = forward_probs(&trained, &ds.x, ds.len()).unwrap();
        let correct = (0..ds.len())
            .filter(|&i| (p[2 * i + 1] > 0.5) == (ds.y[i] == 1))
            .count();
        assert!(correct as f32 / ds.len() as f32 > 0.9, "{correct}/200");
        // Errors rather than panics on bad input.
        let mut bad = ds.clone();
        bad.y[0] = 7;
        assert!(train(&model, &bad, &cfg).is_err());
    }
}
