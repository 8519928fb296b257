//! `bench-accuracy`: the Hearth side of `bench/accuracy`.
//!
//! For every task file it trains the task's model family centrally and federated (the demo's
//! partitions: 3 clients, Dirichlet 0.5, seed 42, 10 local epochs at lr 0.01, 8-bit updates
//! through the real codec, FedAvg in process: [`hearth_model::fedsim`]), measures held-out
//! accuracy, the model's size as float ONNX and after Hearth's int8 export (with its
//! accuracy), and the per-window latency of the whole device path (front end + head), and
//! writes the windows a reference classifier sees (the chain up to the feature front end)
//! as `.npy` for `bench/accuracy/aeon_side.py`. Results go to `<work>/hearth.json`.

use anyhow::{Context, Result};
use clap::Parser;
use hearth_bench::npy;
use hearth_compress::qonnx;
use hearth_model::fedsim::{self, FedSim};
use hearth_model::{accuracy, Classifier, Split, TaskSpec, TrainConfig};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Hearth side of bench/accuracy: central vs federated accuracy and size per task")]
struct Args {
    /// Data directory (`data/<task>/task.toml`).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Work directory for the windows and hearth.json.
    #[arg(long, default_value = "target/bench-accuracy")]
    work: PathBuf,
    /// Tasks (names in the data directory, or task files).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plaid,gunpoint,data/gunpoint/minirocket.toml,basicmotions,data/basicmotions/minirocket.toml,faces,digits"
    )]
    tasks: Vec<String>,
    /// Federated rounds (central training gets rounds × local epochs).
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Local epochs per round.
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Seed of the model's initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Serialize)]
struct Row {
    task: String,
    family: String,
    train: usize,
    test: usize,
    inputs: usize,
    /// Windows written for the reference (absent for image / vector tasks).
    windows: Option<Windows>,
    central: f32,
    federated: f32,
    federated_per_round: Vec<f32>,
    bytes_f32: usize,
    bytes_int8: usize,
    int8_accuracy: f32,
    front_end_bytes: usize,
    latency_us_per_window: f64,
    seconds: f64,
}

#[derive(Serialize)]
struct Windows {
    channels: usize,
    length: usize,
    x_train: PathBuf,
    y_train: PathBuf,
    x_test: PathBuf,
    y_test: PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.work)?;
    let mut rows = Vec::new();
    for (k, name) in a.tasks.iter().enumerate() {
        let t0 = Instant::now();
        let spec = TaskSpec::resolve(name, &a.data).with_context(|| format!("task {name}"))?;
        let tr = spec.load(Split::Train)?;
        let te = spec.load(Split::Test)?;
        let model = spec.build_model(a.seed)?;
        let local = TrainConfig {
            epochs: a.epochs,
            weight_decay: spec.weight_decay(),
            ..TrainConfig::default()
        };
        let central_cfg = TrainConfig {
            epochs: a.epochs * a.rounds,
            ..local.clone()
        };
        let (_, central) = fedsim::central(&model, &tr, &te, &central_cfg)?;
        let sim = FedSim {
            rounds: a.rounds,
            local,
            ..FedSim::default()
        };
        let (fed_model, hist) = fedsim::run(&sim, &model, &tr, &te)?;
        let int8 = qonnx::export_int8(&fed_model, &tr)?;
        let int8_acc = accuracy(&Classifier::new(&int8)?, &te)?;
        let front_end_bytes = fed_model
            .meta(hearth_model::minirocket::META_KEY)
            .map_or(0, str::len);
        // The device path per window: raw sample → task chain (front end) → head.
        let (wins, _) = spec.windows(Split::Test)?;
        let c = Classifier::new(&fed_model)?;
        let channels = spec.input.channels();
        let reps = wins.len().clamp(1, 200);
        let t = Instant::now();
        for w in wins.iter().cycle().take(reps) {
            let x = if spec.has_front_end() {
                spec.front_end()?
                    .transform(w)
                    .context("window size differs from the front end's")?
            } else {
                w.clone()
            };
            std::hint::black_box(c.predict(&x)?);
        }
        let latency = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
        let is_series = matches!(spec.input, hearth_model::task::Input::Series { .. });
        let windows = if is_series {
            let write = |split: Split, tag: &str| -> Result<(PathBuf, PathBuf, usize)> {
                let (x, y) = spec.windows(split)?;
                let per = x[0].len();
                let xp = a.work.join(format!("{k}_{}_{tag}_x.npy", spec.name));
                let yp = a.work.join(format!("{k}_{}_{tag}_y.npy", spec.name));
                let flat: Vec<f32> = x.concat();
                npy::write_f32(&xp, &[x.len(), channels, per / channels], &flat)?;
                let yi: Vec<i64> = y.iter().map(|&v| i64::from(v)).collect();
                npy::write_i64(&yp, &[yi.len()], &yi)?;
                Ok((xp, yp, per / channels))
            };
            let (x_train, y_train, length) = write(Split::Train, "train")?;
            let (x_test, y_test, _) = write(Split::Test, "test")?;
            Some(Windows {
                channels,
                length,
                x_train,
                y_train,
                x_test,
                y_test,
            })
        } else {
            None
        };
        let family = match (&spec.model, spec.has_front_end()) {
            (hearth_model::task::ModelFamily::Mlp { hidden, .. }, true) => {
                format!("minirocket({}) + mlp{hidden:?}", spec.input_len())
            }
            (hearth_model::task::ModelFamily::Mlp { hidden, .. }, false) => {
                format!("mlp{hidden:?}")
            }
        };
        let row = Row {
            task: spec.name.clone(),
            family,
            train: tr.len(),
            test: te.len(),
            inputs: spec.input_len(),
            windows,
            central,
            federated: *hist.last().unwrap_or(&0.0),
            federated_per_round: hist,
            bytes_f32: fed_model.to_bytes().len(),
            bytes_int8: int8.to_bytes().len(),
            int8_accuracy: int8_acc,
            front_end_bytes,
            latency_us_per_window: latency,
            seconds: t0.elapsed().as_secs_f64(),
        };
        eprintln!(
            "{}: central {:.3}, federated {:.3} {:.3?}, {} B f32, {} B int8 ({:.3}), {:.0} µs/window",
            row.task,
            row.central,
            row.federated,
            row.federated_per_round,
            row.bytes_f32,
            row.bytes_int8,
            row.int8_accuracy,
            row.latency_us_per_window
        );
        rows.push(row);
    }
    let out = a.work.join("hearth.json");
    std::fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
