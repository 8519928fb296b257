//! `hearth-compress`: compress an ONNX model with a recipe and print the measurement table;
//! `hearth-compress train <task>` trains the model a task file asks for. `--task <task.toml>`
//! (or `--data <dir>` holding one) gives the data for fine-tuning and measurement.
//! A `.tflite` input is translated to ONNX first (`hearth_model::tflite`).
//! Exit status 64 (EX_USAGE) on bad arguments, an unsupported TFLite operator, a recipe that cannot apply, a step that would
//! change nothing, or an op tract cannot run (named before any step runs).
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hearth_compress::pipeline::{default_measure_options, Context};
use hearth_compress::{calib, measure, normalise};
use hearth_compress::{recipe, table, CompressError};
use hearth_model::{train, Dataset, Split, TaskSpec, TrainConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EX_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "hearth-compress",
    version,
    about = "Compress an ONNX model with a recipe; print size, params, non-zeros, accuracy or \
             output agreement, and tract latency for the original and after every step.",
    after_help = recipe::SYNTAX,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    compress: CompressArgs,
}

#[derive(Args, Debug)]
struct CompressArgs {
    /// Input model: ONNX (Hearth's own or imported, e.g.
    /// data/models/face_detection_front_128x128_barracuda.onnx) or TensorFlow Lite (.tflite,
    /// translated to ONNX first; docs/tflite.md lists the operators).
    input: Option<PathBuf>,
    /// Data set directory holding a task.toml (data/plaid, data/gunpoint, …): the same as
    /// `--task <dir>/task.toml`.
    #[arg(long, conflicts_with = "task")]
    data: Option<PathBuf>,
    /// Task file: its train split for fine-tuning and calibration, its test split for accuracy
    /// and agreement inputs (the model must be a model of that task).
    #[arg(long)]
    task: Option<PathBuf>,
    /// Recipe: a .toml file or an inline string (see below).
    #[arg(long)]
    recipe: Option<String>,
    /// Output file (ONNX, or a Hearth package with export:package).
    #[arg(short = 'o', long)]
    output: Option<PathBuf>,
    /// Timed batch-1 runs per latency measurement (median reported).
    #[arg(long, default_value_t = 20)]
    latency_runs: usize,
    /// At most this many eval samples for output agreement.
    #[arg(long, default_value_t = 200)]
    agreement_samples: usize,
    /// Seed of student initialisation and training shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Input shape, comma separated (e.g. 1,3,48,192), for models whose input dimensions the
    /// exporter left symbolic (otherwise symbolic dimensions are taken as 1).
    #[arg(long, value_delimiter = ',')]
    input_shape: Option<Vec<usize>>,
    /// Calibration inputs: an image folder (PNG/JPEG; class sub-folders give labels) or a
    /// .npy file of inputs, prepared for the model's input (resized, normalised, laid out).
    /// They feed int8 calibration, channel sensitivity and least-squares recovery, and are the
    /// agreement inputs when no --task/--data is given. Overrides the recipe's [calibration].
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Per-channel mean subtracted from images scaled to [0, 1] (e.g. 0.485,0.456,0.406).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    calib_mean: Option<Vec<f32>>,
    /// Per-channel standard deviation divided by (e.g. 0.229,0.224,0.225).
    #[arg(long, value_delimiter = ',')]
    calib_std: Option<Vec<f32>>,
    /// Layout of the model's image input (default: NCHW when dimension 1 is 1 or 3, else NHWC
    /// when the last dimension is at most 4).
    #[arg(long, value_parser = ["nchw", "nhwc"])]
    calib_layout: Option<String>,
    /// At most this many calibration samples.
    #[arg(long)]
    calib_limit: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train the model a task file asks for and write it as ONNX.
    Train {
        /// A task file (path to a .toml), or the name of a set in --data-dir
        /// (`<data-dir>/<name>/task.toml`: plaid, faces, digits, gunpoint, basicmotions).
        task: String,
        /// Output ONNX file.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Directory holding the data sets (for a task given by name).
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Hidden widths, comma separated (default: the shipped spec of the task).
        #[arg(long, value_delimiter = ',')]
        hidden: Option<Vec<usize>>,
        /// Epochs.
        #[arg(long, default_value_t = 20)]
        epochs: u32,
        /// Learning rate.
        #[arg(long, default_value_t = 0.01)]
        lr: f32,
        /// Seed (weights and shuffles).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    CompressError::Usage(msg.into()).into()
}

/// Loads a task file; any problem with it or its data is a usage error (exit 64). With
/// `model`, a feature front end (MiniRocket) is the one the model carries, not a new fit.
fn load_task(
    path: &Path,
    model: Option<&hearth_model::OnnxModel>,
) -> anyhow::Result<(TaskSpec, Dataset, Dataset)> {
    let mut spec = TaskSpec::from_file(path).map_err(|e| usage(e.to_string()))?;
    if let Some(m) = model {
        spec = spec.with_model(m).map_err(|e| usage(e.to_string()))?;
    }
    let load = |split| spec.load(split).map_err(|e| usage(e.to_string()));
    let (train_set, test_set) = (load(Split::Train)?, load(Split::Test)?);
    Ok((spec, train_set, test_set))
}

fn cmd_train(
    task: &str,
    output: &Path,
    data_dir: &Path,
    hidden: Option<Vec<usize>>,
    epochs: u32,
    lr: f32,
    seed: u64,
) -> anyhow::Result<()> {
    let path = if task.ends_with(".toml") || Path::new(task).is_file() {
        PathBuf::from(task)
    } else {
        data_dir.join(task).join("task.toml")
    };
    let (task_spec, train_set, test_set) = load_task(&path, None)?;
    let task = &task_spec.name;
    let mut spec = task_spec.mlp_spec();
    if let Some(h) = hidden {
        if h.contains(&0) {
            return Err(usage("--hidden widths must be > 0"));
        }
        spec.hidden = h;
    }
    let mut model = hearth_model::OnnxModel::build_mlp(&spec, seed);
    task_spec
        .stamp(&mut model)
        .map_err(|e| usage(e.to_string()))?;
    let cfg = TrainConfig {
        epochs,
        learning_rate: lr,
        seed,
        weight_decay: task_spec.weight_decay(),
        ..Default::default()
    };
    let (w, report) = train(&model, &train_set, &cfg)?;
    model.set_weights(&w)?;
    model.save(output)?;
    let m = measure::measure(&model, Some(&test_set), None, 20)?;
    println!(
        "trained {task} {:?}: {} epochs, final loss {:.4}, test accuracy {:.4}, {} params, {} bytes -> {}",
        spec.hidden,
        report.epochs,
        report.final_loss,
        m.accuracy.unwrap_or(f32::NAN),
        m.params,
        m.bytes,
        output.display()
    );
    Ok(())
}

/// Reads the input model: ONNX, or a TensorFlow Lite flatbuffer (recognised by its `TFL3`
/// identifier) translated to ONNX first; an operator the translation lacks is named, exit 64.
fn load_input(input: &Path) -> anyhow::Result<hearth_model::OnnxModel> {
    use hearth_model::tflite::{self, TfliteError};
    let bytes = std::fs::read(input).map_err(|e| usage(format!("{}: {e}", input.display())))?;
    if !tflite::is_tflite(&bytes) {
        return hearth_model::OnnxModel::from_bytes(&bytes)
            .map_err(|e| usage(format!("{}: {e}", input.display())));
    }
    match tflite::to_onnx(&bytes) {
        Ok((model, r)) => {
            let ops: Vec<String> = r.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
            eprintln!(
                "note: translated TFLite {} to ONNX: {} ({} float16 and {} int8 weight tensors \
                 folded to float32, {} parameters)",
                input.display(),
                ops.join(", "),
                r.folded_f16,
                r.folded_int8,
                r.params
            );
            Ok(model)
        }
        Err(TfliteError::Unsupported(m)) => Err(CompressError::Unsupported(format!(
            "{}: unsupported TFLite operator {m}; nothing was compressed",
            input.display()
        ))
        .into()),
        Err(e) => Err(usage(format!("{}: {e}", input.display()))),
    }
}

fn cmd_compress(a: CompressArgs) -> anyhow::Result<()> {
    let input = a
        .input
        .ok_or_else(|| usage("missing <INPUT> model (see --help)"))?;
    let recipe_arg = a
        .recipe
        .ok_or_else(|| usage("missing --recipe <file.toml | inline steps> (see --help)"))?;
    let output = a.output.ok_or_else(|| usage("missing -o <output>"))?;
    let steps = recipe::parse_recipe_arg(&recipe_arg)?;
    if a.latency_runs == 0 {
        return Err(usage("--latency-runs must be >= 1"));
    }
    let raw = load_input(&input)?;
    let (mut model, fixed) = measure::fix_constant_of_shape(&raw)?;
    if fixed > 0 {
        eprintln!("note: gave {fixed} ConstantOfShape node(s) an explicit f32 zero value (tract)");
    }
    if let Some(shape) = &a.input_shape {
        if shape.is_empty() || shape.contains(&0) {
            return Err(usage("--input-shape dimensions must be >= 1"));
        }
        model = normalise::pin_input_shape(&model, shape).map_err(|e| usage(e.to_string()))?;
    }
    // Ops tract cannot run are named before any step (exit 64).
    let missing = normalise::unsupported_ops(&model);
    if !missing.is_empty() {
        let ops: Vec<String> = missing
            .iter()
            .map(|(op, node)| format!("{op} (node {node:?})"))
            .collect();
        return Err(CompressError::Unsupported(format!(
            "{}: tract cannot run op {}; nothing was compressed",
            input.display(),
            ops.join(", ")
        ))
        .into());
    }
    let task_file = a.task.or_else(|| a.data.map(|dir| dir.join("task.toml")));
    let (train_set, eval_set) = match &task_file {
        Some(path) => {
            let (spec, train_set, test_set) = load_task(path, Some(&model))?;
            if let Some(t) = model.task() {
                if t != spec.name {
                    return Err(usage(format!(
                        "the model is a {t} model, {} is the {} task",
                        path.display(),
                        spec.name
                    )));
                }
            }
            (Some(train_set), Some(test_set))
        }
        None => (None, None),
    };
    // Calibration data: the CLI's options over the recipe's [calibration].
    let mut calib = steps.calibration.clone();
    if let Some(src) = &a.calib {
        calib = Some(calib::CalibSpec {
            source: src.clone(),
            ..calib.unwrap_or_else(|| calib::CalibSpec::new(src.clone()))
        });
    }
    let calib_opts = a.calib_mean.is_some()
        || a.calib_std.is_some()
        || a.calib_layout.is_some()
        || a.calib_limit.is_some();
    if calib_opts && calib.is_none() {
        return Err(usage(
            "--calib-mean/--calib-std/--calib-layout/--calib-limit need --calib <folder|file.npy> \
             (or [calibration] in the recipe)",
        ));
    }
    let (train_set, eval_set) = match calib.as_mut() {
        Some(spec) => {
            if let Some(v) = &a.calib_mean {
                spec.mean = v.clone();
            }
            if let Some(v) = &a.calib_std {
                spec.std = v.clone();
            }
            if let Some(l) = &a.calib_layout {
                spec.layout = Some(l.parse().map_err(usage)?);
            }
            if let Some(n) = a.calib_limit {
                if n == 0 {
                    return Err(usage("--calib-limit must be >= 1"));
                }
                spec.limit = n;
            }
            let shape = measure::input_shape(&model).map_err(|e| usage(e.to_string()))?;
            let set = calib::load(spec, &shape).map_err(|e| usage(e.to_string()))?;
            eprintln!(
                "calibration: {} samples from {}{}",
                set.len(),
                spec.source.display(),
                if set.classes.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} classes: {})",
                        set.classes.len(),
                        set.classes.join(", ")
                    )
                }
            );
            let eval = eval_set.or_else(|| Some(set.clone()));
            (Some(set), eval)
        }
        None => (train_set, eval_set),
    };
    let mut opts = default_measure_options(&model, a.latency_runs).map_err(|e| {
        CompressError::Unsupported(format!(
            "{}: tract cannot run this model ({e}); if its input has symbolic dimensions, \
             pass --input-shape",
            input.display()
        ))
    })?;
    opts.max_agreement_samples = a.agreement_samples.max(1);
    let ctx = Context {
        train: train_set,
        eval: eval_set,
        measure: opts,
        seed: a.seed,
    };
    let (rows, artefact) = hearth_compress::run(&model, &steps, &ctx)?;
    std::fs::write(&output, &artefact.bytes)
        .with_context(|| format!("writing {}", output.display()))?;
    if let Some(outs) = &ctx.measure.agreement_outputs {
        println!(
            "agreement: {} of the outputs {} vs the original, {} eval inputs",
            match ctx.measure.transform {
                measure::OutputTransform::Sigmoid => "sigmoid",
                measure::OutputTransform::Probability => "probabilities (score > 0.5)",
                measure::OutputTransform::Identity => "raw values",
            },
            outs.join(", "),
            ctx.eval.as_ref().map_or(
                ctx.measure
                    .max_agreement_samples
                    .clamp(1, measure::PROBE_INPUTS),
                |d| d.len().min(ctx.measure.max_agreement_samples)
            )
        );
    }
    print!("{}", table::render(&rows));
    println!(
        "wrote {} ({} bytes)",
        output.display(),
        artefact.bytes.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.cmd {
        Some(Cmd::Train {
            task,
            output,
            data_dir,
            hidden,
            epochs,
            lr,
            seed,
        }) => cmd_train(&task, &output, &data_dir, hidden, epochs, lr, seed),
        None => cmd_compress(cli.compress),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth-compress: {e:#}");
            let is_usage = e
                .downcast_ref::<CompressError>()
                .is_some_and(CompressError::is_usage);
            ExitCode::from(if is_usage { EX_USAGE } else { 1 })
        }
    }
}
