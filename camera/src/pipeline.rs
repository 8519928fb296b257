//! One camera end to end: the ffmpeg source (async task) hands pooled frames to a worker
//! thread that runs the motion gate, the rate-limited detector and the tracker, and sends
//! the tracker's events on a bounded channel.
//!
//! Gating, per frame: the detector runs when the frame has motion, when a track is live
//! and `track_check_secs` passed since the last run (a person standing still is still
//! checked, so the track neither ends nor duplicates), or when `forced_check_secs` passed
//! (something that appeared without motion is found). Whatever the reason, runs are at
//! least `1 / max_detect_fps` apart (the per-camera rate limit; refusals are counted).
//! When the stream goes down, live tracks end. The worker is a plain thread: inference
//! never runs on the async runtime.
//!
//! With an [`Embedder`] ([`start_with`]), the worker also embeds the crop of every track it
//! sends a `new` or `update` for, and leaves the embedding in [`TrackFeatures`] under the
//! track's id *before* the event is sent: the agent's head classifies it and keeps it behind
//! the event for feedback. The crop never leaves the worker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_proto::mqtt::{CameraEvent, TrackPhase};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::CameraConfig;
use crate::detector::{Detection, Detector};
use crate::embed::Embedder;
use crate::motion::{Motion, MotionOptions};
use crate::source::{run_source, FramePool, SourceMsg};
use crate::stats::CameraStats;
use crate::tracker::{Tracker, TrackerOptions};
use crate::Error;

/// Events waiting for the publisher, at most.
pub const EVENT_QUEUE: usize = 64;

/// Embeddings of the latest `new`/`update` crop of each track, by track id (bounded: the
/// oldest entries go when `capacity` is reached; the reader takes what it uses).
#[derive(Debug)]
pub struct TrackFeatures {
    inner: Mutex<VecDeque<(String, Vec<f32>)>>,
    capacity: usize,
}

impl TrackFeatures {
    /// Holds at most `capacity` embeddings.
    pub fn new(capacity: usize) -> TrackFeatures {
        TrackFeatures {
            inner: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity: capacity.max(1),
        }
    }

    /// Leaves the embedding of track `id` (replacing an older one of the same track).
    pub fn put(&self, id: &str, features: Vec<f32>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|(k, _)| k != id);
        while g.len() >= self.capacity {
            g.pop_front();
        }
        g.push_back((id.to_string(), features));
    }

    /// Takes the embedding of track `id`, if one is waiting.
    pub fn take(&self, id: &str) -> Option<Vec<f32>> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let i = g.iter().position(|(k, _)| k == id)?;
        g.remove(i).map(|(_, f)| f)
    }

    /// Embeddings waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A running camera.
pub struct CameraHandle {
    /// Track events, in order.
    pub events: mpsc::Receiver<CameraEvent>,
    stats: Arc<CameraStats>,
    features: Option<Arc<TrackFeatures>>,
    stop: watch::Sender<bool>,
    source: Option<JoinHandle<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for CameraHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CameraHandle")
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

impl CameraHandle {
    pub fn stats(&self) -> Arc<CameraStats> {
        self.stats.clone()
    }

    /// The tracks' embeddings (with an embedder, [`start_with`]).
    pub fn features(&self) -> Option<Arc<TrackFeatures>> {
        self.features.clone()
    }

    /// Stops the source (its ffmpeg is killed and reaped), then the worker, which ends the
    /// live tracks (their `end` events stay readable on `events`).
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.source.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
        if let Some(w) = self.worker.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }
}

/// Unix time in seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The detector part of a camera: motion gate, rate limit, tracker. Synchronous; fed one
/// frame at a time (the worker thread, the benchmark).
#[derive(Debug)]
pub struct Gate {
    motion: Motion,
    tracker: Tracker,
    last_run: Option<Instant>,
    min_interval: Duration,
    track_check: Duration,
    forced_check: Duration,
}

/// What happened to one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameOutcome {
    pub motion: bool,
    /// Detections, when the detector ran.
    pub detections: Option<Vec<Detection>>,
    /// Wanted a run but the rate limit refused it.
    pub rate_limited: bool,
}

impl Gate {
    pub fn new(cfg: &CameraConfig, camera: &str, model: &str) -> Gate {
        Gate {
            motion: Motion::new(MotionOptions {
                pixel_threshold: cfg.motion_pixel_threshold,
                area_fraction: cfg.motion_area,
            }),
            tracker: Tracker::new(TrackerOptions {
                camera: camera.to_string(),
                label: cfg.label.clone(),
                model: model.to_string(),
                min_hits: cfg.min_hits,
                update_interval_secs: cfg.update_interval_secs,
                lost_after_secs: cfg.lost_after_secs,
                max_tracks: cfg.max_tracks,
                ..TrackerOptions::default()
            }),
            last_run: None,
            min_interval: Duration::from_secs_f64(1.0 / cfg.max_detect_fps),
            track_check: Duration::from_secs_f64(cfg.track_check_secs),
            forced_check: Duration::from_secs_f64(cfg.forced_check_secs),
        }
    }

    /// Processes one frame seen at `at` (monotonic) / `now` (Unix seconds); events go to `out`.
    pub fn frame(
        &mut self,
        detector: &Detector,
        rgb: &[u8],
        at: Instant,
        now: f64,
        stats: &CameraStats,
        out: &mut Vec<CameraEvent>,
    ) -> FrameOutcome {
        let t0 = Instant::now();
        let (_, motion) = self.motion.update(rgb);
        stats.motion_micros.fetch_add(
            t0.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if motion {
            CameraStats::inc(&stats.motion_frames);
        }
        let since = self.last_run.map(|t| at.saturating_duration_since(t));
        let wanted = motion
            || since.is_none_or(|s| {
                (self.tracker.active() > 0 && s >= self.track_check) || s >= self.forced_check
            });
        let mut outcome = FrameOutcome {
            motion,
            detections: None,
            rate_limited: false,
        };
        if !wanted {
            return outcome;
        }
        if since.is_some_and(|s| s < self.min_interval) {
            CameraStats::inc(&stats.rate_limited);
            outcome.rate_limited = true;
            return outcome;
        }
        self.last_run = Some(at);
        let t1 = Instant::now();
        let dets = match detector.detect(rgb) {
            Ok(d) => d,
            Err(e) => {
                CameraStats::inc(&stats.detector_errors);
                tracing::warn!(error = %e, "camera: detector failed");
                return outcome;
            }
        };
        stats.detect_micros.fetch_add(
            t1.elapsed().as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        CameraStats::inc(&stats.detector_runs);
        stats
            .detections
            .fetch_add(dets.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.tracker.observe(now, &dets, out);
        outcome.detections = Some(dets);
        outcome
    }

    /// Ends every live track (stream down, camera stopping).
    pub fn end_all(&mut self, out: &mut Vec<CameraEvent>) {
        self.tracker.end_all(out);
    }
}

/// Starts a camera: its ffmpeg source on the current tokio runtime and its worker thread.
/// `camera` names it in events, `model` is the detector's tag (`name@version`).
pub fn start(
    cfg: CameraConfig,
    camera: &str,
    model: &str,
    detector: Arc<Detector>,
) -> Result<CameraHandle, Error> {
    start_with(cfg, camera, model, detector, None)
}

/// [`start`], and with `embedder` the crop of each track's `new`/`update` is embedded into
/// [`CameraHandle::features`] before the event is sent.
pub fn start_with(
    cfg: CameraConfig,
    camera: &str,
    model: &str,
    detector: Arc<Detector>,
    embedder: Option<Arc<Embedder>>,
) -> Result<CameraHandle, Error> {
    cfg.validate()?;
    // Waiting embeddings: one per live track, plus the events queued for the publisher.
    let features = embedder
        .is_some()
        .then(|| Arc::new(TrackFeatures::new(cfg.max_tracks + EVENT_QUEUE)));
    let wfeatures = features.clone();
    let stats = Arc::new(CameraStats::default());
    let pool = FramePool::new(cfg.pool_frames);
    // Frames in flight are bounded by the pool; Down/Finished markers need a few more slots.
    let (frame_tx, mut frame_rx) = mpsc::channel::<SourceMsg>(cfg.pool_frames + 4);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let (stop_tx, stop_rx) = watch::channel(false);
    let source = tokio::spawn(run_source(
        cfg.clone(),
        pool,
        frame_tx,
        stats.clone(),
        stop_rx,
    ));
    let mut gate = Gate::new(&cfg, camera, model);
    let wstats = stats.clone();
    let worker = std::thread::Builder::new()
        .name(format!("camera-{camera}"))
        .spawn(move || {
            let mut out = Vec::new();
            let emit = |out: &mut Vec<CameraEvent>| {
                for ev in out.drain(..) {
                    CameraStats::inc(match ev.phase {
                        TrackPhase::New => &wstats.events_new,
                        TrackPhase::Update => &wstats.events_update,
                        TrackPhase::End => &wstats.events_end,
                    });
                    if event_tx.try_send(ev).is_err() {
                        CameraStats::inc(&wstats.events_dropped);
                    }
                }
            };
            while let Some(msg) = frame_rx.blocking_recv() {
                match msg {
                    SourceMsg::Frame(f) => {
                        gate.frame(
                            &detector,
                            f.rgb(),
                            Instant::now(),
                            unix_now(),
                            &wstats,
                            &mut out,
                        );
                        if let (Some(emb), Some(feats)) = (&embedder, &wfeatures) {
                            embed_tracks(emb, feats, f.rgb(), &out, &wstats);
                        }
                    }
                    SourceMsg::Down | SourceMsg::Finished => gate.end_all(&mut out),
                }
                emit(&mut out);
            }
            gate.end_all(&mut out);
            emit(&mut out);
        })
        .map_err(|e| Error::Io(format!("cannot start the camera worker: {e}")))?;
    Ok(CameraHandle {
        events: event_rx,
        stats,
        features,
        stop: stop_tx,
        source: Some(source),
        worker: Some(worker),
    })
}

/// Embeds the crop of every `new`/`update` in `events` (CPU work, on the worker thread).
fn embed_tracks(
    emb: &Embedder,
    feats: &TrackFeatures,
    rgb: &[u8],
    events: &[CameraEvent],
    stats: &CameraStats,
) {
    for ev in events.iter().filter(|e| e.phase != TrackPhase::End) {
        let t = Instant::now();
        match emb.embed_box(rgb, &ev.bbox) {
            Ok(v) => {
                feats.put(&ev.id, v);
                CameraStats::inc(&stats.embed_runs);
                stats.embed_micros.fetch_add(
                    t.elapsed().as_micros() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Err(e) => {
                CameraStats::inc(&stats.detector_errors);
                tracing::warn!(error = %e, "camera: embedding failed");
            }
        }
    }
}
