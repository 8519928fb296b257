//! The camera source kind: with a `[camera]` table in its config the agent runs a camera
//! (`hearth-camera`: ffmpeg frames, BlazeFace in tract, motion gate, tracker) instead of
//! replaying its data set, and publishes the tracker's Frigate-style events on
//! `hearth/<device>/event/<camera.event>` — checked with the hub's own guard first; never a
//! pixel. The stream's health is published too:
//! - `hearth/<device>/availability`: `online` while frames flow, `offline` while the stream
//!   is down (retained, as the agent's last will);
//! - `hearth/<device>/camera` (retained): the state and every counter of
//!   [`hearth_camera::StatsSnapshot`] (frames, drops, stalls, short reads, bad streams,
//!   reconnects, detector runs, rate-limited runs, events), on every state change and every
//!   30 s.
//!
//! Federation, model announcements and the rest of the agent are unchanged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_camera::{Detector, DetectorOptions, SourceState};
use hearth_edge::stopped;
use hearth_proto::mqtt::{availability_topic, event_topic, parse_event, CameraEvent, ROOT};
use rumqttc::QoS;
use tokio::sync::watch;

use crate::agent::Shared;
use crate::stats::add;

/// Tag of the detector in events.
pub const DETECTOR_TAG: &str = "blazeface@1";
/// How often the camera status is republished without a state change.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// `hearth/<device>/camera`: the retained camera status.
pub fn status_topic(device: &str) -> String {
    format!("{ROOT}/{device}/camera")
}

/// The detector file: `model` as given, or, when that relative path does not exist,
/// `<data_dir>/models/<file name>` (the vendored model beside the data sets).
fn model_path(cfg: &crate::Config, cam: &hearth_camera::CameraConfig) -> PathBuf {
    if cam.model.is_relative() && !cam.model.exists() {
        if let Some(name) = cam.model.file_name() {
            return cfg.data_dir.join("models").join(name);
        }
    }
    cam.model.clone()
}

/// Runs the camera until `stop`; `done` turns true when a finite source (file, folder) ended
/// or the camera could not start.
pub(crate) async fn camera_loop(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let Some(cam) = shared.config.camera.clone() else {
        let _ = done.send(true);
        return;
    };
    let device = shared.config.device.clone();
    let path = model_path(&shared.config, &cam);
    let opts = DetectorOptions {
        min_score: cam.min_score,
        nms_iou: cam.nms_iou,
        backend: cam.backend,
    };
    let detector = match tokio::task::spawn_blocking(move || Detector::load(&path, opts)).await {
        Ok(Ok(d)) => Arc::new(d),
        Ok(Err(e)) => {
            add(&shared.stats.inference_errors, 1);
            tracing::error!("camera: cannot load the detector: {e}");
            let _ = done.send(true);
            return;
        }
        Err(e) => {
            add(&shared.stats.inference_errors, 1);
            tracing::error!("camera: detector loading failed: {e}");
            let _ = done.send(true);
            return;
        }
    };
    let mut handle = match hearth_camera::start(cam.clone(), &device, DETECTOR_TAG, detector) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("camera: {e}");
            let _ = done.send(true);
            return;
        }
    };
    tracing::info!(
        device = %device,
        source = cam.source.kind(),
        fps = cam.fps,
        frame_memory_bytes = cam.frame_memory_bytes(),
        "camera started"
    );
    let topic = event_topic(&device, &cam.event);
    let stats = handle.stats();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_state: Option<SourceState> = None;
    let mut last_status = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            ev = handle.events.recv() => match ev {
                Some(ev) => publish_event(&shared, &topic, &device, ev).await,
                None => break,
            },
            _ = tick.tick() => {
                let state = stats.state();
                if last_state != Some(state) || last_status.elapsed() >= STATUS_EVERY {
                    if last_state != Some(state) {
                        tracing::info!(device = %device, state = ?state, "camera state");
                        let avail = match state {
                            SourceState::Streaming => Some("online"),
                            SourceState::Down => Some("offline"),
                            _ => None,
                        };
                        if let Some(a) = avail {
                            let _ = shared.mqtt.publish(availability_topic(&device), QoS::AtLeastOnce, true, a).await;
                        }
                        if state == SourceState::Finished {
                            let _ = done.send(true);
                        }
                    }
                    last_state = Some(state);
                    last_status = Instant::now();
                    let body = serde_json::to_vec(&stats.snapshot()).expect("stats serialise");
                    let _ = shared.mqtt.publish(status_topic(&device), QoS::AtLeastOnce, true, body).await;
                }
            }
        }
    }
    // Stopping ends the live tracks: their `end` events still go out.
    handle.shutdown().await;
    while let Ok(ev) = handle.events.try_recv() {
        publish_event(&shared, &topic, &device, ev).await;
    }
    let body = serde_json::to_vec(&stats.snapshot()).expect("stats serialise");
    let _ = shared
        .mqtt
        .publish(status_topic(&device), QoS::AtLeastOnce, true, body)
        .await;
    tracing::info!(device = %device, stats = ?stats.snapshot(), "camera stopped");
    let _ = done.send(true);
}

async fn publish_event(shared: &Shared, topic: &str, device: &str, ev: CameraEvent) {
    let payload = ev.to_json();
    // The hub's own guard: size, schema, field contents, camera = device.
    if let Err(e) = parse_event(device, &payload) {
        add(&shared.stats.inference_errors, 1);
        tracing::warn!("camera: refusing to publish an invalid event: {e}");
        return;
    }
    match shared
        .mqtt
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
    {
        Ok(()) => add(&shared.stats.events_published, 1),
        Err(e) => tracing::warn!("camera: MQTT client closed: {e}"),
    }
}
