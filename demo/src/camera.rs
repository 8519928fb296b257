//! The demo's live camera: a clip composed from the repo's face crops (`data/faces`),
//! served over loopback HTTP MJPEG by ffmpeg itself (`-f mpjpeg -listen 1`, restarted after
//! each client), watched by one camera agent (`door-cam-live`, `[camera]` source kind:
//! ffmpeg decoding, BlazeFace (dense engine or tract), motion gate, tracker) whose track events turn the
//! porch light on through the rule [`crate::DEMO_RULES`] names for it. Without ffmpeg the
//! phase is skipped, saying so.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hearth_camera::scene::{write_clip_frames, Shot};
use hearth_camera::{CameraConfig, SourceConfig};
use hearth_edge::{ClientSettings, MqttUrl};
use hearth_hub::Role;
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};
use tokio::sync::watch;

use crate::{device_error, token, Error, Home, Result};

/// Device name of the live camera.
pub const LIVE_CAMERA: &str = "door-cam-live";

/// What the live camera phase saw.
#[derive(Debug, Clone, Default)]
pub struct LiveCameraReport {
    /// Seconds from the agent's start to the first `new` event.
    pub first_track_secs: f64,
    /// Seconds from the first `new` event to the porch light applying a command.
    pub light_after_secs: f64,
    /// Track events received from the camera: new, update, end.
    pub events: [u64; 3],
    /// The camera's counters (its retained `hearth/door-cam-live/camera` status).
    pub status: serde_json::Value,
}

fn have_ffmpeg() -> bool {
    std::process::Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Serves `frames/frame_%05d.ppm` (looped, 10 fps) as HTTP MJPEG on `port` until `stop`;
/// ffmpeg's HTTP server takes one client, so it is restarted when it exits.
async fn serve(frames: std::path::PathBuf, port: u16, mut stop: watch::Receiver<bool>) {
    for _ in 0..1000 {
        let child = tokio::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
            .args(["-stream_loop", "-1", "-framerate", "10", "-i"])
            .arg(frames.join("frame_%05d.ppm"))
            .args(["-f", "mpjpeg", "-q:v", "5", "-listen", "1"])
            .arg(format!("http://127.0.0.1:{port}/stream.mjpg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let Ok(mut child) = child else { return };
        tokio::select! {
            _ = child.wait() => {}
            _ = stop.changed() => {
                let _ = child.kill().await;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Home {
    /// Runs the live camera phase (bounded by `limit`): starts the stream and the camera
    /// agent, waits for its first face track and for the porch light to apply the command the
    /// camera rule sent, then stops both. `None` when ffmpeg is not installed.
    pub async fn live_camera(
        &self,
        data_dir: &Path,
        state_dir: &Path,
        limit: Duration,
    ) -> Result<Option<LiveCameraReport>> {
        if !have_ffmpeg() {
            return Ok(None);
        }
        let io = |what: String| move |source| Error::Io { what, source };
        let dir = state_dir.join(LIVE_CAMERA);
        let frames = dir.join("frames");
        write_clip_frames(
            &data_dir.join("faces/test.csv"),
            &frames,
            &[
                Shot::Idle(10),
                Shot::Face {
                    face: 0,
                    frames: 60,
                },
                Shot::Idle(20),
            ],
        )
        .map_err(|e| Error::Mqtt(format!("composing the camera clip: {e}")))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("binding a port for the camera stream".into()))?
            .port();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(frames, port, stop_rx));

        // Watch the camera's topics with an admin login.
        let url = MqttUrl::parse(&self.client_url("demo-camera-watch", Role::Admin)?)
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        let (client, mut el) = ClientSettings::new(url, token("camwatch"))
            .keep_alive(Duration::from_secs(5))
            .request_capacity(10)
            .connect()
            .map_err(|e| Error::Mqtt(e.to_string()))?;
        client
            .subscribe(format!("hearth/{LIVE_CAMERA}/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))?;

        let cfg = hearth_agent::Config {
            device: LIVE_CAMERA.into(),
            mqtt: self.client_url(LIVE_CAMERA, Role::Device)?,
            task: "faces".into(),
            data_dir: data_dir.to_path_buf(),
            state_dir: dir.join("state"),
            bootstrap_epochs: 1,
            camera: Some(CameraConfig {
                source: SourceConfig::Mjpeg {
                    url: format!("http://127.0.0.1:{port}/stream.mjpg"),
                },
                fps: 10.0,
                model: data_dir.join("models/face_detection_front_128x128_barracuda.onnx"),
                backoff_min_ms: 200,
                backoff_max_secs: 2.0,
                ..CameraConfig::default()
            }),
            ..Default::default()
        };
        let applied_before = self.light.stats().commands_applied.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let agent = hearth_agent::start(cfg)
            .await
            .map_err(device_error(LIVE_CAMERA))?;
        let mut report = LiveCameraReport::default();
        let mut first_new: Option<Instant> = None;
        let deadline = t0 + limit;
        let mut lit = false;
        while Instant::now() < deadline && !lit {
            let ev = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) = ev {
                if p.topic == format!("hearth/{LIVE_CAMERA}/event/detection") {
                    if let Ok(InboundEvent::Camera(c)) = parse_event(LIVE_CAMERA, &p.payload) {
                        report.events[c.phase as usize] += 1;
                        if c.phase == TrackPhase::New && first_new.is_none() {
                            first_new = Some(Instant::now());
                            report.first_track_secs = t0.elapsed().as_secs_f64();
                        }
                    }
                }
            }
            if let Some(t) = first_new {
                if self.light.stats().commands_applied.load(Ordering::Relaxed) > applied_before {
                    report.light_after_secs = t.elapsed().as_secs_f64();
                    lit = true;
                }
            }
        }
        agent.shutdown().await.map_err(device_error(LIVE_CAMERA))?;
        // The retained status the camera published last (its final counters).
        let status_deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < status_deadline {
            let ev = tokio::time::timeout(Duration::from_millis(200), el.poll()).await;
            if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) = ev {
                if p.topic == format!("hearth/{LIVE_CAMERA}/camera") {
                    report.status = serde_json::from_slice(&p.payload).unwrap_or_default();
                } else if p.topic == format!("hearth/{LIVE_CAMERA}/event/detection") {
                    if let Ok(InboundEvent::Camera(c)) = parse_event(LIVE_CAMERA, &p.payload) {
                        report.events[c.phase as usize] += 1;
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        if !lit {
            return Err(Error::Timeout {
                what: "the live camera's detections did not turn the porch light on".into(),
                limit,
            });
        }
        Ok(Some(report))
    }
}
