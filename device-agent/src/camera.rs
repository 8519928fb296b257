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
//! Learning on the camera: when the agent's task takes BlazeFace's embedding (a task whose
//! input is a vector of [`EMBED_DIM`] values, e.g. `data/faces-cam/task.toml`), the camera
//! embeds the crop of every track it reports (`new`, `update`) with the detector's frozen
//! backbone ([`hearth_camera::embed`]); the agent's model — a small head, federated like any
//! model — classifies the embedding, the verdict rides on the event as `sub_label` /
//! `sub_score` (Frigate's field for a recognised face), and the embedding is kept in the sample
//! store behind the track's id, so `{"event": <track id>, "label": <class>}` on
//! `hearth/<device>/feedback` labels it for the next round. Crops never leave the camera
//! worker; embeddings never leave the agent; only the head's clipped, quantized update
//! goes to the coordinator.
//!
//! Federation, model announcements and the rest of the agent are unchanged.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_camera::{Detector, DetectorOptions, Embedder, SourceState, TrackFeatures, EMBED_DIM};
use hearth_edge::stopped;
use hearth_model::task::Input;
use hearth_model::TaskSpec;
use hearth_proto::mqtt::{
    availability_topic, event_topic, parse_event, CameraEvent, TrackPhase, ROOT,
};
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

/// Whether `task` is a head on the camera's embedding (a vector of [`EMBED_DIM`] values).
pub fn is_camera_head(task: &TaskSpec) -> bool {
    matches!(task.input, Input::Vector { length } if length == EMBED_DIM)
}

/// The last head verdict of recent tracks (their `end` carries it too); bounded.
#[derive(Debug, Default)]
struct Verdicts(VecDeque<(String, String, f32)>);

impl Verdicts {
    const CAPACITY: usize = 256;

    fn put(&mut self, id: &str, label: &str, score: f32) {
        self.0.retain(|(k, _, _)| k != id);
        if self.0.len() >= Self::CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back((id.to_string(), label.to_string(), score));
    }

    fn take(&mut self, id: &str) -> Option<(String, f32)> {
        let i = self.0.iter().position(|(k, _, _)| k == id)?;
        self.0.remove(i).map(|(_, l, s)| (l, s))
    }
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
    // Learning on the camera: the frozen backbone, when the agent's model is a head on it.
    let embedder = if is_camera_head(&shared.task) {
        let path = model_path(&shared.config, &cam);
        match tokio::task::spawn_blocking(move || Embedder::load(&path)).await {
            Ok(Ok(e)) => Some(Arc::new(e)),
            Ok(Err(e)) => {
                tracing::error!("camera: cannot load the embedder, the head is off: {e}");
                None
            }
            Err(e) => {
                tracing::error!("camera: embedder loading failed, the head is off: {e}");
                None
            }
        }
    } else {
        tracing::info!(
            task = %shared.task.name,
            "camera: the task does not take the BlazeFace embedding ({EMBED_DIM} values): no head on tracks"
        );
        None
    };
    let mut handle =
        match hearth_camera::start_with(cam.clone(), &device, DETECTOR_TAG, detector, embedder) {
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
    let features = handle.features();
    let mut verdicts = Verdicts::default();
    shared.metrics.set_camera(&device, stats.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_state: Option<SourceState> = None;
    let mut last_status = Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            ev = handle.events.recv() => match ev {
                Some(ev) => {
                    let ev = head_verdict(&shared, features.as_deref(), &mut verdicts, ev).await;
                    publish_event(&shared, &topic, &device, ev).await
                }
                None => break,
            },
            _ = tick.tick() => {
                shared.metrics.sample_camera(&stats);
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
        let ev = head_verdict(&shared, features.as_deref(), &mut verdicts, ev).await;
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

/// The head's verdict on a track event: for `new`/`update`, the embedding the camera left
/// for it is classified by the model in use (off the runtime) and kept in the sample store
/// behind the track's id (feedback labels it); `end` carries the track's last verdict.
async fn head_verdict(
    shared: &Arc<crate::agent::Shared>,
    features: Option<&TrackFeatures>,
    verdicts: &mut Verdicts,
    mut ev: CameraEvent,
) -> CameraEvent {
    if ev.phase == TrackPhase::End {
        if let Some((l, s)) = verdicts.take(&ev.id) {
            ev.sub_label = Some(l);
            ev.sub_score = Some(s);
        }
        return ev;
    }
    let Some(x) = features.and_then(|f| f.take(&ev.id)) else {
        return ev;
    };
    let model = shared.slot.current();
    let store = shared.samples.clone();
    let id = ev.id.clone();
    let r = tokio::task::spawn_blocking(move || {
        let probs = model.classifier.predict(&x)?;
        let (best, p) = probs
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, p)| p.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .ok_or_else(|| crate::Error::Protocol("head returned no finite probability".into()))?;
        let class = model.classes().get(best).cloned().unwrap_or_default();
        let kept = match &store {
            Some(s) => match s.insert(&id, &x, best as u16) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("camera: embedding not kept: {e}");
                    false
                }
            },
            None => false,
        };
        Ok::<_, crate::Error>((class, p.clamp(0.0, 1.0), kept))
    })
    .await;
    match r {
        Ok(Ok((class, p, kept))) => {
            add(&shared.stats.head_verdicts, 1);
            if kept {
                add(&shared.stats.samples_stored, 1);
            }
            verdicts.put(&ev.id, &class, p);
            ev.sub_label = Some(class);
            ev.sub_score = Some(p);
        }
        Ok(Err(e)) => {
            add(&shared.stats.inference_errors, 1);
            tracing::warn!("camera: head failed: {e}");
        }
        Err(e) => {
            add(&shared.stats.inference_errors, 1);
            tracing::warn!("camera: head task failed: {e}");
        }
    }
    ev
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
