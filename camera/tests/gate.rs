//! The detector gate on real frames (the repo's faces through the real detector), with
//! simulated time: motion gating, the periodic checks and the per-camera rate limit.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_camera::detector::{FRAME_BYTES, INPUT_SIZE};
use hearth_camera::{CameraConfig, CameraStats, Detector, DetectorOptions, Gate};
use hearth_proto::mqtt::TrackPhase;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The vendored reference frames: 0–2 have faces, 3 is the empty scene.
fn fixture_frames() -> Vec<Vec<u8>> {
    std::fs::read(root().join("camera/tests/fixtures/frames.rgb"))
        .unwrap()
        .chunks_exact(FRAME_BYTES)
        .map(<[u8]>::to_vec)
        .collect()
}

fn detector() -> Detector {
    Detector::load(
        &root().join("data/models/face_detection_front_128x128_barracuda.onnx"),
        DetectorOptions::default(),
    )
    .unwrap()
}

#[test]
fn idle_frames_skip_the_detector_and_a_still_face_is_checked_periodically() {
    let det = detector();
    let frames = fixture_frames();
    let cfg = CameraConfig {
        max_detect_fps: 5.0,
        track_check_secs: 1.0,
        forced_check_secs: 10.0,
        ..CameraConfig::default()
    };
    let mut gate = Gate::new(&cfg, "door-cam", "blazeface@1");
    let stats = CameraStats::default();
    let t0 = Instant::now();
    let mut ev = Vec::new();
    let mut runs_idle = 0;
    // 20 s of the empty scene at 10 fps: the first frame (motion) and the forced checks.
    for i in 0..200 {
        let o = gate.frame(
            &det,
            &frames[3],
            t0 + Duration::from_millis(i * 100),
            i as f64 * 0.1,
            &stats,
            &mut ev,
        );
        runs_idle += usize::from(o.detections.is_some());
    }
    assert!(
        (2..=3).contains(&runs_idle),
        "{runs_idle} runs on 200 idle frames"
    );
    // A face appears and stays still for 10 s: one new, checked about once a second.
    let mut runs_face = 0;
    for i in 200..300 {
        let o = gate.frame(
            &det,
            &frames[0],
            t0 + Duration::from_millis(i * 100),
            i as f64 * 0.1,
            &stats,
            &mut ev,
        );
        runs_face += usize::from(o.detections.is_some());
    }
    assert!(
        (8..=15).contains(&runs_face),
        "{runs_face} runs in 10 s of a still face"
    );
    // It leaves; the scene is still again.
    for i in 300..400 {
        gate.frame(
            &det,
            &frames[3],
            t0 + Duration::from_millis(i * 100),
            i as f64 * 0.1,
            &stats,
            &mut ev,
        );
    }
    let phases: Vec<_> = ev.iter().map(|e| e.phase).collect();
    assert_eq!(phases, [TrackPhase::New, TrackPhase::End], "{ev:?}");
}

#[test]
fn detector_runs_are_rate_limited_per_camera() {
    let det = detector();
    let frames = fixture_frames();
    let cfg = CameraConfig {
        max_detect_fps: 4.0,
        ..CameraConfig::default()
    };
    let mut gate = Gate::new(&cfg, "door-cam", "blazeface@1");
    let stats = CameraStats::default();
    let t0 = Instant::now();
    let mut ev = Vec::new();
    // 5 s at 30 fps of a scene that changes on every frame (inverted every other frame).
    let inverted: Vec<u8> = frames[1].iter().map(|b| 255 - b).collect();
    let mut runs = 0;
    let mut limited = 0;
    for i in 0..150u64 {
        let f = if i % 2 == 0 { &frames[1] } else { &inverted };
        let o = gate.frame(
            &det,
            f,
            t0 + Duration::from_micros(i * 33_333),
            i as f64 / 30.0,
            &stats,
            &mut ev,
        );
        assert!(o.motion || i == 0);
        runs += usize::from(o.detections.is_some());
        limited += usize::from(o.rate_limited);
    }
    assert!((19..=21).contains(&runs), "{runs} runs in 5 s at 4/s");
    assert_eq!(runs + limited, 150);
    assert_eq!(
        stats.snapshot().rate_limited as usize,
        limited,
        "refusals are counted"
    );
    assert_eq!(INPUT_SIZE, 128);
}
