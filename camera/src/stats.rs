//! Per-camera counters (atomics) and the stream state, with a JSON snapshot and
//! Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    Connecting,
    Streaming,
    Down,
    Finished,
    Stopped,
}

impl SourceState {
    fn from_u8(v: u8) -> SourceState {
        match v {
            1 => SourceState::Streaming,
            2 => SourceState::Down,
            3 => SourceState::Finished,
            4 => SourceState::Stopped,
            _ => SourceState::Connecting,
        }
    }
}

/// Longest last-error text kept.
const MAX_ERROR_CHARS: usize = 256;

/// Counters of one camera.
#[derive(Debug, Default)]
pub struct CameraStats {
    state: AtomicU8,
    last_error: Mutex<String>,
    /// ffmpeg sessions started.
    pub sessions: AtomicU64,
    /// Sessions that ended and were followed by a reconnect.
    pub reconnects: AtomicU64,
    /// Sessions that ended after delivering frames.
    pub disconnects: AtomicU64,
    /// No frame within `stall_secs` (or `open_timeout_secs` for the first).
    pub stalls: AtomicU64,
    /// The pipe ended inside a frame.
    pub short_reads: AtomicU64,
    /// Sessions that failed before their first frame (ffmpeg error: refused, garbage, …).
    pub bad_streams: AtomicU64,
    /// Complete frames read.
    pub frames: AtomicU64,
    /// Frames dropped because every pool buffer was in use.
    pub frames_dropped: AtomicU64,
    /// Frames with motion.
    pub motion_frames: AtomicU64,
    /// Detector runs.
    pub detector_runs: AtomicU64,
    /// Detector runs wanted but refused by the rate limit.
    pub rate_limited: AtomicU64,
    /// Detector errors.
    pub detector_errors: AtomicU64,
    /// Detections after NMS.
    pub detections: AtomicU64,
    /// Total detector time, microseconds.
    pub detect_micros: AtomicU64,
    /// Total motion-gate time, microseconds.
    pub motion_micros: AtomicU64,
    /// Track crops embedded for the head (learning on the camera).
    pub embed_runs: AtomicU64,
    /// Total embedding time, microseconds.
    pub embed_micros: AtomicU64,
    pub events_new: AtomicU64,
    pub events_update: AtomicU64,
    pub events_end: AtomicU64,
    /// Events dropped because the publisher fell behind.
    pub events_dropped: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub state: SourceState,
    pub last_error: String,
    pub sessions: u64,
    pub reconnects: u64,
    pub disconnects: u64,
    pub stalls: u64,
    pub short_reads: u64,
    pub bad_streams: u64,
    pub frames: u64,
    pub frames_dropped: u64,
    pub motion_frames: u64,
    pub detector_runs: u64,
    pub rate_limited: u64,
    pub detector_errors: u64,
    pub detections: u64,
    pub detect_micros: u64,
    pub motion_micros: u64,
    pub embed_runs: u64,
    pub embed_micros: u64,
    pub events_new: u64,
    pub events_update: u64,
    pub events_end: u64,
    pub events_dropped: u64,
}

impl CameraStats {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_state(&self, s: SourceState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_last_error(&self, e: &str) {
        let mut g = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        g.clear();
        g.extend(e.chars().take(MAX_ERROR_CHARS));
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            state: self.state(),
            last_error: self.last_error(),
            sessions: g(&self.sessions),
            reconnects: g(&self.reconnects),
            disconnects: g(&self.disconnects),
            stalls: g(&self.stalls),
            short_reads: g(&self.short_reads),
            bad_streams: g(&self.bad_streams),
            frames: g(&self.frames),
            frames_dropped: g(&self.frames_dropped),
            motion_frames: g(&self.motion_frames),
            detector_runs: g(&self.detector_runs),
            rate_limited: g(&self.rate_limited),
            detector_errors: g(&self.detector_errors),
            detections: g(&self.detections),
            detect_micros: g(&self.detect_micros),
            motion_micros: g(&self.motion_micros),
            embed_runs: g(&self.embed_runs),
            embed_micros: g(&self.embed_micros),
            events_new: g(&self.events_new),
            events_update: g(&self.events_update),
            events_end: g(&self.events_end),
            events_dropped: g(&self.events_dropped),
        }
    }

    /// Prometheus text, every counter labelled with the camera.
    pub fn prometheus(&self, camera: &str) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hearth_camera_up{{camera=\"{camera}\"}} {}",
            u8::from(s.state == SourceState::Streaming)
        );
        for (name, v) in [
            ("sessions", s.sessions),
            ("reconnects", s.reconnects),
            ("stalls", s.stalls),
            ("short_reads", s.short_reads),
            ("bad_streams", s.bad_streams),
            ("frames", s.frames),
            ("frames_dropped", s.frames_dropped),
            ("motion_frames", s.motion_frames),
            ("detector_runs", s.detector_runs),
            ("rate_limited", s.rate_limited),
            ("detections", s.detections),
            ("detector_errors", s.detector_errors),
            ("embed_runs", s.embed_runs),
            ("events_dropped", s.events_dropped),
        ] {
            let _ = writeln!(out, "hearth_camera_{name}_total{{camera=\"{camera}\"}} {v}");
        }
        for (name, micros) in [
            ("detect", s.detect_micros),
            ("motion", s.motion_micros),
            ("embed", s.embed_micros),
        ] {
            let _ = writeln!(
                out,
                "hearth_camera_{name}_seconds_total{{camera=\"{camera}\"}} {:.6}",
                micros as f64 / 1e6
            );
        }
        for (phase, v) in [
            ("new", s.events_new),
            ("update", s.events_update),
            ("end", s.events_end),
        ] {
            let _ = writeln!(
                out,
                "hearth_camera_events_total{{camera=\"{camera}\",type=\"{phase}\"}} {v}"
            );
        }
        out
    }
}
