//! Hearth's compression toolkit and the `hearth-compress` CLI.
//!
//! The toolkit (synchronous, on `hearth-model`'s ONNX template and trainer): [`quant`]
//! (tensor schemes: affine/symmetric, per tensor/channel, power-of-two), [`codebook`]
//! (Gaussian quantile, k-means), [`mixed`] (per-layer sensitivity search, QAT), [`prune`]
//! (magnitude, sensitivity, structured neurons, layers, iterative), [`lowrank`] (SVD),
//! [`distill`], [`qonnx`] / [`qconv`] (int8 QOperator export of MLPs and of imported conv
//! graphs), [`package`] (Hearth's compact sparse/low-bit package) and [`measure`] (size,
//! parameters, non-zeros, accuracy or agreement, latency).
//!
//! Every recipe starts with [`normalise`]: graphs as exporters write them (weights in
//! `Constant` nodes, unfused BatchNormalization, Identity chains) are rewritten to the form the
//! steps expect, checked in tract to give the same outputs.
//!
//! The CLI chains steps (distillation, pruning, low-rank, fine-tuning, quantization, mixed
//! precision, QAT, export) on an ONNX model — Hearth's own classifiers or imported graphs such
//! as BlazeFace — and measures the original and every step: [`pipeline`], [`recipe`],
//! [`table`]. The binary (`src/main.rs`) only parses arguments; everything runs through
//! [`run`].
#![forbid(unsafe_code)]

pub mod calib;
pub mod channels;
pub mod codebook;
pub mod distill;
pub mod lowrank;
pub mod measure;
pub mod mixed;
pub mod normalise;
pub mod package;
pub mod prune;
pub mod qconv;
pub mod qonnx;
pub mod quant;
pub mod reconstruct;

pub mod error;
pub mod pipeline;
pub mod recipe;
pub mod table;

pub use codebook::{fit_codebook, gaussian_quantile_levels, kmeans_levels, CodebookKind};
pub use distill::{distill, teacher_logits};
pub use lowrank::{low_rank, rank_for_energy, svd};
pub use measure::{
    fix_constant_of_shape, load_for_tract, measure, measure_with, Agreement, GenericRunner,
    MeasureOptions, Measurement, OutputTransform,
};
pub use mixed::{
    auto_mixed_precision, layer_sensitivity, qat_finetune, uniform_plan, Budget, LayerChoice,
    LayerSensitivity, MixedPlan,
};
pub use package::{decode_package, encode_package, Schemes};
pub use prune::{
    apply_masks, gemm_weight_names, iterative_prune, magnitude_masks, prune_layers, prune_neurons,
    sensitivity_masks, sparsity,
};
pub use qonnx::{export_int8, export_int8_with, plan_uses_integer_kernels, Int8Options};
pub use quant::{
    fake_quantize, quantize_tensor, scheme_bits, scheme_bytes, Granularity, QuantScheme,
    QuantizedTensor,
};

pub use error::CompressError;
pub use pipeline::{Artefact, Context, Row, State};
pub use recipe::{parse_inline, parse_recipe_arg, parse_toml, Recipe, Step, SYNTAX};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::Duration;

fn bar(label: &str) -> ProgressBar {
    // stderr target: indicatif hides it when stderr is not a terminal.
    let pb = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg:<32} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(label.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Inputs the normalisation check compares on: up to this many calibration inputs, plus as
/// many reproducible random ones.
const NORMALISE_CHECK_INPUTS: usize = 4;

/// The inputs [`normalise::check_equivalence`] runs: the first calibration samples (when the
/// train split fits the model's input) and reproducible uniform [-1, 1] inputs.
fn normalise_check_inputs(model: &hearth_model::OnnxModel, ctx: &Context) -> Vec<Vec<f32>> {
    let Ok(shape) = measure::input_shape(model) else {
        return Vec::new();
    };
    let mut inputs = Vec::new();
    if let Some(ds) = &ctx.train {
        let n = ds.len().min(NORMALISE_CHECK_INPUTS);
        let idx: Vec<usize> = (0..n).collect();
        if let Ok(v) = measure::adapt_inputs(&ds.subset(&idx), &shape) {
            inputs.extend(v);
        }
    }
    inputs.extend(normalise::probe_inputs(
        &shape,
        NORMALISE_CHECK_INPUTS,
        ctx.seed,
    ));
    inputs
}

/// Runs `recipe` on `model`: measures the original, normalises the graph ([`normalise`]:
/// checked to give the same outputs, a row of its own), applies each step on the normalised
/// model (with a progress bar on stderr), measures the deployed model after each against the
/// original, and returns the table rows and the final artefact (per the last export step;
/// float ONNX by default). A step that would change nothing is an error
/// ([`CompressError::NoOp`]) unless the recipe allows it, and is then skipped.
pub fn run(
    model: &hearth_model::OnnxModel,
    recipe: &Recipe,
    ctx: &Context,
) -> Result<(Vec<Row>, Artefact), CompressError> {
    let pb = bar("measure original");
    let original = State::new(model.clone()).artefact(ctx)?;
    let m0 = pipeline::measure_artefact(&original, model, ctx)?;
    pb.finish_and_clear();
    let mut rows = vec![Row {
        label: "original".into(),
        m: m0,
        note: String::new(),
    }];

    let pb = bar("normalise");
    let (normalised, report) = normalise::normalise(model)?;
    let inputs = normalise_check_inputs(model, ctx);
    let eq = normalise::check_equivalence(model, &normalised, &inputs)?;
    if !eq.ok() {
        return Err(CompressError::Normalise(format!(
            "max abs diff {:.3e} > tolerance {:.3e} over {} inputs ({report})",
            eq.max_abs_diff,
            eq.tolerance(),
            eq.inputs
        )));
    }
    pipeline::check_applicable(&normalised, recipe, ctx)?;
    let mut state = State::new(normalised);
    let mut artefact = state.artefact(ctx)?;
    let m = pipeline::measure_artefact(&artefact, model, ctx)?;
    pb.finish_and_clear();
    rows.push(Row {
        label: "normalise".into(),
        m,
        note: format!(
            "{report}; max abs diff {:.2e} on {} inputs",
            eq.max_abs_diff, eq.inputs
        ),
    });

    for (i, step) in recipe.iter().enumerate() {
        let allowed = recipe.noop_allowed(i);
        if let Some(reason) = pipeline::noop_reason(&state, step) {
            if !allowed {
                return Err(CompressError::NoOp {
                    step: i + 1,
                    kind: step.kind(),
                    reason,
                });
            }
            rows.push(Row {
                label: format!("{step}?"),
                m: rows.last().expect("rows").m.clone(),
                note: format!("skipped: {reason}"),
            });
            continue;
        }
        let pb = bar(&format!("[{}/{}] {step}", i + 1, recipe.len()));
        let progress = |done: u64, total: u64| {
            pb.set_length(total.max(1));
            pb.set_position(done);
        };
        let note = pipeline::apply_step(&mut state, step, ctx, &progress).map_err(|source| {
            CompressError::Step {
                step: i + 1,
                kind: step.kind(),
                source,
            }
        })?;
        pb.set_message(format!("[{}/{}] measure", i + 1, recipe.len()));
        let next = state.artefact(ctx).map_err(|source| CompressError::Step {
            step: i + 1,
            kind: step.kind(),
            source,
        })?;
        if !allowed && pipeline::must_change_artefact(step) && next.bytes == artefact.bytes {
            pb.finish_and_clear();
            return Err(CompressError::NoOp {
                step: i + 1,
                kind: step.kind(),
                reason: format!("the model is byte-identical to the one before it ({note})"),
            });
        }
        artefact = next;
        let m = pipeline::measure_artefact(&artefact, model, ctx)?;
        pb.finish_and_clear();
        rows.push(Row {
            label: step.to_string(),
            m,
            note,
        });
    }
    Ok((rows, artefact))
}
