//! The demo's live camera: a clip composed from the repo's face crops (`data/faces`),
//! served over loopback HTTP MJPEG by ffmpeg itself (`-f mpjpeg -listen 1`, restarted after
//! each client), watched by one learning camera agent (`door-cam-live`, `[camera]` source
//! kind: ffmpeg decoding, BlazeFace (dense engine or tract), motion gate, tracker; task
//! `faces-cam`: a small head, trained on the device at start, on BlazeFace's frozen backbone
//! embedding of each track's crop, its verdict on the events as Frigate's `sub_label`). The
//! rule [`crate::LIVE_CAMERA_RULE`] turns the porch light on for a face track the head calls
//! a `person`. Without ffmpeg the phase is skipped, saying so.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hearth_camera::scene::Shot;
use hearth_camera::testkit::{clip, ffmpeg_available, mjpeg_server_args, mjpeg_url, QUIET};
use hearth_camera::{CameraConfig, SourceConfig};
use hearth_edge::{ClientSettings, MqttUrl};
use hearth_hub::Role;
use hearth_model::{accuracy, Classifier, OnnxModel, Split, TaskSpec};
use hearth_proto::mqtt::{parse_event, CameraEvent, InboundEvent, TrackPhase};
use tokio::sync::watch;

use crate::{device_error, token, Error, Home, Result, LIVE_CAMERA_RULE};

/// Device name of the live camera.
pub const LIVE_CAMERA: &str = "door-cam-live";
/// The live camera's task: a head on BlazeFace's embedding (`data/faces-cam`).
pub const LIVE_CAMERA_TASK: &str = "faces-cam";
/// Epochs the camera trains its head for at start, on the device's own labelled embeddings
/// (a few milliseconds: 150 embeddings, a 192-16-2 MLP).
const HEAD_EPOCHS: u32 = 40;

/// What the live camera phase saw.
#[derive(Debug, Clone, Default)]
pub struct LiveCameraReport {
    /// Seconds from the agent's start to the first `new` event.
    pub first_track_secs: f64,
    /// Seconds from the first `new` event to the porch light applying a command.
    pub light_after_secs: f64,
    /// Track events received from the camera: new, update, end.
    pub events: [u64; 3],
    /// The head's verdicts (`sub_label`) on the `new` and `update` events, by class.
    pub verdicts: BTreeMap<String, u64>,
    /// `new` and `update` events that came without a verdict.
    pub without_verdict: u64,
    /// Firings of [`LIVE_CAMERA_RULE`] during the phase.
    pub rule_fired: u64,
    /// Held-out accuracy of the camera's head (the weights it ran, on `data/faces-cam`'s
    /// test embeddings) and the number of those embeddings.
    pub head_accuracy: f64,
    pub head_test_samples: usize,
    /// The camera's counters (its retained `hearth/door-cam-live/camera` status).
    pub status: serde_json::Value,
}

impl LiveCameraReport {
    fn count(&mut self, c: &CameraEvent) {
        self.events[c.phase as usize] += 1;
        if c.phase == TrackPhase::End {
            return; // it repeats the track's last verdict
        }
        match &c.sub_label {
            Some(l) => *self.verdicts.entry(l.clone()).or_default() += 1,
            None => self.without_verdict += 1,
        }
    }

    /// Verdicts that say `person`: every object in the demo's clip is a face.
    pub fn person_verdicts(&self) -> u64 {
        self.verdicts.get("person").copied().unwrap_or(0)
    }

    /// All verdicts.
    pub fn total_verdicts(&self) -> u64 {
        self.verdicts.values().sum()
    }
}

/// Serves `frames/frame_%05d.ppm` (looped, 10 fps) as HTTP MJPEG on `port` until `stop`;
/// ffmpeg's HTTP server takes one client, so it is restarted when it exits.
async fn serve(frames: std::path::PathBuf, port: u16, mut stop: watch::Receiver<bool>) {
    for _ in 0..1000 {
        let child = tokio::process::Command::new("ffmpeg")
            .args(QUIET)
            .args(mjpeg_server_args(&frames, port))
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
    /// Runs the live camera phase (bounded by `limit`): starts the stream and the learning
    /// camera agent, waits for its first face track and for the porch light to apply the
    /// command the camera rule sent on the head's verdict, then stops both and measures the
    /// head it ran on held-out embeddings. `None` when ffmpeg is not installed.
    pub async fn live_camera(
        &self,
        data_dir: &Path,
        state_dir: &Path,
        limit: Duration,
    ) -> Result<Option<LiveCameraReport>> {
        if !ffmpeg_available() {
            return Ok(None);
        }
        let io = |what: String| move |source| Error::Io { what, source };
        let dir = state_dir.join(LIVE_CAMERA);
        let frames = clip(
            data_dir,
            &dir,
            &[
                Shot::Idle(10),
                Shot::Face {
                    face: 0,
                    frames: 60,
                },
                Shot::Idle(20),
            ],
        )
        .map_err(|e| Error::Camera(format!("composing the clip: {e}")))?;
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
            task: LIVE_CAMERA_TASK.into(),
            data_dir: data_dir.to_path_buf(),
            state_dir: dir.join("state"),
            bootstrap_epochs: HEAD_EPOCHS,
            camera: Some(CameraConfig {
                source: SourceConfig::Mjpeg {
                    url: mjpeg_url(port),
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
        let fired_before = self.live_rule_fired();
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
                        report.count(&c);
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
        // The head the camera ran, measured on the held-out embeddings (off the runtime).
        let weights = agent.model_weights();
        let task_dir = data_dir.to_path_buf();
        let measured = tokio::task::spawn_blocking(move || {
            let task = TaskSpec::resolve(LIVE_CAMERA_TASK, &task_dir)?;
            let test = task.load(Split::Test)?;
            let mut head = OnnxModel::build_mlp(&task.mlp_spec(), 0);
            head.set_weights(&weights)?;
            let acc = accuracy(&Classifier::new(&head)?, &test)?;
            Ok::<_, hearth_model::ModelError>((acc, test.len()))
        })
        .await
        .map_err(|e| Error::Camera(format!("measuring the head: {e}")))?
        .map_err(|e| Error::Camera(format!("measuring the head: {e}")))?;
        (report.head_accuracy, report.head_test_samples) = (f64::from(measured.0), measured.1);
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
                        report.count(&c);
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        report.rule_fired = self.live_rule_fired().saturating_sub(fired_before);
        if !lit {
            return Err(Error::Timeout {
                what: format!(
                    "the live camera's head verdicts {:?} (and {} events without one) did not \
                     turn the porch light on",
                    report.verdicts, report.without_verdict
                ),
                limit,
            });
        }
        Ok(Some(report))
    }

    /// Firings of [`LIVE_CAMERA_RULE`] since the hub started.
    fn live_rule_fired(&self) -> u64 {
        self.hub
            .rules()
            .rules()
            .iter()
            .find(|r| r.name == LIVE_CAMERA_RULE)
            .map_or(0, |r| r.fired())
    }
}
