//! The vendored MediaPipe `.tflite` models (data/models/, from the `mediapipe` 0.10.14 wheel)
//! translated to ONNX and run in tract, checked against outputs the TFLite runtime itself
//! computed once (`data/models/tflite_reference.py`, ai-edge-litert 2.3.0, stored in
//! `data/models/reference/`). And a real model with an op Hearth does not translate.
#![cfg(feature = "tflite")]

use std::path::PathBuf;

use hearth_model::formats::npy;
use hearth_model::tflite::{self, TfliteError};
use tract_onnx::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The 4 camera fixture frames, 128×128 RGB bytes each.
fn frames() -> Vec<Vec<u8>> {
    let raw = std::fs::read(root().join("camera/tests/fixtures/frames.rgb")).unwrap();
    raw.chunks_exact(128 * 128 * 3)
        .map(|c| c.to_vec())
        .collect()
}

/// Each frame upscaled `k`× by repetition, scaled `x / 127.5 − 1` (as the reference script).
fn input(frame: &[u8], k: usize) -> Tensor {
    let n = 128 * k;
    let mut v = Vec::with_capacity(n * n * 3);
    for y in 0..n {
        for x in 0..n {
            for c in 0..3 {
                v.push(frame[((y / k) * 128 + x / k) * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Tensor::from_shape(&[1, n, n, 3], &v).unwrap()
}

/// Runs the translated model on every frame and returns the largest absolute difference to
/// the reference per output, and the largest reference magnitude.
fn compare(stem: &str, k: usize) -> Vec<(String, f32, f32)> {
    let (onnx, report) = tflite::load(&root().join(format!("data/models/{stem}.tflite"))).unwrap();
    assert!(report.params > 0);
    let plan = tract_onnx::onnx()
        .model_for_proto_model(onnx.proto())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let outputs: Vec<String> = onnx
        .proto()
        .graph
        .as_ref()
        .unwrap()
        .output
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let npz = root().join(format!("data/models/reference/{stem}.npz"));
    let mut res = Vec::new();
    let frames = frames();
    for (o, name) in outputs.iter().enumerate() {
        let want = npy::read_npz(&npz, name).unwrap();
        assert_eq!(want.shape[0], frames.len());
        let per = want.data.len() / frames.len();
        let (mut diff, mut mag) = (0f32, 0f32);
        for (i, f) in frames.iter().enumerate() {
            let out = plan.run(tvec!(input(f, k).into())).unwrap();
            let got = out[o].try_as_plain_ram().unwrap();
            let got = got.as_slice::<f32>().unwrap();
            assert_eq!(got.len(), per, "{name}");
            for (g, w) in got.iter().zip(&want.data[i * per..(i + 1) * per]) {
                diff = diff.max((g - *w as f32).abs());
                mag = mag.max((*w as f32).abs());
            }
        }
        res.push((name.clone(), diff, mag));
    }
    res
}

#[test]
fn blazeface_short_range_matches_tflite_runtime() {
    let (_, report) =
        tflite::load(&root().join("data/models/face_detection_short_range.tflite")).unwrap();
    assert_eq!(report.folded_f16, 74);
    assert_eq!(report.ops["CONV_2D"], 21);
    assert_eq!(report.ops["DEPTHWISE_CONV_2D"], 16);
    for (name, diff, mag) in compare("face_detection_short_range", 1) {
        eprintln!("{name}: max |diff| {diff:e} (max |ref| {mag})");
        assert!(diff <= 1e-4 * mag.max(1.0), "{name}: {diff} vs {mag}");
    }
}

#[test]
fn hand_recrop_matches_tflite_runtime() {
    let (_, report) = tflite::load(&root().join("data/models/hand_recrop.tflite")).unwrap();
    assert_eq!(report.ops["PRELU"], 13);
    assert_eq!(report.folded_f16, 0);
    for (name, diff, mag) in compare("hand_recrop", 2) {
        eprintln!("{name}: max |diff| {diff:e} (max |ref| {mag})");
        assert!(diff <= 1e-4 * mag.max(1.0), "{name}: {diff} vs {mag}");
    }
}

#[test]
fn unsupported_custom_op_is_named() {
    let err = tflite::load(&root().join("data/models/selfie_segmentation.tflite")).unwrap_err();
    let TfliteError::Unsupported(msg) = &err else {
        panic!("{err}")
    };
    assert!(msg.contains("Convolution2DTransposeBias (custom"), "{msg}");
    // Everything else in it is translated: it is the only op named.
    assert!(!msg.contains("HARD_SWISH ("), "{msg}");
}
