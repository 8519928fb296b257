//! Accuracy against bytes for the update codec (uplink) and the compressed downlink, on a
//! task's model family in the in-process federated simulation (the agents' partitions, the
//! real codec with client-side error feedback, FedAvg, the downlink's server-side residual):
//!
//! ```text
//! cargo run -p hearth-model --example codec_sweep -- [task] [clients] [rounds] [seeds]
//! ```
//!
//! (defaults: digits, 4 clients, 10 rounds, 3 seeds; 1 local epoch, lr 0.1, batch 32, no
//! client clipping, Dirichlet α = 0.5 — the settings of `bench/federation`). Environment:
//! `MOMENTUM` (client optimizer, default 0 = plain SGD), `STAGE` (`up`: uplink settings with
//! every version shipped whole; `down`: downlink settings under the uplink `UP`;
//! default `up`), `UP` (`bits:topk[:remedy]`, for `STAGE=down`), `ONLY` (comma-separated
//! setting names: run just those), `CSV` (a file the rows are appended to, for
//! `hearth-coordinator`'s `codec_plot` example). Prints one line per
//! setting: median / min / max final accuracy over the seeds, mean payload bytes per client
//! per round (uplink; downlink: per client per version), and the same after raw deflate
//! (miniz_oxide, level 10) to measure whether a general-purpose compressor pays.
//! Remedies for sparse updates (`hearth_model::fedsim`): `dgc` (momentum correction 0.9
//! with momentum factor masking), `clip` (local clipping of each delta to L2 2.0), `warmup`
//! (3 rounds of sparsity warm-up), `all` (the three). Used to choose the coordinator's
//! defaults (BENCHMARKS.md); not part of the product.

use hearth_model::fedsim::{run_counted, FedSim};
use hearth_model::{CodecConfig, Split, TaskSpec, TrainConfig};
use std::io::Write;
use std::path::Path;

fn deflated(b: &[u8]) -> usize {
    miniz_oxide::deflate::compress_to_vec(b, 10).len()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One point of the sweep.
struct Setting {
    name: String,
    up: CodecConfig,
    down: Option<CodecConfig>,
    remedy: &'static str,
}

fn remedy(sim: &mut FedSim, r: &str) {
    let (dgc, clip, warm) = match r {
        "dgc" => (true, false, false),
        "clip" => (false, true, false),
        "warmup" => (false, false, true),
        "all" => (true, true, true),
        _ => (false, false, false),
    };
    if dgc {
        sim.dgc_momentum = 0.9;
    }
    if clip {
        sim.clip_norm = 2.0;
    }
    if warm {
        sim.warmup_rounds = 3;
    }
}

fn label(c: &CodecConfig) -> String {
    let bits = match c.bits {
        32 => "fp32".to_string(),
        1 => "1-bit".to_string(),
        b => format!("int{b}"),
    };
    if c.topk_fraction >= 1.0 {
        format!(
            "{bits} dense{}",
            if c.compact { "" } else { " (v1 layout)" }
        )
    } else {
        format!(
            "top-{}% {bits}{}",
            (f64::from(c.topk_fraction) * 1e4).round() / 1e2,
            if c.entropy && c.compact {
                ""
            } else {
                " (v1 layout, varint)"
            }
        )
    }
}

fn parse_up(s: &str) -> Result<(CodecConfig, &'static str), Box<dyn std::error::Error>> {
    let f: Vec<&str> = s.split(':').collect();
    let bits: u8 = f.first().ok_or("UP: bits")?.parse()?;
    let topk: f32 = f.get(1).map_or(Ok(1.0), |s| s.parse())?;
    let r = match f.get(2).copied().unwrap_or("none") {
        "dgc" => "dgc",
        "clip" => "clip",
        "warmup" => "warmup",
        "all" => "all",
        _ => "none",
    };
    Ok((CodecConfig::topk(bits, topk), r))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = args.first().map_or("digits", String::as_str);
    let clients: usize = args.get(1).map_or(Ok(4), |s| s.parse())?;
    let rounds: u32 = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let seeds: u64 = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let momentum: f32 = std::env::var("MOMENTUM").map_or(Ok(0.0), |v| v.parse())?;
    let stage = std::env::var("STAGE").unwrap_or_else(|_| "up".into());
    let spec = TaskSpec::resolve(task, Path::new("data"))?;
    let tr = spec.load(Split::Train)?;
    let te = spec.load(Split::Test)?;
    let mut settings = Vec::new();
    match stage.as_str() {
        "up" => {
            let mut push = |up: CodecConfig, remedy: &'static str| {
                let r = if remedy == "none" {
                    String::new()
                } else {
                    format!(" +{remedy}")
                };
                settings.push(Setting {
                    name: format!("{}{r}", label(&up)),
                    up,
                    down: None,
                    remedy,
                });
            };
            for bits in [32u8, 8, 4, 2, 1] {
                push(CodecConfig::dense(bits), "none");
            }
            push(
                CodecConfig {
                    compact: false,
                    ..CodecConfig::dense(8)
                },
                "none",
            );
            for frac in [0.3f32, 0.1, 0.03, 0.01] {
                for bits in [8u8, 4, 2, 1] {
                    for r in ["none", "dgc", "clip", "warmup", "all"] {
                        push(CodecConfig::topk(bits, frac), r);
                    }
                    // The former layout: names and shapes in every update, varint positions.
                    push(
                        CodecConfig {
                            entropy: false,
                            compact: false,
                            ..CodecConfig::topk(bits, frac)
                        },
                        "none",
                    );
                }
            }
        }
        "down" => {
            let (up, r) = parse_up(&std::env::var("UP").unwrap_or_else(|_| "8:1.0".into()))?;
            let mut downs: Vec<Option<CodecConfig>> = vec![None, Some(CodecConfig::dense(32))];
            for frac in [1.0f32, 0.3, 0.1, 0.03] {
                for bits in [8u8, 4, 2, 1] {
                    downs.push(Some(CodecConfig::topk(bits, frac)));
                }
            }
            for down in downs {
                settings.push(Setting {
                    name: format!(
                        "{} / {}",
                        label(&up),
                        down.as_ref().map_or("file".into(), label)
                    ),
                    up,
                    down,
                    remedy: r,
                });
            }
        }
        s => return Err(format!("STAGE {s}: up or down").into()),
    }
    if let Ok(only) = std::env::var("ONLY") {
        let keep: Vec<&str> = only.split(',').map(str::trim).collect();
        settings.retain(|s| keep.contains(&s.name.as_str()));
    }
    let mut csv = match std::env::var("CSV") {
        Ok(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        Err(_) => None,
    };
    let opt = if momentum > 0.0 { "momentum" } else { "sgd" };
    println!(
        "{task}: {clients} clients, {rounds} rounds, 1 epoch, lr 0.1, batch 32, {opt} {momentum}, median of {seeds} seeds; STAGE {stage}"
    );
    println!(
        "{:<40} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "setting", "acc", "min", "max", "up B", "up defl", "down B", "down defl"
    );
    for s in settings {
        let (mut acc, mut upb, mut upd, mut downb, mut downd) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for seed in 0..seeds {
            let model = spec.build_model(seed)?;
            let mut sim = FedSim {
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
                clip_norm: 0.0,
                codec: s.up,
                downlink: s.down,
                alt_size: Some(deflated),
                ..FedSim::default()
            };
            remedy(&mut sim, s.remedy);
            let (_, stats) = run_counted(&sim, &model, &tr, &te)?;
            let last = stats.last().ok_or("no rounds")?;
            let n = stats.len() as f64;
            acc.push(f64::from(last.accuracy));
            upb.push(stats.iter().map(|s| s.uplink_bytes).sum::<f64>() / n);
            upd.push(stats.iter().map(|s| s.uplink_alt_bytes).sum::<f64>() / n);
            downb.push(stats.iter().map(|s| s.downlink_bytes).sum::<f64>() / n);
            downd.push(stats.iter().map(|s| s.downlink_alt_bytes).sum::<f64>() / n);
        }
        let lo = acc.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = acc.iter().copied().fold(0.0, f64::max);
        let row = (
            median(acc),
            median(upb),
            median(upd),
            median(downb),
            median(downd),
        );
        println!(
            "{:<40} {:>8.4} {:>8.4} {:>8.4} {:>9.0} {:>9.0} {:>10.0} {:>10.0}",
            s.name, row.0, lo, hi, row.1, row.2, row.3, row.4
        );
        if let Some(f) = csv.as_mut() {
            writeln!(
                f,
                "{stage},{opt},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.1},{:.1},{:.1},{:.1}",
                s.name.replace(',', ";"),
                s.up.bits,
                s.up.topk_fraction,
                s.up.entropy,
                s.remedy,
                s.down
                    .map_or("file".into(), |d| format!("{}:{}", d.bits, d.topk_fraction)),
                row.0,
                lo,
                hi,
                row.1,
                row.2,
                row.3,
                row.4
            )?;
        }
    }
    Ok(())
}
