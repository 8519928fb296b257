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
//! the architecture is duplicated in Rust. Any sequential chain of Gemm layers (`transB` 0 or
//! 1, bias optional) with or without a Relu after each is accepted, so the two thin Gemms of
//! a low-rank factorisation (Gemm → Gemm, the first without bias) train like any other layer.
//!
//! # Algorithm
//! Mini-batch SGD with (heavy-ball) momentum, `v = μ·v + g; w -= lr·v`, on the mean loss of
//! each batch (μ = 0: plain SGD). The sample order is shuffled every epoch from `seed`, so a
//! run is deterministic.
//!
//! **FedProx** ([`TrainConfig::proximal_mu`], Li et al. 2020): the local objective gains
//! `mu/2·‖w − w₀‖²` over every trained value, w₀ being the weights training started from (the
//! global model of a federated round), so its gradient `mu·(w − w₀)` pulls the local model
//! back toward the global one and bounds client drift on non-IID data.
//!
//! The loss is the softmax cross-entropy, optionally extended by the compression toolkit:
//! - **L1** ([`TrainConfig::l1`]): `λ·Σ|w|` over the Gemm weights (not the biases); its
//!   subgradient `λ·sign(w)` (0 at 0) drives small weights towards zero before pruning.
//! - **Distillation** ([`TrainConfig::distill`]): `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) +
//!   (1−α)·CE(s, y)` with teacher logits `t` (Hinton et al.; the `T²` keeps the soft-target
//!   gradient on the scale of the hard one).
//! - **Masks** ([`TrainConfig::masks`]): pruned weights (mask 0) are set to exactly 0 before
//!   training, their gradients and momenta are zeroed, and they are re-zeroed after each step,
//!   so a pruned model is fine-tuned without regrowing connections.
//! - **Fake quantization** ([`TrainConfig::fake_quant`]): quantization-aware training with the
//!   straight-through estimator. Each step the forward (and backward) pass uses `fq(name, w)`
//!   for every Gemm weight; the gradient with respect to the quantized weight is applied
//!   unchanged to the float master weight, which is what [`train`] returns.

use crate::data::Dataset;
use crate::error::ModelError;
use crate::onnx::{DenseLayer, OnnxModel};
use crate::tensor::{Tensor, Weights};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::Arc;
use tract_onnx::prelude::tract_ndarray::{Array1, Array2, ArrayView2, Axis};

/// Quantization-aware training hook: maps a Gemm weight (initializer name, tensor in the
/// initializer's own layout) to its fake-quantized (quantize → dequantize) version of the
/// same shape. Return the input unchanged for weights that are not quantized.
pub type FakeQuant = Arc<dyn Fn(&str, &Tensor) -> Tensor + Send + Sync>;

/// Soft targets for knowledge distillation.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillTarget {
    /// Teacher logits, `n × classes`, in the same sample order as the training [`Dataset`].
    pub teacher_logits: Vec<f32>,
    /// Weight α of the soft (KL) term; `1 − α` weighs the cross-entropy on the labels.
    pub alpha: f32,
    /// Softmax temperature T (> 0) applied to teacher and student logits in the KL term.
    pub temperature: f32,
}

/// Hyper-parameters of [`train`].
///
/// The default (20 epochs, lr 0.01, batch 32, momentum 0.9, no L1, masks, fake quantization
/// or distillation) trains all three shipped MLPs well (`examples/train_eval.rs`); a learning
/// rate of 0.05 works for the image tasks but diverges on PLAID's log-spectrum inputs.
/// Construct with `TrainConfig { epochs: 5, ..Default::default() }`.
#[derive(Clone)]
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
    /// L1 penalty λ on the Gemm weights (not the biases); 0 = off.
    pub l1: f32,
    /// 0/1 per value, by initializer name (weights and/or biases, initializer layout);
    /// values with mask 0 are held at exactly 0. Names not listed are trained freely.
    pub masks: Option<Weights>,
    /// Quantization-aware training: the forward pass uses `fq(name, w)` for every Gemm
    /// weight, the gradient passes straight through to the float weight (STE).
    pub fake_quant: Option<FakeQuant>,
    /// Soft targets from a teacher (knowledge distillation).
    pub distill: Option<DistillTarget>,
    /// FedProx proximal coefficient mu: adds `mu/2·‖w − w₀‖²` (w₀ = the starting weights) to
    /// the loss; 0 = off.
    pub proximal_mu: f32,
    /// L2 weight decay λ on the Gemm weights (not the biases): the gradient gains `λ·w`;
    /// 0 = off. A task's model family sets it ([`crate::TaskSpec::weight_decay`]).
    pub weight_decay: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            learning_rate: 0.01,
            batch_size: 32,
            momentum: 0.9,
            seed: 0,
            l1: 0.0,
            masks: None,
            fake_quant: None,
            distill: None,
            proximal_mu: 0.0,
            weight_decay: 0.0,
        }
    }
}

impl std::fmt::Debug for TrainConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainConfig")
            .field("epochs", &self.epochs)
            .field("learning_rate", &self.learning_rate)
            .field("batch_size", &self.batch_size)
            .field("momentum", &self.momentum)
            .field("seed", &self.seed)
            .field("l1", &self.l1)
            .field(
                "masks",
                &self.masks.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field("fake_quant", &self.fake_quant.is_some())
            .field(
                "distill",
                &self.distill.as_ref().map(|d| (d.alpha, d.temperature)),
            )
            .field("proximal_mu", &self.proximal_mu)
            .field("weight_decay", &self.weight_decay)
            .finish()
    }
}

impl PartialEq for TrainConfig {
    /// Field-wise; two fake-quantization hooks are equal only when they are the same `Arc`.
    fn eq(&self, o: &Self) -> bool {
        self.epochs == o.epochs
            && self.learning_rate == o.learning_rate
            && self.batch_size == o.batch_size
            && self.momentum == o.momentum
            && self.seed == o.seed
            && self.l1 == o.l1
            && self.masks == o.masks
            && self.distill == o.distill
            && self.proximal_mu == o.proximal_mu
            && self.weight_decay == o.weight_decay
            && match (&self.fake_quant, &o.fake_quant) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
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
    /// Mean loss (cross-entropy, plus the distillation and L1 terms when enabled) over the
    /// last epoch's batches.
    pub final_loss: f32,
}

/// One layer's parameters, weight always held `[out, in]`.
struct Param {
    spec: DenseLayer,
    w: Array2<f32>,
    b: Array1<f32>,
    /// Mask of the weight (`[out, in]`), if any.
    wmask: Option<Array2<f32>>,
    /// Mask of the bias, if any.
    bmask: Option<Array1<f32>>,
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

/// The extra loss terms of one batch.
struct Objective<'a> {
    l1: f32,
    /// Teacher logits of the batch (`n × classes`), α, T.
    soft: Option<(ArrayView2<'a, f32>, f32, f32)>,
}

/// A stored initializer (`[out,in]` when `trans_b`, else `[in,out]`) as an `[out, in]` matrix.
fn to_internal(spec: &DenseLayer, t: &Tensor) -> Result<Array2<f32>, ModelError> {
    if t.shape.len() != 2 || t.data.len() != t.shape[0] * t.shape[1] {
        return Err(ModelError::Shape(format!(
            "{}: expected a 2-D tensor, got shape {:?}",
            spec.weight, t.shape
        )));
    }
    let stored = Array2::from_shape_vec((t.shape[0], t.shape[1]), t.data.clone())
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let w = if spec.trans_b {
        stored
    } else {
        stored.t().to_owned()
    };
    if w.dim() != (spec.outputs, spec.inputs) {
        return Err(ModelError::Shape(format!(
            "{}: shape {:?} does not match the layer {}x{}",
            spec.weight, t.shape, spec.outputs, spec.inputs
        )));
    }
    Ok(w)
}

/// An `[out, in]` matrix in the initializer's own layout.
fn to_stored(spec: &DenseLayer, w: &Array2<f32>) -> Tensor {
    if spec.trans_b {
        Tensor::new(vec![spec.outputs, spec.inputs], w.iter().copied().collect())
    } else {
        Tensor::new(
            vec![spec.inputs, spec.outputs],
            w.t().iter().copied().collect(),
        )
    }
}

/// Sets the masked entries to exactly 0 (not -0 or a product).
fn zero_masked<D: tract_onnx::prelude::tract_ndarray::Dimension>(
    a: &mut tract_onnx::prelude::tract_ndarray::Array<f32, D>,
    m: &tract_onnx::prelude::tract_ndarray::Array<f32, D>,
) {
    a.zip_mut_with(m, |v, &k| {
        if k == 0.0 {
            *v = 0.0
        }
    });
}

impl Net {
    fn from_model(model: &OnnxModel) -> Result<Net, ModelError> {
        let specs = model.dense_layers()?;
        let weights = model.weights();
        let layers = specs
            .into_iter()
            .map(|spec| {
                let w = to_internal(&spec, &weights[&spec.weight])?;
                let b = match &spec.bias {
                    Some(name) => Array1::from(weights[name].data.clone()),
                    None => Array1::zeros(spec.outputs),
                };
                Ok(Param {
                    spec,
                    w,
                    b,
                    wmask: None,
                    bmask: None,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Net { layers })
    }

    /// Installs `masks` (by initializer name) and zeroes the masked values.
    fn set_masks(&mut self, masks: &Weights) -> Result<(), ModelError> {
        let mut used = 0;
        for p in &mut self.layers {
            if let Some(m) = masks.get(&p.spec.weight) {
                let m = to_internal(&p.spec, m)?;
                zero_masked(&mut p.w, &m);
                p.wmask = Some(m);
                used += 1;
            }
            if let Some(bname) = &p.spec.bias {
                if let Some(m) = masks.get(bname) {
                    if m.data.len() != p.spec.outputs {
                        return Err(ModelError::Shape(format!(
                            "mask {bname}: {} values for {} biases",
                            m.data.len(),
                            p.spec.outputs
                        )));
                    }
                    let m = Array1::from(m.data.clone());
                    zero_masked(&mut p.b, &m);
                    p.bmask = Some(m);
                    used += 1;
                }
            }
        }
        if used != masks.len() {
            return Err(ModelError::Shape(
                "a mask names a tensor that is not a Gemm weight or bias of the model".into(),
            ));
        }
        Ok(())
    }

    fn input_len(&self) -> usize {
        self.layers[0].spec.inputs
    }

    fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.spec.outputs)
    }

    /// The weights the forward pass uses: `fq(name, w)` per layer under fake quantization.
    fn effective(&self, fq: Option<&FakeQuant>) -> Result<Option<Vec<Array2<f32>>>, ModelError> {
        let Some(fq) = fq else { return Ok(None) };
        self.layers
            .iter()
            .map(|p| {
                let stored = to_stored(&p.spec, &p.w);
                let q = fq(&p.spec.weight, &stored);
                if q.shape != stored.shape {
                    return Err(ModelError::Shape(format!(
                        "fake quantization of {} changed its shape {:?} to {:?}",
                        p.spec.weight, stored.shape, q.shape
                    )));
                }
                to_internal(&p.spec, &q)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Forward pass; returns every layer's output (after Relu where there is one), the last
    /// being the logits. `acts[0]` is the input. `eff` replaces the weights (fake quantization).
    fn forward(&self, x: ArrayView2<f32>, eff: Option<&[Array2<f32>]>) -> Vec<Array2<f32>> {
        let mut acts = vec![x.to_owned()];
        for (l, p) in self.layers.iter().enumerate() {
            let w = eff.map_or(&p.w, |e| &e[l]);
            let mut z = acts.last().expect("non-empty").dot(&w.t());
            if p.spec.bias.is_some() {
                z += &p.b;
            }
            if p.spec.relu {
                z.mapv_inplace(|v| v.max(0.0));
            }
            acts.push(z);
        }
        acts
    }

    /// Mean loss of the batch (with the extra terms of `obj`) and the gradients of every
    /// layer (masked entries zeroed). Under fake quantization `eff` holds the quantized
    /// weights used forward and backward; the gradients are those of the quantized weights,
    /// applied to the float ones (straight-through estimator).
    fn loss_and_grads(
        &self,
        x: ArrayView2<f32>,
        y: &[u32],
        obj: &Objective,
        eff: Option<&[Array2<f32>]>,
    ) -> (f32, Vec<Grad>) {
        let n = x.nrows() as f32;
        let acts = self.forward(x, eff);
        let logits = acts.last().expect("logits");
        let (ce, mut delta) = softmax_xent(logits, y);
        let mut loss = ce;
        if let Some((teacher, alpha, t)) = &obj.soft {
            let (kl, soft) = soft_kl(logits, teacher, *t);
            loss = alpha * t * t * kl + (1.0 - alpha) * ce;
            // d/ds [α·T²·KL] = α·T·(softmax(s/T) − softmax(t/T)).
            delta.zip_mut_with(&soft, |d, &s| *d = (1.0 - alpha) * *d + alpha * t * s);
        }
        loss /= n;
        delta.mapv_inplace(|v| v / n);
        let mut grads: Vec<Grad> = Vec::with_capacity(self.layers.len());
        for (l, p) in self.layers.iter().enumerate().rev() {
            let input = &acts[l];
            grads.push(Grad {
                w: delta.t().dot(input),
                b: delta.sum_axis(Axis(0)),
            });
            if l > 0 {
                let w = eff.map_or(&p.w, |e| &e[l]);
                let mut d = delta.dot(w);
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
        if obj.l1 != 0.0 {
            let mut pen = 0.0f64;
            for (p, g) in self.layers.iter().zip(grads.iter_mut()) {
                pen += p.w.iter().map(|&v| f64::from(v.abs())).sum::<f64>();
                g.w.zip_mut_with(&p.w, |g, &w| {
                    if w != 0.0 {
                        *g += obj.l1 * w.signum()
                    }
                });
            }
            loss += obj.l1 * pen as f32;
        }
        for (p, g) in self.layers.iter().zip(grads.iter_mut()) {
            if let Some(m) = &p.wmask {
                zero_masked(&mut g.w, m);
            }
            if let Some(m) = &p.bmask {
                zero_masked(&mut g.b, m);
            }
        }
        (loss, grads)
    }

    fn weights(&self) -> Weights {
        let mut out = Weights::new();
        for p in &self.layers {
            out.insert(p.spec.weight.clone(), to_stored(&p.spec, &p.w));
            if let Some(b) = &p.spec.bias {
                out.insert(b.clone(), Tensor::new(vec![p.spec.outputs], p.b.to_vec()));
            }
        }
        out
    }

    fn grads_to_weights(&self, grads: &[Grad]) -> Weights {
        let mut out = Weights::new();
        for (p, g) in self.layers.iter().zip(grads) {
            out.insert(p.spec.weight.clone(), to_stored(&p.spec, &g.w));
            if let Some(b) = &p.spec.bias {
                out.insert(b.clone(), Tensor::new(vec![p.spec.outputs], g.b.to_vec()));
            }
        }
        out
    }
}

/// Row-wise softmax of `logits / t`.
fn softmax_rows(logits: &Array2<f32>, t: f32) -> Array2<f32> {
    let mut p = logits.mapv(|v| v / t);
    for mut row in p.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    p
}

/// Sum over the batch of the cross-entropy, and `softmax - onehot` per row.
fn softmax_xent(logits: &Array2<f32>, y: &[u32]) -> (f32, Array2<f32>) {
    let mut probs = softmax_rows(logits, 1.0);
    let mut loss = 0.0f64;
    for (mut row, &label) in probs.rows_mut().into_iter().zip(y) {
        let p = row[label as usize].max(1e-30);
        loss -= f64::from(p.ln());
        row[label as usize] -= 1.0;
    }
    (loss as f32, probs)
}

/// Sum over the batch of `KL(softmax(t/T) ‖ softmax(s/T))`, and `softmax(s/T) − softmax(t/T)`.
fn soft_kl(student: &Array2<f32>, teacher: &ArrayView2<f32>, t: f32) -> (f32, Array2<f32>) {
    let ps = softmax_rows(student, t);
    let pt = softmax_rows(&teacher.to_owned(), t);
    let mut kl = 0.0f64;
    for (a, b) in pt.iter().zip(ps.iter()) {
        if *a > 0.0 {
            kl += f64::from(*a) * (f64::from(a.ln()) - f64::from(b.max(1e-30).ln()));
        }
    }
    (kl as f32, ps - pt)
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

fn check_distill(net: &Net, d: &DistillTarget, n: usize) -> Result<(), ModelError> {
    if d.teacher_logits.len() != n * net.classes() {
        return Err(ModelError::Shape(format!(
            "{} teacher logits for {n} samples of {} classes",
            d.teacher_logits.len(),
            net.classes()
        )));
    }
    if !((0.0..=1.0).contains(&d.alpha) && d.temperature.is_finite() && d.temperature > 0.0) {
        return Err(ModelError::Data(
            "distillation needs 0 <= alpha <= 1 and temperature > 0".into(),
        ));
    }
    if d.teacher_logits.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::Data("teacher logits must be finite".into()));
    }
    Ok(())
}

/// Mean softmax cross-entropy of `model` on `n` samples and its gradient with respect to
/// every trainable initializer (by name, in the initializer's own layout).
pub fn gradients(model: &OnnxModel, x: &[f32], y: &[u32]) -> Result<(f32, Weights), ModelError> {
    objective_gradients(model, x, y, &TrainConfig::default())
}

/// The training objective of `cfg` on `n = y.len()` samples (mean cross-entropy, or the
/// distillation loss when `cfg.distill` is set — its teacher logits are for these samples —
/// plus `cfg.l1·Σ|w|`) and its gradient by initializer name, exactly as [`train`] sees them
/// (masked entries zeroed; under fake quantization, the gradient at the quantized weights).
pub fn objective_gradients(
    model: &OnnxModel,
    x: &[f32],
    y: &[u32],
    cfg: &TrainConfig,
) -> Result<(f32, Weights), ModelError> {
    let mut net = Net::from_model(model)?;
    check_data(&net, x, y)?;
    if y.is_empty() {
        return Err(ModelError::Data("no samples".into()));
    }
    if let Some(m) = &cfg.masks {
        net.set_masks(m)?;
    }
    let xv = ArrayView2::from_shape((y.len(), net.input_len()), x)
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let soft = match &cfg.distill {
        Some(d) => {
            check_distill(&net, d, y.len())?;
            let t = ArrayView2::from_shape((y.len(), net.classes()), &d.teacher_logits[..])
                .map_err(|e| ModelError::Shape(e.to_string()))?;
            Some((t, d.alpha, d.temperature))
        }
        None => None,
    };
    let obj = Objective { l1: cfg.l1, soft };
    let eff = net.effective(cfg.fake_quant.as_ref())?;
    let (loss, grads) = net.loss_and_grads(xv, y, &obj, eff.as_deref());
    Ok((loss, net.grads_to_weights(&grads)))
}

/// The trainer's own forward pass: logits (before the softmax) for `n` samples
/// (`n * classes`).
pub fn forward_logits(model: &OnnxModel, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    let net = Net::from_model(model)?;
    let xv = ArrayView2::from_shape((n, net.input_len()), x)
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let logits = net.forward(xv, None).pop().expect("logits");
    Ok(logits.iter().copied().collect())
}

/// The trainer's own forward pass: softmax probabilities for `n` samples (`n * classes`).
/// Used to check tract against the trainer.
pub fn forward_probs(model: &OnnxModel, x: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
    let net = Net::from_model(model)?;
    let xv = ArrayView2::from_shape((n, net.input_len()), x)
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    let logits = net.forward(xv, None).pop().expect("logits");
    Ok(softmax_rows(&logits, 1.0).iter().copied().collect())
}

/// Trains `model`'s Gemm layers on `data`; returns the new weights by initializer name (the
/// model itself is not modified: apply them with [`OnnxModel::set_weights`]). Under fake
/// quantization the returned weights are the float master weights.
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
    if !(cfg.l1.is_finite() && cfg.l1 >= 0.0) {
        return Err(ModelError::Data("l1 must be finite and >= 0".into()));
    }
    if !(cfg.proximal_mu.is_finite() && cfg.proximal_mu >= 0.0) {
        return Err(ModelError::Data(
            "proximal_mu must be finite and >= 0".into(),
        ));
    }
    if !(cfg.weight_decay.is_finite() && cfg.weight_decay >= 0.0) {
        return Err(ModelError::Data(
            "weight_decay must be finite and >= 0".into(),
        ));
    }
    if let Some(d) = &cfg.distill {
        check_distill(&net, d, data.len())?;
    }
    if let Some(m) = &cfg.masks {
        net.set_masks(m)?;
    }
    let batch = cfg.batch_size.clamp(1, data.len());
    let (k, classes) = (net.input_len(), net.classes());
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
    let prox = cfg.proximal_mu;
    // FedProx's anchor: the weights training starts from.
    let anchor: Option<Vec<(Array2<f32>, Array1<f32>)>> = (prox > 0.0).then(|| {
        net.layers
            .iter()
            .map(|p| (p.w.clone(), p.b.clone()))
            .collect()
    });
    let mut final_loss = f32::NAN;
    let mut xb: Vec<f32> = Vec::with_capacity(batch * k);
    let mut yb: Vec<u32> = Vec::with_capacity(batch);
    let mut tb: Vec<f32> = Vec::new();
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut batches) = (0.0f64, 0usize);
        for chunk in order.chunks(batch) {
            xb.clear();
            yb.clear();
            tb.clear();
            for &i in chunk {
                xb.extend_from_slice(data.sample(i));
                yb.push(data.y[i]);
                if let Some(d) = &cfg.distill {
                    tb.extend_from_slice(&d.teacher_logits[i * classes..(i + 1) * classes]);
                }
            }
            let xv = ArrayView2::from_shape((chunk.len(), k), &xb[..])
                .map_err(|e| ModelError::Shape(e.to_string()))?;
            let soft = match &cfg.distill {
                Some(d) => Some((
                    ArrayView2::from_shape((chunk.len(), classes), &tb[..])
                        .map_err(|e| ModelError::Shape(e.to_string()))?,
                    d.alpha,
                    d.temperature,
                )),
                None => None,
            };
            let obj = Objective { l1: cfg.l1, soft };
            let eff = net.effective(cfg.fake_quant.as_ref())?;
            let (loss, mut grads) = net.loss_and_grads(xv, &yb, &obj, eff.as_deref());
            if let Some(anchor) = &anchor {
                // ∇ mu/2·‖w − w₀‖² = mu·(w − w₀).
                for ((g, p), (w0, b0)) in grads.iter_mut().zip(&net.layers).zip(anchor) {
                    ndarray_prox(&mut g.w, &p.w, w0, prox);
                    ndarray_prox1(&mut g.b, &p.b, b0, prox);
                }
            }
            if !loss.is_finite() {
                return Err(ModelError::Data(format!(
                    "training diverged (loss {loss}); lower the learning rate"
                )));
            }
            loss_sum += f64::from(loss);
            batches += 1;
            let wd = cfg.weight_decay;
            for ((p, g), v) in net.layers.iter_mut().zip(&grads).zip(vel.iter_mut()) {
                v.w.zip_mut_with(&g.w, |v, &g| *v = mu * *v + g);
                if wd > 0.0 {
                    // ∇ λ/2·‖w‖² = λ·w, into the velocity like the loss's gradient.
                    v.w.scaled_add(wd, &p.w);
                }
                p.w.scaled_add(-lr, &v.w);
                if let Some(m) = &p.wmask {
                    zero_masked(&mut p.w, m);
                }
                // A Gemm without bias has nothing to train there.
                if p.spec.bias.is_some() {
                    v.b.zip_mut_with(&g.b, |v, &g| *v = mu * *v + g);
                    p.b.scaled_add(-lr, &v.b);
                    if let Some(m) = &p.bmask {
                        zero_masked(&mut p.b, m);
                    }
                }
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

/// `g += mu·(w − w0)` for a weight matrix.
fn ndarray_prox(g: &mut Array2<f32>, w: &Array2<f32>, w0: &Array2<f32>, mu: f32) {
    g.zip_mut_with(w, |g, &w| *g += mu * w);
    g.scaled_add(-mu, w0);
}

/// `g += mu·(w − w0)` for a bias.
fn ndarray_prox1(g: &mut Array1<f32>, w: &Array1<f32>, w0: &Array1<f32>, mu: f32) {
    g.zip_mut_with(w, |g, &w| *g += mu * w);
    g.scaled_add(-mu, w0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Task;
    use crate::onnx::MlpSpec;
    use rand::Rng;

    fn tiny_model(seed: u64) -> OnnxModel {
        let spec = MlpSpec {
            task: Task::Digits.to_string(),
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

    /// Central finite differences on every `stride`-th entry of every tensor against the
    /// analytic gradient; `skip_kinks` skips weights within 3·eps of 0, where |w| has no
    /// derivative. Returns how many entries were checked.
    fn check_finite_differences(
        base: &Weights,
        grads: &Weights,
        loss_at: impl Fn(&Weights) -> f64,
        stride: usize,
        skip_kinks: bool,
        ctx: &str,
    ) -> usize {
        let eps = 1e-3f32;
        let mut checked = 0;
        for (name, t) in base {
            for i in (0..t.len()).step_by(stride) {
                if skip_kinks && t.data[i].abs() < 3.0 * eps && t.shape.len() == 2 {
                    continue;
                }
                let mut plus = base.clone();
                plus.get_mut(name).unwrap().data[i] += eps;
                let mut minus = base.clone();
                minus.get_mut(name).unwrap().data[i] -= eps;
                let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * f64::from(eps));
                let analytic = f64::from(grads[name].data[i]);
                assert!(
                    (numeric - analytic).abs() < 2e-3 + 2e-2 * analytic.abs(),
                    "{name}[{i}] {ctx}: numeric {numeric} vs analytic {analytic}"
                );
                checked += 1;
            }
        }
        checked
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
        let checked = check_finite_differences(&base, &grads, loss_at, 3, false, "");
        assert!(checked > 30);
    }

    #[test]
    fn weight_decay_shrinks_the_weights_not_the_biases_and_is_validated() {
        // Separable data and a linear model: without decay the weights keep growing (the
        // loss only approaches 0); with it they settle where λ·w balances the gradient.
        let spec = MlpSpec {
            task: Task::Faces.to_string(),
            input_len: 2,
            hidden: vec![],
            classes: vec!["none".into(), "person".into()],
        };
        let model = OnnxModel::build_mlp(&spec, 1);
        let mut rng = StdRng::seed_from_u64(5);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..100 {
            let a: f32 = rng.gen_range(-1.0..1.0);
            x.extend([a, rng.gen_range(-1.0..1.0)]);
            y.push(u32::from(a > 0.0));
        }
        let ds = Dataset {
            task: "faces".into(),
            classes: spec.classes.clone(),
            input_len: 2,
            x,
            y,
        };
        let norm = |wd: f32| {
            let cfg = TrainConfig {
                epochs: 100,
                learning_rate: 0.1,
                weight_decay: wd,
                ..Default::default()
            };
            let (w, _) = train(&model, &ds, &cfg).unwrap();
            w["fc0.weight"]
                .data
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
        };
        let (free, decayed) = (norm(0.0), norm(0.1));
        assert!(decayed < 0.5 * free, "decay {decayed} vs none {free}");
        let bad = TrainConfig {
            weight_decay: -1.0,
            ..Default::default()
        };
        assert!(train(&model, &ds, &bad).is_err());
    }

    #[test]
    fn training_fits_a_separable_problem_deterministically() {
        let spec = MlpSpec {
            task: Task::Faces.to_string(),
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
            task: "faces".into(),
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
            ..Default::default()
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

    /// `tiny_model` with the Relu after fc0 removed and fc0 without bias: Gemm → Gemm.
    fn linear_chain_model(seed: u64) -> OnnxModel {
        let mut proto = tiny_model(seed).proto().clone();
        let g = proto.graph.as_mut().unwrap();
        g.node.retain(|n| n.name != "relu0");
        for n in g.node.iter_mut() {
            if n.name == "fc0" {
                n.input.truncate(2);
            }
            if n.name == "fc1" {
                n.input[0] = "fc0".into();
            }
        }
        g.initializer.retain(|t| t.name != "fc0.bias");
        use prost::Message;
        OnnxModel::from_bytes(&proto.encode_to_vec()).unwrap()
    }

    /// Reference objective in f64 from the trainer's logits: (1−α)·CE + α·T²·KL + λ·Σ|w|.
    fn reference_loss(m: &OnnxModel, x: &[f32], y: &[u32], cfg: &TrainConfig) -> f64 {
        let n = y.len();
        let k = 4;
        let s = forward_logits(m, x, n).unwrap();
        let sm = |row: &[f32], t: f64| -> Vec<f64> {
            let mx = row
                .iter()
                .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v) / t));
            let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) / t - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        };
        let mut total = 0.0;
        for i in 0..n {
            let row = &s[i * k..(i + 1) * k];
            let ce = -sm(row, 1.0)[y[i] as usize].ln();
            total += match &cfg.distill {
                None => ce,
                Some(d) => {
                    let t = f64::from(d.temperature);
                    let ps = sm(row, t);
                    let pt = sm(&d.teacher_logits[i * k..(i + 1) * k], t);
                    let kl: f64 = pt.iter().zip(&ps).map(|(a, b)| a * (a.ln() - b.ln())).sum();
                    let a = f64::from(d.alpha);
                    a * t * t * kl + (1.0 - a) * ce
                }
            };
        }
        let l1: f64 = m
            .dense_layers()
            .unwrap()
            .iter()
            .flat_map(|l| m.weights()[&l.weight].data.clone())
            .map(|v| f64::from(v).abs())
            .sum();
        total / n as f64 + f64::from(cfg.l1) * l1
    }

    #[test]
    fn l1_and_distillation_gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(8);
        let n = 7;
        let x: Vec<f32> = (0..n * 5).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..4)).collect();
        let teacher: Vec<f32> = (0..n * 4).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let configs = [
            TrainConfig {
                l1: 0.01,
                ..Default::default()
            },
            TrainConfig {
                distill: Some(DistillTarget {
                    teacher_logits: teacher.clone(),
                    alpha: 0.7,
                    temperature: 3.0,
                }),
                ..Default::default()
            },
            TrainConfig {
                l1: 0.003,
                distill: Some(DistillTarget {
                    teacher_logits: teacher,
                    alpha: 0.4,
                    temperature: 1.5,
                }),
                ..Default::default()
            },
        ];
        let mut checked = 0;
        for model in [tiny_model(21), linear_chain_model(22)] {
            for cfg in &configs {
                let (loss, grads) = objective_gradients(&model, &x, &y, cfg).unwrap();
                let base = model.weights();
                let loss_at = |w: &Weights| {
                    let mut m = model.clone();
                    m.set_weights(w).unwrap();
                    reference_loss(&m, &x, &y, cfg)
                };
                assert!((f64::from(loss) - loss_at(&base)).abs() < 1e-4 * (1.0 + f64::from(loss)));
                assert_eq!(
                    grads.keys().collect::<Vec<_>>(),
                    base.keys().collect::<Vec<_>>()
                );
                let ctx = format!("{cfg:?}");
                checked += check_finite_differences(&base, &grads, loss_at, 4, true, &ctx);
            }
        }
        assert!(checked > 100, "{checked}");
        // The linear chain has no fc0.bias and training does not invent one.
        let chain = linear_chain_model(22);
        assert!(!chain.weights().contains_key("fc0.bias"));
        let ds = Dataset {
            task: "digits".into(),
            classes: (0..4).map(|i| format!("digit_{i}")).collect(),
            input_len: 5,
            x: x.clone(),
            y: y.clone(),
        };
        let (w, _) = train(
            &chain,
            &ds,
            &TrainConfig {
                epochs: 3,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            w.keys().collect::<Vec<_>>(),
            chain.weights().keys().collect::<Vec<_>>()
        );
        // Invalid distillation settings are errors.
        let bad = TrainConfig {
            distill: Some(DistillTarget {
                teacher_logits: vec![0.0; 3],
                alpha: 0.5,
                temperature: 2.0,
            }),
            ..Default::default()
        };
        assert!(train(&chain, &ds, &bad).is_err());
    }

    #[test]
    fn masked_weights_stay_exactly_zero() {
        let model = tiny_model(31);
        let mut rng = StdRng::seed_from_u64(4);
        let n = 64;
        let x: Vec<f32> = (0..n * 5).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y: Vec<u32> = (0..n).map(|i| (i % 4) as u32).collect();
        let ds = Dataset {
            task: "digits".into(),
            classes: (0..4).map(|i| format!("digit_{i}")).collect(),
            input_len: 5,
            x,
            y,
        };
        let w0 = model.weights();
        let masks: Weights = w0
            .iter()
            .filter(|(name, _)| name.ends_with("weight") || name == &"fc1.bias")
            .map(|(name, t)| {
                let m = (0..t.len())
                    .map(|_| f32::from(rng.gen_bool(0.5) as u8))
                    .collect();
                (name.clone(), Tensor::new(t.shape.clone(), m))
            })
            .collect();
        let cfg = TrainConfig {
            epochs: 10,
            learning_rate: 0.05,
            batch_size: 8,
            l1: 1e-3,
            masks: Some(masks.clone()),
            ..Default::default()
        };
        let (w, report) = train(&model, &ds, &cfg).unwrap();
        assert!(report.final_loss.is_finite());
        let (mut zeros, mut moved) = (0, 0);
        for (name, m) in &masks {
            for ((&k, &v), &v0) in m.data.iter().zip(&w[name].data).zip(&w0[name].data) {
                if k == 0.0 {
                    assert_eq!(v.to_bits(), 0, "{name}: masked value {v}");
                    zeros += 1;
                } else if v != v0 {
                    moved += 1;
                }
            }
        }
        assert!(zeros > 20 && moved > 20, "{zeros} zeros, {moved} moved");
        // A mask for an unknown tensor is an error.
        let mut bad = masks;
        bad.insert("nope".into(), Tensor::zeros(&[1]));
        let cfg = TrainConfig {
            masks: Some(bad),
            ..cfg
        };
        assert!(train(&model, &ds, &cfg).is_err());
    }

    #[test]
    fn fake_quant_is_straight_through() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let model = tiny_model(41);
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        // Round every Gemm weight to a grid of 1/4: a 3-level-ish quantizer.
        let fq: FakeQuant = Arc::new(move |name: &str, t: &Tensor| {
            assert!(name.ends_with(".weight"), "{name}");
            c.fetch_add(1, Ordering::Relaxed);
            Tensor::new(
                t.shape.clone(),
                t.data.iter().map(|v| (v * 4.0).round() / 4.0).collect(),
            )
        });
        let cfg = TrainConfig {
            fake_quant: Some(fq.clone()),
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(6);
        let n = 16;
        let x: Vec<f32> = (0..n * 5).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.gen_range(0..4)).collect();
        // STE: the gradient is the plain gradient evaluated at the quantized weights.
        let (lq, gq) = objective_gradients(&model, &x, &y, &cfg).unwrap();
        let mut quantized = model.clone();
        let mut wq = model.weights();
        for (name, t) in wq.iter_mut() {
            if name.ends_with(".weight") {
                *t = fq(name, t);
            }
        }
        quantized.set_weights(&wq).unwrap();
        let (l, g) = gradients(&quantized, &x, &y).unwrap();
        assert!((l - lq).abs() < 1e-6);
        for (name, t) in &g {
            for (a, b) in t.data.iter().zip(&gq[name].data) {
                assert!((a - b).abs() < 1e-6, "{name}");
            }
        }
        // Training updates the float master weights (not on the grid) through the hook.
        let ds = Dataset {
            task: "digits".into(),
            classes: (0..4).map(|i| format!("digit_{i}")).collect(),
            input_len: 5,
            x,
            y,
        };
        let before = calls.load(Ordering::Relaxed);
        let (w, _) = train(&model, &ds, &TrainConfig { epochs: 2, ..cfg }).unwrap();
        assert!(calls.load(Ordering::Relaxed) > before);
        let off_grid = w["fc0.weight"]
            .data
            .iter()
            .filter(|v| ((*v * 4.0).round() / 4.0 - *v).abs() > 1e-4)
            .count();
        assert!(off_grid > 10, "{off_grid}");
        assert_ne!(w, model.weights());
    }
}
