//! `bench-compress`: the Hearth side of `bench/compress`.
//!
//! For each task (PLAID, faces, digits) it trains Hearth's MLP with fixed seeds, writes the
//! fp32 ONNX file that both engines start from, the test inputs and labels and the
//! calibration inputs (train split) as `.npy`, builds Hearth's compressed variants (int8
//! QOperator export, best compact recipe, 50 % structured neuron pruning) and measures size,
//! test accuracy and latency (single thread) of each at batch 1 (`predict`: Hearth's dense
//! engine where it applies, and the same model through tract's plan side by side) and per
//! sample at batch 64 (`predict_batch`, tract). Results go to
//! `<work>/hearth.json`, read by `bench/ort_side.py`.

use anyhow::{Context, Result};
use clap::Parser;
use hearth_bench::profile::{self, PlanProfile};
use hearth_bench::report::{HearthResults, Missing, TaskResult, Variant};
use hearth_bench::{npy, timing};
use hearth_compress::codebook::CodebookKind;
use hearth_compress::package::{self, Schemes};
use hearth_compress::quant::{fake_quantize, QuantScheme};
use hearth_compress::{prune, qonnx};
use hearth_model::TrainConfig;
use hearth_model::{accuracy, train, Classifier, Dataset, Engine, MlpSpec, OnnxModel, Split, Task};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Hearth side of bench/compress: train, compress, measure in tract")]
struct Args {
    /// Data directory (data/<task>/{train,test}.csv).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Work directory for models, inputs and hearth.json.
    #[arg(long, default_value = "target/bench-compress")]
    work: PathBuf,
    /// Tasks to run.
    #[arg(long, value_delimiter = ',', default_value = "plaid,faces,digits")]
    tasks: Vec<Task>,
    /// Hidden layer widths of every model.
    #[arg(long, value_delimiter = ',', default_value = "256,128")]
    hidden: Vec<usize>,
    /// Training epochs of the fp32 model.
    #[arg(long, default_value_t = 60)]
    epochs: u32,
    /// Seed of initial weights and shuffles.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Untimed calls before each latency measurement.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// Timed batch-1 calls per latency figure.
    #[arg(long, default_value_t = 3000)]
    runs: usize,
    /// Rows per call of the batched latency figure.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Untimed batched calls before each batched latency measurement.
    #[arg(long, default_value_t = 50)]
    batch_warmup: usize,
    /// Timed batched calls per batched latency figure.
    #[arg(long, default_value_t = 1000)]
    batch_runs: usize,
    /// Global weight sparsity of the best compact recipe.
    #[arg(long, default_value_t = 0.85)]
    best_sparsity: f32,
    /// Codebook bits of the best compact recipe.
    #[arg(long, default_value_t = 4)]
    best_bits: u8,
    /// Fine-tuning epochs per step (pruning, QAT, neuron pruning).
    #[arg(long, default_value_t = 10)]
    finetune_epochs: u32,
    /// Build profile name recorded in the results.
    #[arg(long, default_value = if cfg!(debug_assertions) { "dev" } else { "release" })]
    build_profile: String,
}

fn layers_label(spec: &MlpSpec) -> String {
    let mut w = vec![spec.input_len];
    w.extend(&spec.hidden);
    w.push(spec.classes.len());
    w.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join("-")
}

fn stats(m: &OnnxModel) -> (usize, usize) {
    let w = m.weights();
    let params = w.values().map(|t| t.data.len()).sum();
    let nz = w
        .values()
        .map(|t| t.data.iter().filter(|v| **v != 0.0).count())
        .sum();
    (params, nz)
}

struct Ctx<'a> {
    args: &'a Args,
    work: &'a Path,
    test: &'a Dataset,
}

impl Ctx<'_> {
    /// Measures a model whose size on disk is `bytes` (the file `file`).
    #[allow(clippy::too_many_arguments)]
    fn measure(
        &self,
        key: &str,
        label: &str,
        model: &OnnxModel,
        file: &str,
        recipe: &str,
        params_nz: Option<(usize, usize)>,
    ) -> Result<Variant> {
        let bytes = std::fs::metadata(self.work.join(file))
            .with_context(|| format!("size of {file}"))?
            .len() as usize;
        let c = Classifier::new(model).with_context(|| format!("load {label}"))?;
        let acc = accuracy(&c, self.test)?;
        let lat = timing::classifier_latency(&c, &self.test.x, self.args.warmup, self.args.runs)?;
        let engine = c.engine();
        // The same model through tract's plan, for the side-by-side batch-1 figure.
        let lat_tract = match engine {
            Engine::Tract => None,
            _ => {
                let t = Classifier::with_engine(model, Engine::Tract)
                    .with_context(|| format!("load {label} in tract"))?;
                Some(timing::classifier_latency(
                    &t,
                    &self.test.x,
                    self.args.warmup,
                    self.args.runs,
                )?)
            }
        };
        let lat_b = timing::classifier_batch_latency(
            &c,
            &self.test.x,
            self.args.batch,
            self.args.batch_warmup,
            self.args.batch_runs,
        )?;
        let (params, nonzeros) = params_nz.unwrap_or_else(|| stats(model));
        let batch_dim = timing::input_batch_dim(model).unwrap_or_else(|| "?".into());
        eprintln!(
            "  {label:<28} {bytes:>9} B  acc {acc:.4}  median {:.2} µs ({engine}{})  batch {} ({batch_dim}): {:.3} µs/sample",
            lat.median_us,
            lat_tract
                .as_ref()
                .map(|l| format!("; tract {:.2} µs", l.median_us))
                .unwrap_or_default(),
            lat_b.batch,
            lat_b.per_sample.median_us
        );
        Ok(Variant {
            key: key.into(),
            label: label.into(),
            file: file.into(),
            bytes,
            params,
            nonzeros,
            accuracy: acc,
            latency: lat,
            engine: engine.to_string(),
            latency_tract: lat_tract,
            latency_batch: lat_b,
            batch_dim,
            recipe: recipe.into(),
        })
    }
}

/// Number of int8 weight values of a QOperator model (its int8 initializers).
fn int8_stats(m: &OnnxModel) -> (usize, usize) {
    use tract_onnx::pb::tensor_proto::DataType;
    let Some(g) = m.proto().graph.as_ref() else {
        return (0, 0);
    };
    let (mut params, mut nz) = (0, 0);
    for t in &g.initializer {
        if t.data_type == DataType::Int8 as i32 {
            params += t.raw_data.len();
            nz += t.raw_data.iter().filter(|b| **b != 0).count();
        } else if t.data_type == DataType::Float as i32 {
            let n = t.raw_data.len() / 4 + t.float_data.len();
            params += n;
            nz += n;
        }
    }
    (params, nz)
}

/// Records a variant, or why it could not be produced (the run goes on with the others).
fn push_or_missing(
    variants: &mut Vec<Variant>,
    missing: &mut Vec<Missing>,
    key: &str,
    label: &str,
    row: Result<Variant>,
) {
    match row {
        Ok(v) => variants.push(v),
        Err(e) => {
            eprintln!("  {label}: MISSING: {e:#}");
            missing.push(Missing {
                key: key.into(),
                label: label.into(),
                error: format!("{e:#}"),
            });
        }
    }
}

fn run_task(args: &Args, task: Task) -> Result<TaskResult> {
    let t0 = Instant::now();
    let name = task.to_string();
    let work = args.work.clone();
    let train_ds = task
        .load(&args.data, Split::Train)
        .with_context(|| format!("load {name} train"))?;
    let test = task
        .load(&args.data, Split::Test)
        .with_context(|| format!("load {name} test"))?;
    let spec = MlpSpec {
        hidden: args.hidden.clone(),
        ..task.default_spec()
    };
    eprintln!(
        "{name}: {} train / {} test, MLP {}",
        train_ds.len(),
        test.len(),
        layers_label(&spec)
    );

    // Shared inputs for the ONNX Runtime side.
    let n_in = train_ds.input_len;
    let f = |s: &str| format!("{name}_{s}");
    npy::write_f32(&work.join(f("test_x.npy")), &[test.len(), n_in], &test.x)?;
    let labels: Vec<i64> = test.y.iter().map(|&y| i64::from(y)).collect();
    npy::write_i64(&work.join(f("test_y.npy")), &[test.len()], &labels)?;
    npy::write_f32(
        &work.join(f("calib_x.npy")),
        &[train_ds.len(), n_in],
        &train_ds.x,
    )?;

    // fp32: the model both engines start from.
    let init = OnnxModel::build_mlp(&spec, args.seed);
    let cfg = TrainConfig {
        epochs: args.epochs,
        seed: args.seed,
        ..Default::default()
    };
    let (w, rep) = train(&init, &train_ds, &cfg)?;
    let mut fp32 = init.clone();
    fp32.set_weights(&w)?;
    fp32.save(&work.join(f("fp32.onnx")))?;
    eprintln!(
        "  trained {} epochs (loss {:.4}) in {:.1?}",
        rep.epochs,
        rep.final_loss,
        t0.elapsed()
    );
    let ctx = Ctx {
        args,
        work: &work,
        test: &test,
    };
    let mut variants = vec![ctx.measure(
        "fp32",
        "fp32 (Hearth)",
        &fp32,
        &f("fp32.onnx"),
        &format!(
            "SGD momentum 0.9, lr {}, batch {}, {} epochs, seed {}",
            cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.seed
        ),
        None,
    )?];

    // Hearth int8 (QOperator, per-layer weight scales, activations calibrated on the train split).
    let int8 = qonnx::export_int8(&fp32, &train_ds)?;
    int8.save(&work.join(f("hearth_int8.onnx")))?;
    let integer = qonnx::plan_uses_integer_kernels(&int8)?;
    variants.push(ctx.measure(
        "hearth_int8",
        "Hearth int8",
        &int8,
        &f("hearth_int8.onnx"),
        "qonnx::export_int8: QLinearConv(k=1) chain, int8 activations end to end, int32 bias, per-layer weight scales, static activation scales (train-split min/max)",
        Some(int8_stats(&int8)),
    )?);

    let tune = TrainConfig {
        epochs: args.finetune_epochs,
        seed: args.seed + 1,
        ..Default::default()
    };
    let mut missing = Vec::new();
    let best_row = (|| -> Result<Variant> {
        // Hearth's best compact recipe: iterative magnitude pruning with masked fine-tuning,
        // then k-means codebooks on every Gemm weight with quantization-aware fine-tuning
        // (masks kept), packed as a Hearth package (sparse + low-bit) and decoded for tract.

        let (sparse, masks) =
            prune::iterative_prune(&fp32, &train_ds, args.best_sparsity, 4, &tune)?;
        let names = prune::gemm_weight_names(&sparse)?;
        let scheme = QuantScheme::Codebook {
            bits: args.best_bits,
            kind: CodebookKind::KMeans,
        };
        let schemes: Schemes = names.iter().map(|n| (n.clone(), scheme)).collect();
        let fq_schemes = schemes.clone();
        let qat = TrainConfig {
            masks: Some(masks.clone()),
            fake_quant: Some(Arc::new(
                move |name: &str, t: &hearth_model::Tensor| match fq_schemes.get(name) {
                    Some(s) => fake_quantize(t, s),
                    None => t.clone(),
                },
            )),
            learning_rate: tune.learning_rate / 2.0,
            seed: args.seed + 2,
            ..tune.clone()
        };
        let (qw, _) = train(&sparse, &train_ds, &qat)?;
        let mut tuned = sparse.clone();
        tuned.set_weights(&qw)?;
        let pkg = package::encode_package(&tuned, &schemes, Some(&masks))?;
        std::fs::write(work.join(f("hearth_best.hpkg")), &pkg)?;
        let best = package::decode_package(&pkg)?;
        best.save(&work.join(f("hearth_best_decoded.onnx")))?;
        let (bp, bnz) = stats(&best);
        ctx.measure(
            "hearth_best",
            "Hearth best (package)",
            &best,
            &f("hearth_best.hpkg"),
            &format!(
                "iterative_prune to {:.0}% global sparsity (4 steps × {} epochs masked fine-tune) → \
                 k-means {}-bit codebook per Gemm weight + QAT ({} epochs, masks kept) → \
                 encode_package (sparse + low-bit); latency/accuracy on decode_package's ONNX in tract",
                100.0 * args.best_sparsity,
                tune.epochs,
                args.best_bits,
                qat.epochs
            ),
            Some((bp, bnz)),
        )
    })();
    push_or_missing(
        &mut variants,
        &mut missing,
        "hearth_best",
        "Hearth best (package)",
        best_row,
    );
    let pruned_row = (|| -> Result<Variant> {
        // 50 % structured neuron pruning (graph rewrite: half the hidden units), fine-tuned.
        let mut pruned = prune::prune_neurons(&fp32, 0.5)?;
        let (pw, _) = train(
            &pruned,
            &train_ds,
            &TrainConfig {
                seed: args.seed + 3,
                ..tune.clone()
            },
        )?;
        pruned.set_weights(&pw)?;
        pruned.save(&work.join(f("pruned50.onnx")))?;
        let pruned_layers = pruned
            .dense_layers()?
            .iter()
            .map(|l| l.outputs.to_string())
            .collect::<Vec<_>>()
            .join("-");
        ctx.measure(
            "pruned50",
            "pruned 50% neurons",
            &pruned,
            &f("pruned50.onnx"),
            &format!(
                "prune_neurons(0.5) by incoming-row L1 → {}-{pruned_layers}, fine-tuned {} epochs",
                spec.input_len, tune.epochs
            ),
            None,
        )
    })();
    push_or_missing(
        &mut variants,
        &mut missing,
        "pruned50",
        "pruned 50% neurons",
        pruned_row,
    );

    let prof_runs = (args.runs / 3).max(100);
    let profile_fp32: Option<PlanProfile> = Some(profile::profile(&fp32, &test.x, prof_runs)?);
    let profile_int8: Option<PlanProfile> = Some(profile::profile(&int8, &test.x, prof_runs)?);
    eprintln!("  {name} done in {:.1?}", t0.elapsed());
    Ok(TaskResult {
        task: name.clone(),
        layers: layers_label(&spec),
        train_len: train_ds.len(),
        test_len: test.len(),
        fp32_onnx: f("fp32.onnx"),
        test_x: f("test_x.npy"),
        test_y: f("test_y.npy"),
        calib_x: f("calib_x.npy"),
        variants,
        missing,
        profile_fp32,
        profile_int8,
        int8_integer_kernels: Some(integer),
    })
}

fn main() -> Result<()> {
    // Bad flags exit 64 (EX_USAGE) like every Hearth binary; --help/--version exit 0.
    let args = Args::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        let help = matches!(
            e.kind(),
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
        );
        std::process::exit(if help { 0 } else { 64 })
    });
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("create {}", args.work.display()))?;
    let mut tasks = Vec::new();
    for &task in &args.tasks {
        tasks.push(run_task(&args, task)?);
    }
    let floor_c = Classifier::new(&timing::floor_model(10)?)?;
    let floor_x: Vec<f32> = (0..160).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
    let floor = timing::classifier_latency(&floor_c, &floor_x, args.warmup, args.runs)?;
    let floor_batch = timing::classifier_batch_latency(
        &floor_c,
        &floor_x,
        args.batch,
        args.batch_warmup,
        args.batch_runs,
    )?;
    eprintln!(
        "floor (Softmax-only model): median {:.2} µs, batch {}: {:.3} µs/sample",
        floor.median_us, floor_batch.batch, floor_batch.per_sample.median_us
    );
    let out = HearthResults {
        floor,
        tract: "0.23.9".into(),
        profile: args.build_profile.clone(),
        threads: 1,
        warmup: args.warmup,
        runs: args.runs,
        batch: args.batch,
        batch_warmup: args.batch_warmup,
        batch_runs: args.batch_runs,
        floor_batch,
        tasks,
    };
    let path = args.work.join("hearth.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
