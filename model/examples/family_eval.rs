//! Central vs. federated (the demo's partitions, in-process FedAvg through the real codec)
//! accuracy of a task file's model family:
//! `cargo run --release -p hearth-model --example family_eval -- <task.toml> [rounds] [epochs] [lr]`.
//! Used to choose the task files' model families; not part of the product.

use hearth_model::fedsim::{self, FedSim};
use hearth_model::{Split, TaskSpec, TrainConfig};
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or("usage: family_eval <task.toml> [rounds] [epochs] [lr]")?;
    let rounds: u32 = args.get(1).map_or(Ok(3), |s| s.parse())?;
    let epochs: u32 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let lr: f32 = args.get(3).map_or(Ok(0.01), |s| s.parse())?;
    let spec = TaskSpec::from_file(Path::new(path))?;
    let t = Instant::now();
    let tr = spec.load(Split::Train)?;
    let te = spec.load(Split::Test)?;
    println!(
        "{}: fit+load {:?}, {} train / {} test, input {}",
        spec.name,
        t.elapsed(),
        tr.len(),
        te.len(),
        tr.input_len
    );
    let model = spec.build_model(0)?;
    let local = TrainConfig {
        epochs,
        learning_rate: lr,
        weight_decay: std::env::var("WD").map_or(Ok(spec.weight_decay()), |v| v.parse())?,
        ..TrainConfig::default()
    };
    let t = Instant::now();
    let (_, c) = fedsim::central(
        &model,
        &tr,
        &te,
        &TrainConfig {
            epochs: epochs * rounds,
            ..local.clone()
        },
    )?;
    println!(
        "central ({} epochs): {c:.4} in {:?}",
        epochs * rounds,
        t.elapsed()
    );
    let sim = FedSim {
        rounds,
        local,
        clip_norm: std::env::var("CLIP").map_or(Ok(10.0), |v| v.parse())?,
        clients: std::env::var("CLIENTS").map_or(Ok(3), |v| v.parse())?,
        ..FedSim::default()
    };
    let t = Instant::now();
    let (_, hist) = fedsim::run(&sim, &model, &tr, &te)?;
    println!("federated per round: {hist:.4?} in {:?}", t.elapsed());
    Ok(())
}
