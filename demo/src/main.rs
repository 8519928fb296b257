//! `hearth-demo`: runs a whole Hearth home on this machine and prints what happened.
//! Thin: the wiring lives in the library (`hearth_demo::Home`), shared with the tests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hearth_demo::{default_data_dir, Home, HomeOptions};
use hearth_edge::process::{init_tracing, parse_args, runtime, shutdown_signal};

/// Runs a whole Hearth home on one machine, over loopback: coordinator, hub with embedded
/// MQTT broker, a porch-light actuator, three smart-plug agents (PLAID) and three doorbell
/// cameras (faces), each on its own non-IID share of the real data; then federated rounds
/// triggered over MQTT. Prints events routed, commands delivered, held-out accuracy per
/// model version and uplink bytes per round. Then a live camera (with ffmpeg): a stream on
/// loopback, face tracks, its own head's verdict (`sub_label`) and a rule on it lighting the
/// porch.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Federated rounds per model.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Directory of the data sets.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where state goes (default: a temporary directory removed at exit).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Samples per second each agent replays.
    #[arg(long, default_value_t = 20.0)]
    replay_hz: f64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 10)]
    epochs: u32,
    /// Client learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Seconds of event traffic between steps.
    #[arg(long, default_value_t = 3)]
    dwell_secs: u64,
}

/// Exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report an interrupted command).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let args: Args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    init_tracing("warn,rumqttd=off");
    let rt = match runtime("hearth-demo", None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let signal = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hearth-demo: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // On a signal the demo future is dropped: the home's tasks stop and the temporary
        // state directory is removed.
        tokio::select! {
            r = demo(args) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hearth-demo: {e:#}");
                    ExitCode::FAILURE
                }
            },
            _ = signal => {
                eprintln!("hearth-demo: interrupted");
                ExitCode::from(EXIT_INTERRUPTED)
            }
        }
    })
}

async fn demo(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let tmp = tempfile::tempdir()?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let mut opts = HomeOptions::demo(data_dir, state_dir);
    opts.replay_rate_hz = args.replay_hz;
    opts.local_epochs = args.epochs;
    opts.learning_rate = args.lr;

    println!(
        "Hearth demo: starting coordinator, hub (embedded MQTT broker), porch light and agents…"
    );
    let home = Home::start(&opts).await.context("starting the home")?;
    println!(
        "  coordinator {}  broker {}  agents: {}",
        home.coordinator.endpoint(),
        home.hub.mqtt_url(),
        home.agents
            .iter()
            .map(|(d, _, a)| format!("{d} ({} samples)", a.local_samples()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let dwell = Duration::from_secs(args.dwell_secs);
    tokio::time::sleep(dwell).await;

    let mut rounds = Vec::new();
    for r in 1..=args.rounds {
        for model in home.models().to_vec() {
            let t = Instant::now();
            let s = home
                .refresh_over_mqtt(&model, Duration::from_secs(120))
                .await
                .with_context(|| format!("round {r} of {model}"))?;
            println!(
                "  round {} of {model}: {} updates, v{} -> v{}, held-out accuracy {:.3}, {:.1}s",
                s.round_id,
                s.updates,
                s.base_version,
                s.new_version,
                s.eval_accuracy,
                t.elapsed().as_secs_f32()
            );
            rounds.push(s);
        }
        tokio::time::sleep(dwell).await;
    }

    // Stop the agents and wait (bounded) until every event and command in flight has arrived,
    // so a difference below is a real loss.
    let mut home = home;
    let traffic = home.drain_control_path(Duration::from_secs(10)).await?;
    println!(
        "\n== Hearth demo summary ({:.1}s) ==",
        t0.elapsed().as_secs_f32()
    );
    println!("Control path (agents -> hub rules -> porch light):");
    println!(
        "  events published by agents   {}",
        traffic.events_published
    );
    println!("  events received by the hub   {}", traffic.events_received);
    println!("  events dropped by the guard  {}", traffic.events_dropped);
    println!("  events routed by rules       {}", traffic.events_routed);
    println!(
        "  commands published           {}",
        traffic.commands_published
    );
    println!(
        "  commands applied by actuator {}",
        traffic.commands_applied
    );
    println!(
        "  lost (events, commands)      {}, {}",
        traffic.events_lost(),
        traffic.commands_lost()
    );
    println!("Held-out accuracy per model version:");
    for model in home.models() {
        let line = home
            .versions(model)
            .await?
            .iter()
            .map(|v| format!("v{} {:.3}", v.version, v.eval_accuracy))
            .collect::<Vec<_>>()
            .join("  ");
        println!("  {model:<8} {line}");
    }
    println!("Uplink per round (compressed updates vs. dense fp32 updates):");
    for s in &rounds {
        let dense = s.model_fp32_bytes * u64::from(s.updates);
        println!(
            "  {:<8} round {}: {} updates, {} bytes vs {} bytes fp32 ({:.2}x smaller)",
            s.model,
            s.round_id,
            s.updates,
            s.uplink_bytes,
            dense,
            dense as f64 / s.uplink_bytes.max(1) as f64
        );
    }
    println!("Live camera (ffmpeg HTTP MJPEG on loopback -> BlazeFace (backend auto: dense engine, else tract) -> tracker -> head on the device (sub_label) -> hub rule on sub_label -> porch light):");
    match home
        .live_camera(&opts.data_dir, &opts.state_dir, Duration::from_secs(60))
        .await
        .context("live camera")?
    {
        None => println!("  skipped: ffmpeg is not installed (apt-get install ffmpeg)"),
        Some(r) => {
            let n = |k: &str| r.status[k].as_u64().unwrap_or(0);
            println!(
                "  {}: first face track after {:.1}s, porch light on {:.2}s later (rule {:?} fired {}x)",
                hearth_demo::camera::LIVE_CAMERA,
                r.first_track_secs,
                r.light_after_secs,
                hearth_demo::LIVE_CAMERA_RULE,
                r.rule_fired
            );
            let verdicts = r
                .verdicts
                .iter()
                .map(|(l, n)| format!("{l} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "  head ({} task, trained on the device): verdicts (sub_label) {} on {} new/update events ({} without); the clip shows a face: {}/{} right; held-out accuracy {:.3} on {} embeddings",
                hearth_demo::camera::LIVE_CAMERA_TASK,
                if verdicts.is_empty() { "none".to_string() } else { verdicts },
                r.total_verdicts() + r.without_verdict,
                r.without_verdict,
                r.person_verdicts(),
                r.total_verdicts(),
                r.head_accuracy,
                r.head_test_samples
            );
            println!(
                "  frames {}  with motion {}  detector runs {} ({:.1} ms each)  events new/update/end {}/{}/{}",
                n("frames"),
                n("motion_frames"),
                n("detector_runs"),
                n("detect_micros") as f64 / n("detector_runs").max(1) as f64 / 1000.0,
                r.events[0],
                r.events[1],
                r.events[2]
            );
        }
    }
    home.shutdown().await?;
    Ok(())
}
