//! MediaPipe's own BlazeFace, `face_detection_short_range.tflite` from the `mediapipe` 0.10.14
//! wheel (vendored with provenance in data/models/), loaded by the camera detector through
//! Hearth's TFLite translation: its raw outputs match the TFLite runtime's (ai-edge-litert,
//! `data/models/reference/`) and the vendored ONNX BlazeFace's, and it finds the same faces as
//! the ONNX Runtime reference detections of `tests/reference.rs`.
#![cfg(feature = "tflite")]

use std::path::PathBuf;

use hearth_camera::detector::{iou, Detector, DetectorOptions, FRAME_BYTES, NUM_ANCHORS};
use hearth_model::formats::npy;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn frames() -> Vec<u8> {
    std::fs::read(root().join("camera/tests/fixtures/frames.rgb")).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tflite_blazeface_matches_the_tflite_runtime_and_the_onnx_graph() {
    let opts = DetectorOptions::default();
    let tfl = Detector::load(
        &root().join("data/models/face_detection_short_range.tflite"),
        opts,
    )
    .unwrap();
    let onnx = Detector::load(
        &root().join("data/models/face_detection_front_128x128_barracuda.onnx"),
        opts,
    )
    .unwrap();
    let npz = root().join("data/models/reference/face_detection_short_range.npz");
    let ref_scores = npy::read_npz(&npz, "classificators").unwrap();
    let ref_boxes = npy::read_npz(&npz, "regressors").unwrap();
    let frames = frames();
    for (i, frame) in frames.chunks_exact(FRAME_BYTES).enumerate() {
        let (s, b) = tfl.raw(frame).unwrap();
        assert_eq!(s.len(), NUM_ANCHORS);
        let want_s: Vec<f32> = ref_scores.data[i * NUM_ANCHORS..(i + 1) * NUM_ANCHORS]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want_b: Vec<f32> = ref_boxes.data[i * NUM_ANCHORS * 16..(i + 1) * NUM_ANCHORS * 16]
            .iter()
            .map(|&v| v as f32)
            .collect();
        let (ds, db) = (max_diff(&s, &want_s), max_diff(&b, &want_b));
        assert!(ds < 1e-3 && db < 1e-3, "frame {i}: vs litert {ds} {db}");
        // The barracuda ONNX export carries the same network and weights (measured: identical
        // outputs in tract on x86_64).
        let (os, ob) = onnx.raw(frame).unwrap();
        let (es, eb) = (max_diff(&s, &os), max_diff(&b, &ob));
        eprintln!("frame {i}: vs litert {ds:e} {db:e}; vs ONNX graph {es:e} {eb:e}");
        assert!(es < 1e-3 && eb < 1e-3, "frame {i}: vs ONNX {es} {eb}");
    }
}

#[test]
fn tflite_blazeface_finds_the_reference_faces() {
    let det = Detector::load(
        &root().join("data/models/face_detection_short_range.tflite"),
        DetectorOptions::default(),
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("camera/tests/fixtures/reference.json")).unwrap(),
    )
    .unwrap();
    let frames = frames();
    let mut compared = 0;
    for (i, (frame, want)) in frames
        .chunks_exact(FRAME_BYTES)
        .zip(doc["frames"].as_array().unwrap())
        .enumerate()
    {
        let got = det.detect(frame).unwrap();
        let want = want.as_array().unwrap();
        assert_eq!(got.len(), want.len(), "frame {i}: {got:?}");
        for d in want {
            let b: Vec<f32> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let b = [b[0], b[1], b[2], b[3]];
            let best = got.iter().map(|g| iou(&g.bbox, &b)).fold(0.0, f32::max);
            assert!(best >= 0.9, "frame {i}: IoU {best}");
            compared += 1;
        }
    }
    assert_eq!(compared, 4);
}
