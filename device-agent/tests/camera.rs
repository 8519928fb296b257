//! The camera source kind: an agent with a `[camera]` table on a real HTTP MJPEG stream
//! (ffmpeg serving a clip composed from the repo's faces on loopback) publishes Frigate-style
//! events the hub's guard accepts, `online`/`offline` availability as the stream comes and
//! goes, and its counters on `hearth/<device>/camera`. Skips when ffmpeg is missing.

mod common;

use std::time::Duration;

use common::{CameraHome, Sub};
use hearth_camera::scene::Shot;
use hearth_camera::testkit::{free_port, mjpeg_url, serve_mjpeg};
use hearth_camera::{CameraConfig, SourceConfig};
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_agent_publishes_guarded_track_events_and_stream_health() {
    let shots = [
        Shot::Idle(5),
        Shot::Face {
            face: 4,
            frames: 40,
        },
    ];
    let Some(home) = CameraHome::new("camera_agent_publishes_guarded_track_events", &shots) else {
        return;
    };
    let http_port = free_port().unwrap();
    let server = serve_mjpeg(&home.frames, http_port).unwrap();

    let mut sub = Sub::connect(home.port, "watcher", &["hearth/door-cam/#"]).await;
    let cfg = home.agent(
        "door-cam",
        CameraConfig {
            source: SourceConfig::Mjpeg {
                url: mjpeg_url(http_port),
            },
            fps: 10.0,
            backoff_min_ms: 200,
            backoff_max_secs: 1.0,
            ..CameraConfig::default()
        },
    );
    let agent = hearth_agent::start(cfg).await.unwrap();
    let new = sub
        .wait_for(Duration::from_secs(40), |m| {
            m.topic == "hearth/door-cam/event/detection"
        })
        .await
        .expect("a detection event");
    assert!(new.payload.len() < 300, "{}", new.text());
    let InboundEvent::Camera(ev) = parse_event("door-cam", &new.payload).expect("hub guard") else {
        panic!("not a camera event: {}", new.text());
    };
    assert_eq!(ev.phase, TrackPhase::New);
    assert_eq!(ev.camera, "door-cam");
    // The stream dies: the track ends, the camera goes offline and counts the drop.
    drop(server);
    let end = sub
        .wait_for(Duration::from_secs(20), |m| {
            m.topic == "hearth/door-cam/event/detection"
        })
        .await
        .expect("an end event");
    let InboundEvent::Camera(end) = parse_event("door-cam", &end.payload).unwrap() else {
        panic!()
    };
    assert_eq!(
        (end.phase, end.id.as_str()),
        (TrackPhase::End, ev.id.as_str())
    );
    assert!(sub
        .wait_for(Duration::from_secs(20), |m| {
            m.topic == "hearth/door-cam/availability" && m.payload == b"offline"
        })
        .await
        .is_some());
    let status = sub
        .wait_for(Duration::from_secs(20), |m| {
            m.topic == "hearth/door-cam/camera"
                && serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .is_ok_and(|v| v["disconnects"].as_u64() >= Some(1))
        })
        .await
        .expect("camera status with the disconnect");
    let v: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert!(v["frames"].as_u64().unwrap() > 0 && v["detector_runs"].as_u64().unwrap() > 0);
    assert!(!status.text().contains("rgb") && status.payload.len() < 1024);
    tokio::time::timeout(Duration::from_secs(20), agent.shutdown())
        .await
        .unwrap()
        .unwrap();
}
