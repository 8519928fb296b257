//! Runs a recipe: each step transforms the pipeline state (float master model, pruning masks,
//! per-weight quantization schemes), then the deployed form of the state is measured
//! (size, params, non-zeros, accuracy / output agreement, tract latency) into a table row.

use crate::codebook::CodebookKind;
use crate::error::CompressError;
use crate::measure::{self, GenericRunner, MeasureOptions, Measurement, OutputTransform};
use crate::mixed::{self, Budget};
use crate::package::{self, Schemes};
use crate::quant::{fake_quantize, Granularity, QuantScheme};
use crate::recipe::{BudgetSpec, ExportFormat, PruneMethod, Step};
use crate::{channels, distill, prune, qconv, qonnx, reconstruct};
use hearth_model::train;
use hearth_model::{Dataset, MlpSpec, ModelError, OnnxModel, TrainConfig, Weights};
use std::sync::Arc;

/// Everything a recipe runs against.
#[derive(Clone, Debug)]
pub struct Context {
    /// Training split (fine-tuning, distillation, calibration, searches); `None` without `--data`.
    pub train: Option<Dataset>,
    /// Evaluation split (accuracy when the model takes its samples, agreement inputs).
    pub eval: Option<Dataset>,
    /// Measurement options (latency runs, compared outputs).
    pub measure: MeasureOptions,
    /// Seed of student initialisation and training shuffles.
    pub seed: u64,
}

/// The state between steps.
#[derive(Clone, Debug)]
pub struct State {
    /// Float master weights and graph.
    pub model: OnnxModel,
    /// Unstructured pruning masks (1 keep / 0 pruned) by initializer name.
    pub masks: Option<Weights>,
    /// Quantization scheme per weight name (applied when deployed).
    pub schemes: Schemes,
    /// Final artefact format.
    pub export: ExportFormat,
}

/// One line of the result table.
#[derive(Clone, Debug)]
pub struct Row {
    /// `original` or the step as written.
    pub label: String,
    /// The measurement of the deployed model after the step.
    pub m: Measurement,
    /// What the step did (e.g. ranks kept, layers removed).
    pub note: String,
}

/// The deployed artefact: its bytes and the ONNX model tract runs.
#[derive(Clone, Debug)]
pub struct Artefact {
    /// File contents to write.
    pub bytes: Vec<u8>,
    /// The model the bytes decode to (what was measured).
    pub model: OnnxModel,
}

/// Calibration inputs for the int8 export of imported conv graphs.
const CONV_CALIBRATION_SAMPLES: usize = 20;

/// Calibration inputs for channel sensitivity and least-squares recovery.
const CHANNEL_CALIBRATION_SAMPLES: usize = 16;

/// The first `n` samples of `ds` as inputs of `model` ([`measure::adapt_inputs`]).
pub fn calibration_inputs(
    model: &OnnxModel,
    ds: &Dataset,
    n: usize,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let shape = measure::input_shape(model)?;
    let idx: Vec<usize> = (0..ds.len().min(n)).collect();
    measure::adapt_inputs(&ds.subset(&idx), &shape)
}

/// True when `model` is a sequential Gemm/Relu classifier (Hearth's own family).
pub fn is_mlp(model: &OnnxModel) -> bool {
    model.dense_layers().is_ok()
}

/// Names of the weight tensors pruning and quantization act on: the Gemm weights of an MLP,
/// otherwise every f32 initializer with at least two dimensions above 1 (conv kernels,
/// matrices). Biases and per-channel vectors, including ones an exporter reshaped to
/// `[1, C, 1, 1]` for a broadcast `Add`, stay f32.
pub fn weight_names(model: &OnnxModel) -> Vec<String> {
    match prune::gemm_weight_names(model) {
        Ok(n) => n,
        Err(_) => model
            .weights()
            .into_iter()
            .filter(|(_, t)| t.shape.iter().filter(|&&d| d > 1).count() >= 2)
            .map(|(n, _)| n)
            .collect(),
    }
}

/// Why `step` would change nothing on `state`, found before it runs (`None`: it has work).
pub fn noop_reason(state: &State, step: &Step) -> Option<String> {
    match step {
        Step::Prune { .. } | Step::Quant { .. } if weight_names(&state.model).is_empty() => Some(
            "no weight tensors found (no f32 Gemm weight, no f32 initializer with two dimensions above 1)".into(),
        ),
        Step::PruneChannels { .. }
            if channels::analyse(&state.model).map_or(true, |a| a.removable_count() == 0) =>
        {
            Some("no removable conv channels (no Conv with constant weights whose channels \
                  stay inside ops channel pruning rewrites)"
                .into())
        }
        Step::Export {
            format: ExportFormat::Int8QOperator,
        } if !is_mlp(&state.model) && qconv::conv_site_count(&state.model) == 0 => {
            Some("no Conv to quantize (no Conv with constant f32 weights)".into())
        }
        _ => None,
    }
}

/// True when a step whose artefact is byte-identical to the one before it changed nothing
/// (every step but `export:float`, which only names the default format).
pub fn must_change_artefact(step: &Step) -> bool {
    !matches!(
        step,
        Step::Export {
            format: ExportFormat::Float
        }
    )
}

/// Rejects (before any work) recipes whose steps cannot apply to this model or data:
/// steps that need a Gemm/Relu classifier on another graph, training steps without data.
pub fn check_applicable(
    model: &OnnxModel,
    steps: &[Step],
    ctx: &Context,
) -> Result<(), CompressError> {
    // Runs on the normalised model (weights as initializers, BatchNorms folded).
    let structure = model.dense_layers().err();
    for (i, s) in steps.iter().enumerate() {
        if let (true, Some(e)) = (s.needs_mlp(), &structure) {
            return Err(CompressError::Usage(format!(
                "step {} ({}) cannot apply to this model: it needs a sequential Gemm/Relu \
                 classifier and the graph is not one ({e}); only prune (magnitude), quant \
                 and export (float, package, int8-qoperator for convs) apply to arbitrary ONNX graphs",
                i + 1,
                s.kind()
            )));
        }
        if s.needs_mlp() && ctx.train.is_none() && !matches!(s, Step::Export { .. }) {
            return Err(CompressError::Usage(format!(
                "step {} ({}) needs labelled data: pass --data <dir>",
                i + 1,
                s.kind()
            )));
        }
        let needs_calibration = match s {
            Step::Export { format } => *format == ExportFormat::Int8QOperator,
            Step::PruneChannels {
                criterion, recover, ..
            } => *recover || *criterion == channels::ChannelCriterion::Sensitivity,
            _ => false,
        };
        if needs_calibration && ctx.train.is_none() {
            return Err(CompressError::Usage(format!(
                "step {} ({s}) needs calibration data: pass --data <dir>",
                i + 1
            )));
        }
    }
    if let (Some(ds), None) = (&ctx.train, &structure) {
        if ds.input_len != model.input_len() {
            return Err(CompressError::Usage(format!(
                "data {} has {} inputs per sample, the model takes {}",
                ds.task,
                ds.input_len,
                model.input_len()
            )));
        }
    }
    Ok(())
}

impl State {
    /// A fresh state for `model` (float export by default).
    pub fn new(model: OnnxModel) -> State {
        State {
            model,
            masks: None,
            schemes: Schemes::new(),
            export: ExportFormat::Float,
        }
    }

    /// The float model tract runs: masks applied, planned weights fake-quantized.
    pub fn deployed(&self) -> Result<OnnxModel, ModelError> {
        let mut w = self.model.weights();
        if let Some(m) = &self.masks {
            prune::apply_masks(&mut w, m);
        }
        let mut changed = Weights::new();
        for (name, t) in &w {
            let t = match self.schemes.get(name) {
                Some(s) => fake_quantize(t, s),
                None => t.clone(),
            };
            changed.insert(name.clone(), t);
        }
        let mut out = self.model.clone();
        out.set_weights(&changed)?;
        Ok(out)
    }

    /// The artefact of the current export format.
    pub fn artefact(&self, ctx: &Context) -> Result<Artefact, ModelError> {
        match self.export {
            ExportFormat::Float => {
                let model = self.deployed()?;
                Ok(Artefact {
                    bytes: model.to_bytes(),
                    model,
                })
            }
            ExportFormat::Int8QOperator => {
                let calib = ctx
                    .train
                    .as_ref()
                    .ok_or_else(|| ModelError::Data("int8 export needs calibration data".into()))?;
                let deployed = self.deployed()?;
                let model = if is_mlp(&deployed) {
                    qonnx::export_int8(&deployed, calib)?
                } else {
                    // Imported conv graphs: QLinearConv per Conv, calibrated on a few inputs.
                    let shape = measure::input_shape(&deployed)?;
                    let n = calib.len().min(CONV_CALIBRATION_SAMPLES);
                    let idx: Vec<usize> = (0..n).collect();
                    let inputs = measure::adapt_inputs(&calib.subset(&idx), &shape)?;
                    qconv::export_int8_conv(&deployed, &inputs)?
                };
                Ok(Artefact {
                    bytes: model.to_bytes(),
                    model,
                })
            }
            ExportFormat::Package => {
                let bytes =
                    package::encode_package(&self.model, &self.schemes, self.masks.as_ref())?;
                let model = package::decode_package(&bytes)?;
                Ok(Artefact { bytes, model })
            }
        }
    }

    /// After a graph rewrite: masks follow the surviving zeros, schemes the surviving names.
    fn after_rewrite(&mut self, model: OnnxModel) {
        let w = model.weights();
        if self.masks.is_some() {
            let names = weight_names(&model);
            self.masks = Some(
                names
                    .iter()
                    .filter_map(|n| w.get(n).map(|t| (n, t)))
                    .map(|(n, t)| {
                        let data = t.data.iter().map(|&v| f32::from(v != 0.0)).collect();
                        (n.clone(), hearth_model::Tensor::new(t.shape.clone(), data))
                    })
                    .collect(),
            );
        }
        self.schemes.retain(|n, _| w.contains_key(n));
        self.model = model;
    }

    fn train_cfg(&self, epochs: u32, lr: f32, seed: u64) -> TrainConfig {
        let fake_quant: Option<hearth_model::FakeQuant> = if self.schemes.is_empty() {
            None
        } else {
            let schemes = self.schemes.clone();
            Some(Arc::new(
                move |name: &str, t: &hearth_model::Tensor| match schemes.get(name) {
                    Some(s) => fake_quantize(t, s),
                    None => t.clone(),
                },
            ))
        };
        TrainConfig {
            epochs,
            learning_rate: lr,
            seed,
            masks: self.masks.clone(),
            fake_quant,
            ..Default::default()
        }
    }
}

fn need<'a>(d: &'a Option<Dataset>, what: &str) -> Result<&'a Dataset, ModelError> {
    d.as_ref()
        .ok_or_else(|| ModelError::Data(format!("{what} needs --data")))
}

/// Progress callback: `(done, total)` units of the current step.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// Applies one step to the state; returns a note for the table.
pub fn apply_step(
    state: &mut State,
    step: &Step,
    ctx: &Context,
    progress: Progress<'_>,
) -> Result<String, ModelError> {
    match step {
        Step::Distill {
            hidden,
            temperature,
            alpha,
            epochs,
        } => {
            let data = need(&ctx.train, "distill")?;
            let teacher = state.deployed()?;
            let layers = teacher.dense_layers()?;
            let hidden = match hidden {
                Some(h) => h.clone(),
                None => layers[..layers.len() - 1]
                    .iter()
                    .map(|l| (l.outputs / 2).max(1))
                    .collect(),
            };
            let spec = MlpSpec {
                task: data.task.to_string(),
                input_len: layers[0].inputs,
                hidden: hidden.clone(),
                classes: teacher.classes(),
            };
            let mut student = OnnxModel::build_mlp(&spec, ctx.seed);
            for (key, value) in teacher
                .proto()
                .metadata_props
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect::<Vec<_>>()
            {
                student.set_meta(&key, &value);
            }
            // One epoch per call so the bar moves; the teacher's logits are recomputed per
            // call (cheap for the MLPs this applies to).
            for e in 0..*epochs {
                let cfg = TrainConfig {
                    epochs: 1,
                    seed: ctx.seed + u64::from(e),
                    ..Default::default()
                };
                student = distill::distill(&student, &teacher, data, *alpha, *temperature, &cfg)?.0;
                progress(u64::from(e + 1), u64::from(*epochs));
            }
            *state = State {
                export: state.export,
                ..State::new(student)
            };
            let h: Vec<String> = hidden.iter().map(|v| v.to_string()).collect();
            Ok(format!("student hidden {}", h.join("x")))
        }
        Step::Prune {
            sparsity,
            method,
            global,
        } => {
            let names = weight_names(&state.model);
            if names.is_empty() {
                return Err(ModelError::Onnx("no weight tensors to prune".into()));
            }
            let w = state.model.weights();
            let mut masks = match method {
                PruneMethod::Magnitude => prune::magnitude_masks(&w, &names, *sparsity, *global),
                PruneMethod::Sensitivity => {
                    let data = need(&ctx.train, "sensitivity pruning")?;
                    let (_, g) = train::gradients(&state.model, &data.x, &data.y)?;
                    prune::sensitivity_masks(&w, &g, &names, *sparsity)
                }
            };
            if let Some(old) = &state.masks {
                for (n, m) in masks.iter_mut() {
                    if let Some(o) = old.get(n) {
                        for (a, b) in m.data.iter_mut().zip(&o.data) {
                            *a *= *b;
                        }
                    }
                }
            }
            let mut pruned = w.clone();
            prune::apply_masks(&mut pruned, &masks);
            state.model.set_weights(&pruned)?;
            let s = prune::sparsity(&pruned, &names);
            state.masks = Some(masks);
            progress(1, 1);
            Ok(format!(
                "sparsity {:.1}% of {} tensors",
                s * 100.0,
                names.len()
            ))
        }
        Step::PruneNeurons { fraction } => {
            let before: Vec<usize> = state
                .model
                .dense_layers()?
                .iter()
                .map(|l| l.outputs)
                .collect();
            let m = prune::prune_neurons(&state.model, *fraction)?;
            let after: Vec<usize> = m.dense_layers()?.iter().map(|l| l.outputs).collect();
            if after == before {
                return Err(ModelError::Onnx(format!(
                    "fraction {fraction} removes no unit from hidden widths {before:?}"
                )));
            }
            state.after_rewrite(m);
            progress(1, 1);
            Ok(format!("widths {before:?} -> {after:?}"))
        }
        Step::PruneChannels {
            fraction,
            criterion,
            recover,
        } => {
            let inputs = match &ctx.train {
                Some(ds) => calibration_inputs(&state.model, ds, CHANNEL_CALIBRATION_SAMPLES)?,
                None => Vec::new(),
            };
            let before = state.model.clone();
            let (m, report) =
                channels::prune_channels(&before, *fraction, *criterion, &inputs, progress)?;
            let mut note = report.to_string();
            let m = if *recover {
                let (m, r) = reconstruct::reconstruct(&before, &m, &report.kept, &inputs)?;
                note.push_str(&format!("; {r}"));
                m
            } else {
                m
            };
            state.after_rewrite(m);
            progress(1, 1);
            Ok(note)
        }
        Step::PruneLayers { max_drop } => {
            let data = need(&ctx.train, "prune-layers")?;
            let layers = state.model.dense_layers()?;
            if !layers[..layers.len() - 1]
                .iter()
                .any(|l| l.inputs == l.outputs)
            {
                let w: Vec<String> = layers
                    .iter()
                    .map(|l| format!("{}x{}", l.inputs, l.outputs))
                    .collect();
                return Err(ModelError::Onnx(format!(
                    "no hidden layer with equal input and output widths to remove ({})",
                    w.join(", ")
                )));
            }
            let (m, removed) = prune::prune_layers(&state.model, data, *max_drop)?;
            state.after_rewrite(m);
            progress(1, 1);
            Ok(if removed.is_empty() {
                format!("kept every layer: each removal costs > {max_drop} train accuracy")
            } else {
                format!("removed {}", removed.join(", "))
            })
        }
        Step::LowRank { energy, min_saving } => {
            let (m, ranks) = crate::lowrank::low_rank(&state.model, *energy, *min_saving)?;
            if ranks.is_empty() {
                return Err(ModelError::Onnx(format!(
                    "no layer saves >= {min_saving} of its parameters at energy {energy}"
                )));
            }
            state.after_rewrite(m);
            progress(1, 1);
            let r: Vec<String> = ranks.iter().map(|(n, r)| format!("{n}:r{r}")).collect();
            Ok(r.join(" "))
        }
        Step::Finetune { epochs, lr } | Step::Qat { epochs, lr } => {
            let data = need(&ctx.train, "fine-tuning")?;
            let mut loss = f32::NAN;
            for e in 0..*epochs {
                let cfg = state.train_cfg(1, *lr, ctx.seed + u64::from(e));
                let (w, report) = train::train(&state.model, data, &cfg)?;
                state.model.set_weights(&w)?;
                loss = report.final_loss;
                progress(u64::from(e + 1), u64::from(*epochs));
            }
            let mut note = format!("loss {loss:.4}");
            if state.masks.is_some() {
                note.push_str(", masks kept");
            }
            if !state.schemes.is_empty() {
                note.push_str(", fake-quant STE");
            }
            Ok(note)
        }
        Step::Quant { scheme } => {
            let names = weight_names(&state.model);
            for n in &names {
                state.schemes.insert(n.clone(), *scheme);
            }
            progress(1, 1);
            Ok(format!("{} tensors {scheme}", names.len()))
        }
        Step::MixedPrecision { budget } => {
            let data = need(&ctx.train, "mixed-precision")?;
            let candidates: Vec<QuantScheme> = [8u8, 4, 2]
                .iter()
                .map(|&bits| QuantScheme::Symmetric {
                    bits,
                    granularity: Granularity::PerChannel,
                })
                .chain(std::iter::once(QuantScheme::Codebook {
                    bits: 3,
                    kind: CodebookKind::KMeans,
                }))
                .collect();
            let budget = match budget {
                BudgetSpec::SizeBytes(b) => Budget::SizeBytes(*b),
                BudgetSpec::AccuracyFloor(a) => Budget::AccuracyFloor(*a),
            };
            let base = state.deployed()?;
            let plan = mixed::auto_mixed_precision(&base, data, &candidates, budget)?;
            state.schemes = plan.schemes.clone();
            progress(1, 1);
            let l: Vec<String> = plan
                .layers
                .iter()
                .map(|c| match &c.scheme {
                    Some(s) => format!("{}:{s}", c.name),
                    None => format!("{}:f32", c.name),
                })
                .collect();
            Ok(l.join(" "))
        }
        Step::Export { format } => {
            state.export = *format;
            progress(1, 1);
            Ok(String::new())
        }
    }
}

/// Measures an artefact: accuracy on the eval set when the model takes its samples,
/// agreement with `reference` on the eval inputs; `bytes` is the artefact's size.
pub fn measure_artefact(
    a: &Artefact,
    reference: &OnnxModel,
    ctx: &Context,
) -> Result<Measurement, ModelError> {
    let mut m = measure::measure_with(&a.model, ctx.eval.as_ref(), Some(reference), &ctx.measure)?;
    m.bytes = a.bytes.len();
    Ok(m)
}

/// True when tensor `name` is a Sigmoid's output, possibly through shape-only ops.
fn ends_in_sigmoid(model: &OnnxModel, name: &str) -> bool {
    let Some(g) = model.proto().graph.as_ref() else {
        return false;
    };
    let mut cur = name.to_string();
    for _ in 0..=g.node.len() {
        let Some(n) = g.node.iter().find(|n| n.output.first() == Some(&cur)) else {
            return false;
        };
        match n.op_type.as_str() {
            "Sigmoid" => return true,
            "Reshape" | "Squeeze" | "Unsqueeze" | "Flatten" | "Identity" => match n.input.first() {
                Some(i) => cur = i.clone(),
                None => return false,
            },
            _ => return false,
        }
    }
    false
}

/// Measurement options for `model`: classifiers compare every output as is; a model with
/// several outputs compares the per-anchor score outputs (last dimension 1): after a sigmoid
/// (detector logits), or as they are when the graph computes the sigmoid itself.
pub fn default_measure_options(
    model: &OnnxModel,
    latency_runs: usize,
) -> Result<MeasureOptions, ModelError> {
    let mut opts = MeasureOptions {
        latency_runs,
        ..Default::default()
    };
    if !is_mlp(model) {
        let r = GenericRunner::new(model)?;
        let outs = r.run(&vec![0.0; r.input_len()])?;
        if outs.len() > 1 {
            let scores: Vec<String> = outs
                .iter()
                .filter(|o| o.shape.last() == Some(&1))
                .map(|o| o.name.clone())
                .collect();
            if !scores.is_empty() {
                opts.transform = if scores.iter().all(|o| ends_in_sigmoid(model, o)) {
                    OutputTransform::Probability
                } else {
                    OutputTransform::Sigmoid
                };
                opts.agreement_outputs = Some(scores);
            }
        }
    }
    Ok(opts)
}
