//! An agent whose camera detector is MediaPipe's own `face_detection_short_range.tflite`
//! (from the `mediapipe` wheel, vendored with provenance; translated to ONNX at load, feature
//! `tflite`): on a folder of frames composed from the repo's faces it publishes a face track
//! the hub's guard accepts. Skips when ffmpeg is missing.
#![cfg(feature = "tflite")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{data_dir, start_broker, Sub};
use hearth_agent::Config;
use hearth_camera::scene::{write_clip_frames, Shot};
use hearth_camera::{CameraConfig, SourceConfig};
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_agent_runs_the_tflite_blazeface() {
    if !Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: ffmpeg is not installed");
        return;
    }
    let port = start_broker();
    let tmp = tempfile::tempdir().unwrap();
    let frames = tmp.path().join("frames");
    write_clip_frames(
        &data_dir().join("faces/test.csv"),
        &frames,
        &[
            Shot::Idle(3),
            Shot::Face {
                face: 4,
                frames: 30,
            },
        ],
    )
    .unwrap();
    let mut sub = Sub::connect(port, "watcher", &["hearth/tfl-cam/#"]).await;
    let cfg = Config {
        device: "tfl-cam".into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        data_dir: data_dir(),
        state_dir: tmp.path().join("state"),
        bootstrap_epochs: 1,
        camera: Some(CameraConfig {
            model: data_dir().join("models/face_detection_short_range.tflite"),
            source: SourceConfig::Folder {
                path: frames.clone(),
                glob: "*.ppm".into(),
                repeat: true,
            },
            fps: 10.0,
            ..CameraConfig::default()
        }),
        ..Config::default()
    };
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
