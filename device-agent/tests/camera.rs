//! The camera source kind: an agent with a `[camera]` table on a real HTTP MJPEG stream
//! (ffmpeg serving a clip composed from the repo's faces on loopback) publishes Frigate-style
//! events the hub's guard accepts, `online`/`offline` availability as the stream comes and
//! goes, and its counters on `hearth/<device>/camera`. Skips when ffmpeg is missing.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{data_dir, start_broker, Sub};
use hearth_agent::Config;
use hearth_camera::scene::{write_clip_frames, Shot};
use hearth_camera::{CameraConfig, SourceConfig};
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_mjpeg(frames: &std::path::Path, port: u16) -> Proc {
    Proc(
        Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
            .args(["-stream_loop", "-1", "-framerate", "10", "-i"])
            .arg(frames.join("frame_%05d.ppm"))
            .args(["-f", "mpjpeg", "-q:v", "5", "-listen", "1"])
            .arg(format!("http://127.0.0.1:{port}/stream.mjpg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_agent_publishes_guarded_track_events_and_stream_health() {
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
            Shot::Idle(5),
            Shot::Face {
                face: 4,
                frames: 40,
            },
        ],
    )
    .unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    drop(http);
    let server = serve_mjpeg(&frames, http_port);

    let mut sub = Sub::connect(port, "watcher", &["hearth/door-cam/#"]).await;
    let cfg = Config {
        device: "door-cam".into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        data_dir: data_dir(),
        state_dir: tmp.path().join("state"),
        bootstrap_epochs: 1,
        camera: Some(CameraConfig {
            source: SourceConfig::Mjpeg {
                url: format!("http://127.0.0.1:{http_port}/stream.mjpg"),
            },
            fps: 10.0,
            backoff_min_ms: 200,
            backoff_max_secs: 1.0,
            ..CameraConfig::default()
        }),
        ..Config::default()
    };
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
