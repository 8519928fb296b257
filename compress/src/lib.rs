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
//! The CLI chains steps (distillation, pruning, low-rank, fine-tuning, quantization, mixed
//! precision, QAT, export) on an ONNX model — Hearth's own classifiers or imported graphs such
//! as BlazeFace — and measures the original and every step: [`pipeline`], [`recipe`],
//! [`table`]. The binary (`src/main.rs`) only parses arguments; everything runs through
//! [`run`].
#![forbid(unsafe_code)]

pub mod codebook;
pub mod distill;
pub mod lowrank;
pub mod measure;
pub mod mixed;
pub mod package;
pub mod prune;
pub mod qconv;
pub mod qonnx;
pub mod quant;

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
pub use recipe::{parse_inline, parse_recipe_arg, parse_toml, Step, SYNTAX};

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

/// Runs `steps` on `model`: measures the original, applies each step (with a progress bar on
/// stderr), measures the deployed model after each, and returns the table rows and the final
/// artefact (per the last export step; float ONNX by default).
pub fn run(
    model: &hearth_model::OnnxModel,
    steps: &[Step],
    ctx: &Context,
) -> Result<(Vec<Row>, Artefact), CompressError> {
    pipeline::check_applicable(model, steps, ctx)?;
    let mut state = State::new(model.clone());
    let pb = bar("measure original");
    let original = state.artefact(ctx)?;
    let m0 = pipeline::measure_artefact(&original, model, ctx)?;
    pb.finish_and_clear();
    let mut rows = vec![Row {
        label: "original".into(),
        m: m0,
        note: String::new(),
    }];
    let mut artefact = original;
    for (i, step) in steps.iter().enumerate() {
        let pb = bar(&format!("[{}/{}] {step}", i + 1, steps.len()));
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
        pb.set_message(format!("[{}/{}] measure", i + 1, steps.len()));
        artefact = state.artefact(ctx).map_err(|source| CompressError::Step {
            step: i + 1,
            kind: step.kind(),
            source,
        })?;
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
