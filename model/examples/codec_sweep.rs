//! Accuracy against bytes for the update codec (uplink) and the compressed downlink, on a
//! task's model family in the in-process federated simulation (the agents' partitions, the
//! real codec with client-side error feedback, FedAvg, the downlink's server-side residual):
//! `cargo run --release -p hearth-model --example codec_sweep -- [task] [clients] [rounds] [seeds]`
//! (defaults: digits, 4 clients, 10 rounds, 3 seeds; 1 local epoch, lr 0.1, batch 32; the
//! client optimizer from `MOMENTUM`, default 0 = plain SGD). Prints one line per setting with
//! the median final accuracy over the seeds and the bytes per client per round. Used to choose
//! the coordinator's defaults (`bench/federation/README.md`); not part of the product.

use hearth_model::fedsim::{run_counted, FedSim};
use hearth_model::{CodecConfig, Split, TaskSpec, TrainConfig};
use std::path::Path;

fn codec(bits: u8, topk: f32) -> CodecConfig {
    CodecConfig {
        bits,
        topk_fraction: topk,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map_or("digits", String::as_str);
    let clients: usize = args.get(1).map_or(Ok(4), |s| s.parse())?;
    let rounds: u32 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let seeds: u64 = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let momentum: f32 = std::env::var("MOMENTUM").map_or(Ok(0.0), |v| v.parse())?;
    let spec = TaskSpec::resolve(task, Path::new("data"))?;
    let tr = spec.load(Split::Train)?;
    let te = spec.load(Split::Test)?;
    // (name, uplink codec, downlink codec or None for the whole file)
    let settings: Vec<(&str, CodecConfig, Option<CodecConfig>)> = vec![
        ("fp32 up, file down (reference)", codec(32, 1.0), None),
        ("int8 up, file down (old default)", codec(8, 1.0), None),
        ("int8 up, int8 down", codec(8, 1.0), Some(codec(8, 1.0))),
        ("int4 up, int8 down", codec(4, 1.0), Some(codec(8, 1.0))),
        ("int4 up, int4 down", codec(4, 1.0), Some(codec(4, 1.0))),
        ("int2 up, int4 down", codec(2, 1.0), Some(codec(4, 1.0))),
        (
            "top-25% int8 up, int8 down",
            codec(8, 0.25),
            Some(codec(8, 1.0)),
        ),
        (
            "top-25% int4 up, int4 down",
            codec(4, 0.25),
            Some(codec(4, 1.0)),
        ),
        (
            "top-10% int8 up, int8 down",
            codec(8, 0.1),
            Some(codec(8, 1.0)),
        ),
        (
            "top-10% int4 up, int4 down",
            codec(4, 0.1),
            Some(codec(4, 1.0)),
        ),
        (
            "top-10% int4 up, top-25% int4 down",
            codec(4, 0.1),
            Some(codec(4, 0.25)),
        ),
        (
            "top-1% int8 up, int8 down",
            codec(8, 0.01),
            Some(codec(8, 1.0)),
        ),
    ];
    println!(
        "{task}: {clients} clients, {rounds} rounds, 1 epoch, lr 0.1, batch 32, momentum {momentum}, median of {seeds} seeds"
    );
    println!(
        "{:<36} {:>8} {:>12} {:>14}",
        "setting", "accuracy", "up B/client", "down B/client"
    );
    for (name, up, down) in settings {
        let (mut acc, mut upb, mut downb) = (Vec::new(), Vec::new(), Vec::new());
        for seed in 0..seeds {
            let model = spec.build_model(seed)?;
            let sim = FedSim {
                clients,
                alpha: 0.5,
                partition_seed: 42 + seed,
                rounds,
                local: TrainConfig {
                    epochs: 1,
                    learning_rate: 0.1,
                    batch_size: 32,
                    momentum,
                    seed,
                    ..TrainConfig::default()
                },
                clip_norm: 10.0,
                codec: up,
                downlink: down,
            };
            let (_, stats) = run_counted(&sim, &model, &tr, &te)?;
            let last = stats.last().ok_or("no rounds")?;
            acc.push(f64::from(last.accuracy));
            upb.push(stats.iter().map(|s| s.uplink_bytes).sum::<f64>() / stats.len() as f64);
            downb.push(stats.iter().map(|s| s.downlink_bytes).sum::<f64>() / stats.len() as f64);
        }
        println!(
            "{:<36} {:>8.4} {:>12.0} {:>14.0}",
            name,
            median(acc),
            median(upb),
            median(downb)
        );
    }
    Ok(())
}
