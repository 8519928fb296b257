//! `bench-tflite`: the Hearth side of `bench/tflite`.
//!
//! For each vendored `.tflite` model (MediaPipe's BlazeFace short range and hand re-crop):
//! translate it to ONNX (`hearth_model::tflite`, timed), optimise it in tract, then time
//! batch-1 inference on the camera fixture frames (`camera/tests/fixtures/frames.rgb`;
//! hand re-crop: each frame upscaled 2×), scaled `x / 127.5 − 1`, one thread (the script pins
//! the core): 10 warm-up calls, then `--runs` timed calls cycling over the frames.
//! Writes `<work>/hearth.json` (latencies, translation time, sizes) and
//! `<work>/<stem>.<output>.f32` (each output on every frame, little-endian f32) for
//! `bench/tflite_side.py`, which runs the TFLite runtime on the same inputs and compares.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use tract_onnx::prelude::*;

/// Hearth side of bench/tflite.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The repository root.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Work directory (outputs, results).
    #[arg(long, default_value = "target/bench-tflite")]
    work: PathBuf,
    /// Timed calls per model (after 10 warm-up calls).
    #[arg(long, default_value_t = 200)]
    runs: usize,
}

/// (file stem, input upscale factor over the 128×128 frames).
const MODELS: [(&str, usize); 2] = [("face_detection_short_range", 1), ("hand_recrop", 2)];

fn input(frame: &[u8], k: usize) -> Result<Tensor> {
    let n = 128 * k;
    let mut v = Vec::with_capacity(n * n * 3);
    for y in 0..n {
        for x in 0..n {
            for c in 0..3 {
                v.push(frame[((y / k) * 128 + x / k) * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Tensor::from_shape(&[1, n, n, 3], &v)
}

fn stats(mut us: Vec<f64>) -> serde_json::Value {
    us.sort_by(f64::total_cmp);
    let q = |p: f64| us[((us.len() - 1) as f64 * p).round() as usize];
    json!({"median_us": q(0.5), "p10_us": q(0.1), "p90_us": q(0.9), "runs": us.len()})
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let raw = std::fs::read(args.root.join("camera/tests/fixtures/frames.rgb"))?;
    let frames: Vec<&[u8]> = raw.chunks_exact(128 * 128 * 3).collect();
    let mut models = serde_json::Map::new();
    for (stem, k) in MODELS {
        let path = args.root.join(format!("data/models/{stem}.tflite"));
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let t = Instant::now();
        let (onnx, report) = hearth_model::tflite::to_onnx(&bytes)?;
        let translate_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let plan = tract_onnx::onnx()
            .model_for_proto_model(onnx.proto())?
            .into_optimized()?
            .into_runnable()?;
        let optimise_ms = t.elapsed().as_secs_f64() * 1e3;
        let inputs: Vec<Tensor> = frames.iter().map(|f| input(f, k)).collect::<Result<_>>()?;
        let names: Vec<String> = onnx
            .proto()
            .graph
            .as_ref()
            .map(|g| g.output.iter().map(|o| o.name.clone()).collect())
            .unwrap_or_default();
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); names.len()];
        for x in &inputs {
            let res = plan.run(tvec!(x.clone().into()))?;
            for (o, t) in res.iter().enumerate() {
                let v = t.try_as_plain_ram()?;
                outs[o].extend(v.as_slice::<f32>()?.iter().flat_map(|f| f.to_le_bytes()));
            }
        }
        for (name, b) in names.iter().zip(&outs) {
            std::fs::write(args.work.join(format!("{stem}.{name}.f32")), b)?;
        }
        for x in inputs.iter().cycle().take(10) {
            plan.run(tvec!(x.clone().into()))?;
        }
        let mut us = Vec::with_capacity(args.runs);
        for x in inputs.iter().cycle().take(args.runs) {
            let x = x.clone();
            let t = Instant::now();
            plan.run(tvec!(x.into()))?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        models.insert(
            stem.into(),
            json!({
                "tflite_bytes": bytes.len(),
                "onnx_bytes": onnx.to_bytes().len(),
                "params": report.params,
                "folded_f16": report.folded_f16,
                "translate_ms": translate_ms,
                "optimise_ms": optimise_ms,
                "outputs": names,
                "latency": stats(us),
            }),
        );
        eprintln!("{stem}: translated in {translate_ms:.1} ms");
    }
    std::fs::write(
        args.work.join("hearth.json"),
        serde_json::to_vec_pretty(
            &json!({"engine": "tract 0.23.9 (translated ONNX)", "models": models}),
        )?,
    )?;
    Ok(())
}
