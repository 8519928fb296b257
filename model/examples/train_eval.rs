//! Trains a task's MLP on its train split and reports test accuracy and timings:
//! `cargo run -p hearth-model --example train_eval -- <task> [epochs] [lr] [batch] [hidden,..] [seed]`.
//! Used to choose `Task::default_spec` and the training defaults; not part of the product.

use hearth_model::{accuracy, train, Classifier, OnnxModel, Split, Task, TrainConfig};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task: Task = args.first().map_or("plaid", String::as_str).parse()?;
    let epochs: u32 = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let lr: f32 = args.get(2).map_or(Ok(0.05), |s| s.parse())?;
    let batch: usize = args.get(3).map_or(Ok(32), |s| s.parse())?;
    let mut spec = task.default_spec();
    if let Some(h) = args.get(4) {
        spec.hidden = h.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    let seed: u64 = args.get(5).map_or(Ok(0), |s| s.parse())?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let t = Instant::now();
    let tr = task.load(&dir, Split::Train)?;
    let te = task.load(&dir, Split::Test)?;
    println!(
        "{task}: load+preprocess {:?}, {} train / {} test, input {}",
        t.elapsed(),
        tr.len(),
        te.len(),
        tr.input_len
    );
    let model = OnnxModel::build_mlp(&spec, seed);
    let cfg = TrainConfig {
        epochs,
        learning_rate: lr,
        batch_size: batch,
        momentum: 0.9,
        seed,
        ..Default::default()
    };
    let t = Instant::now();
    let (w, report) = train(&model, &tr, &cfg)?;
    let dt = t.elapsed();
    let mut trained = model.clone();
    trained.set_weights(&w)?;
    let c = Classifier::new(&trained)?;
    println!(
        "hidden {:?} epochs {epochs} lr {lr} batch {batch}: loss {:.4}, train acc {:.4}, test acc {:.4}, {:?}/epoch",
        spec.hidden,
        report.final_loss,
        accuracy(&c, &tr)?,
        accuracy(&c, &te)?,
        dt / epochs.max(1)
    );
    let x = te.sample(0);
    let t = Instant::now();
    let reps = 2000;
    for _ in 0..reps {
        c.predict(x)?;
    }
    println!("predict latency {:?}", t.elapsed() / reps);
    let raw = vec![(0..500)
        .map(|i| (i as f32 * 0.2).sin() * 3.0)
        .collect::<Vec<f32>>()];
    let spec = task.spec();
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(spec.preprocess(std::hint::black_box(&raw)))?;
    }
    println!(
        "preprocess latency (500 raw values) {:?}",
        t.elapsed() / reps
    );
    Ok(())
}
