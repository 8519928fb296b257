//! Hearth's BlazeFace (tract + Rust anchors, decoding, weighted NMS) against the reference:
//! ONNX Runtime plus a numpy decode (`bench/camera_ref.py fixture camera/tests/fixtures`),
//! vendored as `tests/fixtures/{frames.rgb,reference.json}` so no Python runs here.
//! Same detections: same count per frame, IoU ≥ 0.9 and score within 0.02 pairwise.

use std::path::PathBuf;

use hearth_camera::detector::{iou, Backend, Detector, DetectorOptions, FRAME_BYTES};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The default backend (`auto`) runs BlazeFace in the dense engine; both it and tract match
/// the reference.
#[test]
fn detections_match_onnx_runtime_reference() {
    let path = root().join("data/models/face_detection_front_128x128_barracuda.onnx");
    let auto = Detector::load(&path, DetectorOptions::default()).unwrap();
    assert!(
        auto.backend_name().starts_with("dense-"),
        "{}",
        auto.backend_name()
    );
    let diff = auto.probe_diff().unwrap();
    eprintln!("dense vs tract on the probe frames: max |diff| {diff}");
    assert!(
        diff < 1e-3,
        "float dense engine differs from tract by {diff}"
    );
    check_against_reference(&auto);
    let tract = Detector::load(
        &path,
        DetectorOptions {
            backend: Backend::Tract,
            ..DetectorOptions::default()
        },
    )
    .unwrap();
    assert_eq!(tract.backend_name(), "tract");
    check_against_reference(&tract);
}

fn check_against_reference(det: &Detector) {
    let fixtures = root().join("camera/tests/fixtures");
    let frames = std::fs::read(fixtures.join("frames.rgb")).unwrap();
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("reference.json")).unwrap()).unwrap();
    assert!((doc["min_score"].as_f64().unwrap() - det.options().min_score as f64).abs() < 1e-6);
    assert!((doc["nms_iou"].as_f64().unwrap() - det.options().nms_iou as f64).abs() < 1e-6);
    let refs = doc["frames"].as_array().unwrap();
    assert_eq!(refs.len() * FRAME_BYTES, frames.len());
    let mut compared = 0;
    for (i, (frame, want)) in frames.chunks_exact(FRAME_BYTES).zip(refs).enumerate() {
        let got = det.detect(frame).unwrap();
        let want: Vec<([f32; 4], f32)> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let b: Vec<f32> = d["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                (
                    [b[0], b[1], b[2], b[3]],
                    d["score"].as_f64().unwrap() as f32,
                )
            })
            .collect();
        assert_eq!(got.len(), want.len(), "frame {i}: {got:?} vs {want:?}");
        for (b, s) in &want {
            let best = got
                .iter()
                .max_by(|x, y| iou(&x.bbox, b).total_cmp(&iou(&y.bbox, b)))
                .unwrap();
            let v = iou(&best.bbox, b);
            assert!(v >= 0.9, "frame {i}: IoU {v} ({:?} vs {b:?})", best.bbox);
            assert!(
                (best.score - s).abs() <= 0.02,
                "frame {i}: score {} vs {s}",
                best.score
            );
            compared += 1;
        }
    }
    // The fixture has faces (4 of them over 3 frames) and an empty frame.
    assert_eq!(compared, 4);
}
