//! An agent whose camera detector is MediaPipe's own `face_detection_short_range.tflite`
//! (from the `mediapipe` wheel, vendored with provenance; translated to ONNX at load, feature
//! `tflite`): on a folder of frames composed from the repo's faces it publishes a face track
//! the hub's guard accepts. Skips when ffmpeg is missing.
#![cfg(feature = "tflite")]

mod common;

use std::time::Duration;

use common::{data_dir, CameraHome, Sub};
use hearth_camera::scene::Shot;
use hearth_camera::CameraConfig;
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_agent_runs_the_tflite_blazeface() {
    let shots = [
        Shot::Idle(3),
        Shot::Face {
            face: 4,
            frames: 30,
        },
    ];
    let Some(home) = CameraHome::new("camera_agent_runs_the_tflite_blazeface", &shots) else {
        return;
    };
    let mut sub = Sub::connect(home.port, "watcher", &["hearth/tfl-cam/#"]).await;
    let cfg = home.agent(
        "tfl-cam",
        CameraConfig {
            model: data_dir().join("models/face_detection_short_range.tflite"),
            source: home.folder(),
            fps: 10.0,
            ..CameraConfig::default()
        },
    );
    let agent = hearth_agent::start(cfg).await.unwrap();
    let new = sub
        .wait_for(Duration::from_secs(40), |m| {
            m.topic == "hearth/tfl-cam/event/detection"
        })
        .await
        .expect("a detection event from the .tflite detector");
    let InboundEvent::Camera(ev) = parse_event("tfl-cam", &new.payload).expect("hub guard") else {
        panic!("not a camera event: {}", new.text());
    };
    assert_eq!(ev.phase, TrackPhase::New);
    assert!(ev.score >= 0.5, "{}", new.text());
    tokio::time::timeout(Duration::from_secs(20), agent.shutdown())
        .await
        .unwrap()
        .unwrap();
}
