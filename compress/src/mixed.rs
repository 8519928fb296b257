//! Automatic mixed precision: choose a quantization scheme (bit width) per layer.
//!
//! 1. **Sensitivity** ([`layer_sensitivity`]): for every Gemm weight and every candidate
//!    scheme, fake-quantize only that layer and measure the accuracy on an evaluation set
//!    (tract inference); the drop from the float accuracy is the layer's sensitivity.
//! 2. **Search** ([`auto_mixed_precision`]): treat drops as additive and run an exact
//!    knapsack-style dynamic programme over layers that keeps the Pareto frontier of
//!    (bytes, summed drop) plans; keeping f32 is always an option for a layer. Then measure
//!    the real accuracy of the best few frontier plans with every layer quantized together:
//!    - [`Budget::SizeBytes`]: among plans within the size, the best measured accuracy;
//!    - [`Budget::AccuracyFloor`]: the smallest plan whose measured accuracy reaches the floor.
//! 3. **Quantization-aware fine-tuning** ([`qat_finetune`]): train with the plan's
//!    fake-quantization in the forward pass and straight-through gradients (the trainer's
//!    `fake_quant` hook), recovering accuracy lost at 2–4 bits.
//!
//! Sizes count packed codes plus quantization parameters ([`scheme_bytes`]) for planned
//! weights and 4 bytes per value for everything else (biases): the payload of a package
//! before sparsity and headers.

use crate::package::Schemes;
use crate::quant::{fake_quantize, scheme_bits, scheme_bytes, QuantScheme};
use hearth_model::data::Dataset;
use hearth_model::error::ModelError;
use hearth_model::infer::{accuracy, Classifier};
use hearth_model::onnx::OnnxModel;
use hearth_model::tensor::{Tensor, Weights};
use hearth_model::train::{train, FakeQuant, TrainConfig};
use std::sync::Arc;

/// At most this many frontier plans are measured by [`auto_mixed_precision`].
const MAX_MEASURED: usize = 16;
/// The frontier is thinned to this many plans between layers (keeps the search bounded).
const MAX_FRONTIER: usize = 4096;

/// One candidate for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOption {
    /// The scheme (`None` = keep f32).
    pub scheme: Option<QuantScheme>,
    /// Stored bytes of the layer's weight under the scheme.
    pub bytes: usize,
    /// Eval accuracy with only this layer quantized.
    pub accuracy: f32,
    /// Float accuracy minus `accuracy`.
    pub drop: f32,
}

/// Sensitivity of one Gemm weight to each candidate scheme.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSensitivity {
    /// Initializer name of the weight.
    pub name: String,
    /// Number of values.
    pub params: usize,
    /// The candidates, f32 first.
    pub options: Vec<LayerOption>,
}

/// What the search must meet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Total bytes (planned weights packed + other tensors f32) must not exceed this;
    /// minimise the accuracy drop.
    SizeBytes(usize),
    /// Eval accuracy (0..=1) must stay at or above this; minimise the size.
    AccuracyFloor(f32),
}

/// The scheme chosen for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerChoice {
    /// Initializer name of the weight.
    pub name: String,
    /// Chosen scheme (`None` = f32).
    pub scheme: Option<QuantScheme>,
    /// Bits per value (32 for f32).
    pub bits: u8,
    /// Number of values.
    pub params: usize,
    /// Stored bytes.
    pub bytes: usize,
    /// Accuracy drop measured with only this layer quantized.
    pub drop: f32,
}

/// A per-layer quantization plan.
#[derive(Clone, Debug, PartialEq)]
pub struct MixedPlan {
    /// Scheme per quantized weight (f32 layers are absent): what [`crate::package`] takes.
    pub schemes: Schemes,
    /// Every Gemm weight in graph order.
    pub layers: Vec<LayerChoice>,
    /// Bytes of the planned model (planned weights packed, the rest f32).
    pub total_bytes: usize,
    /// Bytes of the same model in f32.
    pub float_bytes: usize,
    /// Eval accuracy of the float model.
    pub baseline_accuracy: f32,
    /// Eval accuracy measured with the whole plan applied.
    pub accuracy: f32,
}

impl MixedPlan {
    /// `float_bytes / total_bytes`.
    pub fn compression_ratio(&self) -> f32 {
        self.float_bytes as f32 / self.total_bytes.max(1) as f32
    }

    /// The plan's weights for `w`: planned tensors fake-quantized, the rest unchanged.
    pub fn quantize_weights(&self, w: &Weights) -> Weights {
        w.iter()
            .map(|(n, t)| {
                let t = match self.schemes.get(n) {
                    Some(s) => fake_quantize(t, s),
                    None => t.clone(),
                };
                (n.clone(), t)
            })
            .collect()
    }

    /// `model` with the plan applied (fake-quantized f32 weights).
    pub fn apply(&self, model: &OnnxModel) -> Result<OnnxModel, ModelError> {
        let mut m = model.clone();
        m.set_weights(&self.quantize_weights(&model.weights()))?;
        Ok(m)
    }

    /// The plan as a fake-quantization closure (for quantization-aware training).
    pub fn fake_quant(&self) -> FakeQuant {
        let schemes = self.schemes.clone();
        Arc::new(move |name: &str, t: &Tensor| match schemes.get(name) {
            Some(s) => fake_quantize(t, s),
            None => t.clone(),
        })
    }
}

fn eval(model: &OnnxModel, data: &Dataset) -> Result<f32, ModelError> {
    accuracy(&Classifier::new(model)?, data)
}

/// Accuracy drop of each Gemm weight under each candidate, quantizing one layer at a time.
pub fn layer_sensitivity(
    model: &OnnxModel,
    eval_set: &Dataset,
    candidates: &[QuantScheme],
) -> Result<Vec<LayerSensitivity>, ModelError> {
    let layers = model.dense_layers()?;
    let weights = model.weights();
    let base = eval(model, eval_set)?;
    let mut out = Vec::with_capacity(layers.len());
    for l in &layers {
        let w = &weights[&l.weight];
        let mut options = vec![LayerOption {
            scheme: None,
            bytes: 4 * w.len(),
            accuracy: base,
            drop: 0.0,
        }];
        for c in candidates {
            let mut m = model.clone();
            let mut one = Weights::new();
            one.insert(l.weight.clone(), fake_quantize(w, c));
            m.set_weights(&one)?;
            let a = eval(&m, eval_set)?;
            options.push(LayerOption {
                scheme: Some(*c),
                bytes: scheme_bytes(w, c),
                accuracy: a,
                drop: base - a,
            });
        }
        out.push(LayerSensitivity {
            name: l.weight.clone(),
            params: w.len(),
            options,
        });
    }
    Ok(out)
}

/// A partial plan on the frontier: bytes, summed drop, option index per layer so far.
type Partial = (usize, f32, Vec<usize>);

/// Pareto frontier of (bytes, summed drop) over every combination of options.
fn frontier(sens: &[LayerSensitivity]) -> Vec<Partial> {
    let mut front: Vec<Partial> = vec![(0, 0.0, Vec::new())];
    for s in sens {
        let mut next: Vec<Partial> = Vec::with_capacity(front.len() * s.options.len());
        for (b, d, picks) in &front {
            for (i, o) in s.options.iter().enumerate() {
                let mut p = picks.clone();
                p.push(i);
                next.push((b + o.bytes, d + o.drop, p));
            }
        }
        next.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut pruned: Vec<Partial> = Vec::new();
        for cand in next {
            if pruned.last().is_none_or(|last| cand.1 < last.1) {
                pruned.push(cand);
            }
        }
        if pruned.len() > MAX_FRONTIER {
            let step = pruned.len().div_ceil(MAX_FRONTIER);
            let last = pruned.len() - 1;
            pruned = pruned
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % step == 0 || *i == last)
                .map(|(_, p)| p)
                .collect();
        }
        front = pruned;
    }
    front
}

fn build_plan(
    sens: &[LayerSensitivity],
    picks: &[usize],
    other_bytes: usize,
    float_bytes: usize,
    baseline: f32,
) -> MixedPlan {
    let mut schemes = Schemes::new();
    let mut layers = Vec::new();
    let mut total = other_bytes;
    for (s, &i) in sens.iter().zip(picks) {
        let o = &s.options[i];
        if let Some(sc) = o.scheme {
            schemes.insert(s.name.clone(), sc);
        }
        total += o.bytes;
        layers.push(LayerChoice {
            name: s.name.clone(),
            scheme: o.scheme,
            bits: o.scheme.as_ref().map_or(32, scheme_bits),
            params: s.params,
            bytes: o.bytes,
            drop: o.drop,
        });
    }
    MixedPlan {
        schemes,
        layers,
        total_bytes: total,
        float_bytes,
        baseline_accuracy: baseline,
        accuracy: f32::NAN,
    }
}

/// Chooses a scheme per Gemm weight from `candidates` (or f32) to meet `budget`, measuring
/// sensitivities and the final plans on `eval_set`. Errors when no plan meets the budget.
pub fn auto_mixed_precision(
    model: &OnnxModel,
    eval_set: &Dataset,
    candidates: &[QuantScheme],
    budget: Budget,
) -> Result<MixedPlan, ModelError> {
    let sens = layer_sensitivity(model, eval_set, candidates)?;
    search(model, eval_set, &sens, budget)
}

/// The search of [`auto_mixed_precision`] on sensitivities already measured.
pub fn search(
    model: &OnnxModel,
    eval_set: &Dataset,
    sens: &[LayerSensitivity],
    budget: Budget,
) -> Result<MixedPlan, ModelError> {
    let weights = model.weights();
    let float_bytes = 4 * weights.values().map(Tensor::len).sum::<usize>();
    let planned: usize = sens.iter().map(|s| 4 * s.params).sum();
    let other_bytes = float_bytes - planned.min(float_bytes);
    let baseline = sens
        .first()
        .and_then(|s| s.options.first())
        .map_or(0.0, |o| o.accuracy);
    let front = frontier(sens);
    let measure = |p: &mut MixedPlan| -> Result<f32, ModelError> {
        p.accuracy = eval(&p.apply(model)?, eval_set)?;
        Ok(p.accuracy)
    };
    match budget {
        Budget::SizeBytes(max) => {
            let mut fits: Vec<&Partial> = front
                .iter()
                .filter(|(b, _, _)| b + other_bytes <= max)
                .collect();
            if fits.is_empty() {
                let min = front.first().map_or(0, |p| p.0) + other_bytes;
                return Err(ModelError::Data(format!(
                    "no plan fits in {max} bytes (smallest: {min})"
                )));
            }
            fits.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            let mut best: Option<MixedPlan> = None;
            for (_, _, picks) in fits.into_iter().take(MAX_MEASURED / 4) {
                let mut p = build_plan(sens, picks, other_bytes, float_bytes, baseline);
                let a = measure(&mut p)?;
                if best.as_ref().is_none_or(|b| {
                    a > b.accuracy || (a == b.accuracy && p.total_bytes < b.total_bytes)
                }) {
                    best = Some(p);
                }
            }
            best.ok_or_else(|| ModelError::Data("no plan measured".into()))
        }
        Budget::AccuracyFloor(floor) => {
            // Smallest first; measure plans whose predicted accuracy reaches the floor.
            let mut measured = 0;
            for (_, drop, picks) in &front {
                if baseline - drop < floor {
                    continue;
                }
                let mut p = build_plan(sens, picks, other_bytes, float_bytes, baseline);
                if measure(&mut p)? >= floor {
                    return Ok(p);
                }
                measured += 1;
                if measured >= MAX_MEASURED {
                    break;
                }
            }
            // Fall back to the float model when it meets the floor.
            let picks = vec![0; sens.len()];
            let mut p = build_plan(sens, &picks, other_bytes, float_bytes, baseline);
            if measure(&mut p)? >= floor {
                return Ok(p);
            }
            Err(ModelError::Data(format!(
                "no plan reaches accuracy {floor} (float model: {baseline})"
            )))
        }
    }
}

/// Quantization-aware fine-tuning: trains `model` on `data` with `plan`'s fake-quantization
/// in the forward pass and straight-through gradients (`cfg.fake_quant` is replaced by the
/// plan's). Returns the model with the trained **float master weights**; apply the plan
/// ([`MixedPlan::apply`], or [`crate::package::encode_package`]) to deploy it.
pub fn qat_finetune(
    model: &OnnxModel,
    data: &Dataset,
    plan: &MixedPlan,
    cfg: &TrainConfig,
) -> Result<OnnxModel, ModelError> {
    let cfg = TrainConfig {
        fake_quant: Some(plan.fake_quant()),
        ..cfg.clone()
    };
    let (w, _) = train(model, data, &cfg)?;
    let mut out = model.clone();
    out.set_weights(&w)?;
    Ok(out)
}

/// A plan that applies `scheme` to every Gemm weight of `model` (no search): the
/// post-training-quantization baseline. Accuracy is measured on `eval_set`.
pub fn uniform_plan(
    model: &OnnxModel,
    eval_set: &Dataset,
    scheme: QuantScheme,
) -> Result<MixedPlan, ModelError> {
    let weights = model.weights();
    let float_bytes = 4 * weights.values().map(Tensor::len).sum::<usize>();
    let mut schemes = Schemes::new();
    let mut layers = Vec::new();
    let mut total = float_bytes;
    for l in model.dense_layers()? {
        let w = &weights[&l.weight];
        let bytes = scheme_bytes(w, &scheme);
        total = total - 4 * w.len() + bytes;
        schemes.insert(l.weight.clone(), scheme);
        layers.push(LayerChoice {
            name: l.weight.clone(),
            scheme: Some(scheme),
            bits: scheme_bits(&scheme),
            params: w.len(),
            bytes,
            drop: f32::NAN,
        });
    }
    let mut p = MixedPlan {
        schemes,
        layers,
        total_bytes: total,
        float_bytes,
        baseline_accuracy: eval(model, eval_set)?,
        accuracy: f32::NAN,
    };
    p.accuracy = eval(&p.apply(model)?, eval_set)?;
    Ok(p)
}
