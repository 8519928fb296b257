//! `bench-camera`: the Hearth side of `bench/camera`.
//!
//! 1. Composes a clip from the repo's face crops with idle stretches (`hearth_camera::scene`)
//!    and decodes it with ffmpeg through the camera's own filter chain (128×128 RGB).
//! 2. Detector latency on one core (the script pins it), per call, on the clip's face
//!    frames (`raw`: preprocessing + inference; `detect`: + anchor decoding and weighted
//!    NMS), for each engine: tract and Hearth's dense conv engine (`hearth_dense::conv`), on
//!    the float graph and on its int8 export (`hearth_compress::qconv`, calibrated on the
//!    same frames).
//! 3. Motion gating on the whole clip at 10 fps (simulated clock): wall time per frame that
//!    stopped at the motion gate vs per frame that ran the detector.
//!
//! Writes `<work>/hearth.json`, `<work>/frames.rgb` (the timed frames) and
//! `<work>/blazeface_int8.onnx` for `bench/camera_ort.py`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hearth_camera::detector::{Backend, Detector, DetectorOptions, FRAME_BYTES, INPUT_SIZE};
use hearth_camera::scene::{write_clip_frames, Shot};
use hearth_camera::{CameraConfig, CameraStats, Gate};
use serde_json::json;

/// Hearth side of bench/camera.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The repository's data directory.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Work directory (clip, frames, results).
    #[arg(long, default_value = "target/bench-camera")]
    work: PathBuf,
    /// Timed calls per engine (after 10 warm-up calls).
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

/// CPU time this thread has run, ns (`/proc/thread-self/schedstat`, first field), if the
/// kernel reports it: the load-independent cost of a call on a shared machine.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Per-call wall times (µs) and the mean CPU time per call (µs).
struct Timed {
    wall_us: Vec<f64>,
    cpu_us: Option<f64>,
}

fn stats(t: Timed) -> serde_json::Value {
    let mut us = t.wall_us;
    us.sort_by(f64::total_cmp);
    let q = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    json!({"median_us": q(0.5), "p10_us": q(0.1), "p90_us": q(0.9), "mean_us": us.iter().sum::<f64>() / us.len() as f64, "runs": us.len(), "cpu_us_mean": t.cpu_us})
}

fn time_calls(frames: &[&[u8]], runs: usize, mut f: impl FnMut(&[u8])) -> Timed {
    for fr in frames.iter().cycle().take(10) {
        f(fr);
    }
    let cpu0 = thread_cpu_ns();
    let wall_us: Vec<f64> = frames
        .iter()
        .cycle()
        .take(runs)
        .map(|fr| {
            let t = Instant::now();
            f(fr);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let cpu_us = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 1e3 / runs as f64),
        _ => None,
    };
    Timed { wall_us, cpu_us }
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let model_path = args
        .data
        .join("models/face_detection_front_128x128_barracuda.onnx");

    // 1. The clip: 10 s idle, 5 s face, 10 s idle, 5 s another face (10 fps).
    let clip_dir = args.work.join("clip");
    let _ = std::fs::remove_dir_all(&clip_dir);
    let shots = [
        Shot::Idle(100),
        Shot::Face {
            face: 0,
            frames: 50,
        },
        Shot::Idle(100),
        Shot::Face {
            face: 1,
            frames: 50,
        },
    ];
    write_clip_frames(&args.data.join("faces/test.csv"), &clip_dir, &shots)?;
    let n = INPUT_SIZE;
    let out = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-framerate",
            "10",
            "-i",
        ])
        .arg(clip_dir.join("frame_%05d.ppm"))
        .args(["-c:v", "mjpeg", "-q:v", "3", "-f", "avi", "-y"])
        .arg(args.work.join("clip.avi"))
        .status()
        .context("running ffmpeg (apt-get install ffmpeg)")?;
    if !out.success() {
        bail!("ffmpeg could not encode the clip");
    }
    let decoded = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-i"])
        .arg(args.work.join("clip.avi"))
        .args([
            "-an",
            "-vf",
            &format!("fps=10,scale={n}:{n}:force_original_aspect_ratio=decrease,pad={n}:{n}:(ow-iw)/2:(oh-ih)/2"),
            "-pix_fmt",
            "rgb24",
            "-f",
            "rawvideo",
            "pipe:1",
        ])
        .output()?;
    if !decoded.status.success() || decoded.stdout.len() < FRAME_BYTES * 300 {
        bail!("ffmpeg decoded {} bytes", decoded.stdout.len());
    }
    let clip: Vec<&[u8]> = decoded.stdout.chunks_exact(FRAME_BYTES).collect();
    let face_frames: Vec<&[u8]> = clip[100..150]
        .iter()
        .chain(&clip[250..300])
        .copied()
        .collect();
    std::fs::write(args.work.join("frames.rgb"), face_frames.concat())?;

    // 2. Detector latency, per engine: tract and Hearth's dense conv engine, on the float
    //    graph and on its int8 export (calibrated on every 5th timed frame).
    let with = |backend: Backend| DetectorOptions {
        backend,
        ..DetectorOptions::default()
    };
    let found_by = |d: &Detector| {
        face_frames
            .iter()
            .filter(|f| !d.detect(f).unwrap_or_default().is_empty())
            .count()
    };
    let engine_row = |d: &Detector, detect: bool| {
        let raw = time_calls(&face_frames, args.runs, |f| {
            d.raw(f).expect("inference");
        });
        let mut row = json!({
            "raw": stats(raw),
            "backend": d.backend_name(),
            "probe_diff": d.probe_diff(),
            "frames_with_face": found_by(d),
        });
        if detect {
            row["detect"] = stats(time_calls(&face_frames, args.runs, |f| {
                d.detect(f).expect("detection");
            }));
        }
        row
    };
    let det = Detector::load(&model_path, with(Backend::Tract))?;
    let found = found_by(&det);
    let tract_f32 = engine_row(&det, true);
    let dense = Detector::load(&model_path, with(Backend::Dense))?;
    let dense_f32 = engine_row(&dense, true);

    let (mut int8, mut dense_int8) = (json!(null), json!(null));
    let calib: Vec<Vec<f32>> = face_frames
        .iter()
        .step_by(5)
        .map(|f| f.iter().map(|&b| b as f32 / 127.5 - 1.0).collect())
        .collect();
    let fixed = hearth_compress::measure::load_for_tract(&model_path)?;
    let q = hearth_compress::qconv::export_int8_conv(&fixed, &calib)?;
    q.save(&args.work.join("blazeface_int8.onnx"))?;
    match Detector::from_model(&q, with(Backend::Tract)) {
        Ok(d) => int8 = engine_row(&d, false),
        Err(e) => eprintln!("int8 export does not run in tract: {e:#}"),
    }
    match Detector::from_model(&q, with(Backend::Dense)) {
        Ok(d) => dense_int8 = engine_row(&d, true),
        Err(e) => eprintln!("int8 export does not run in the dense engine: {e:#}"),
    }

    // 3. Motion gating over the clip at 10 fps (simulated clock, real detector).
    let cfg = CameraConfig {
        max_detect_fps: 10.0,
        ..CameraConfig::default()
    };
    // The camera's default engine (`backend = "auto"`).
    let det = Detector::load(&model_path, DetectorOptions::default())?;
    let mut gate = Gate::new(&cfg, "bench-cam", "blazeface@1");
    let st = CameraStats::default();
    let t0 = Instant::now();
    let (mut idle_us, mut det_us) = (Vec::new(), Vec::new());
    let mut events = Vec::new();
    for (i, f) in clip.iter().enumerate() {
        let at = t0 + Duration::from_millis(i as u64 * 100);
        let t = Instant::now();
        let o = gate.frame(&det, f, at, i as f64 * 0.1, &st, &mut events);
        let us = t.elapsed().as_secs_f64() * 1e6;
        if o.detections.is_some() {
            det_us.push(us);
        } else {
            idle_us.push(us);
        }
    }
    let total: f64 = idle_us.iter().chain(&det_us).sum();
    let frames = clip.len();
    let gating = json!({
        "frames": frames,
        "detector_runs": det_us.len(),
        "gated_frames": idle_us.len(),
        "mean_gated_frame_us": idle_us.iter().sum::<f64>() / idle_us.len().max(1) as f64,
        "mean_detector_frame_us": det_us.iter().sum::<f64>() / det_us.len().max(1) as f64,
        "mean_frame_us": total / frames as f64,
        "events": events.iter().map(|e| format!("{:?}", e.phase).to_lowercase()).collect::<Vec<_>>(),
    });
    let doc = json!({
        "frames_timed": face_frames.len(),
        "frames_with_face_f32": found,
        "tract_f32": tract_f32,
        "dense_f32": dense_f32,
        "tract_int8": int8,
        "dense_int8": dense_int8,
        "gating_backend": det.backend_name(),
        "gating": gating,
    });
    std::fs::write(
        args.work.join("hearth.json"),
        serde_json::to_vec_pretty(&doc)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
