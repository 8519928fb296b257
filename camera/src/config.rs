//! Camera configuration (the `[camera]` table of an agent config): the source, the frame
//! rate, detection, motion gating, rate limit, tracking and the stream watchdogs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Where frames come from. Every kind is decoded by an `ffmpeg` child process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// `rtsp://…` pulled over TCP (`listen = true`: ffmpeg waits for a camera that pushes
    /// to that URL instead, `-rtsp_flags listen`).
    Rtsp {
        url: String,
        #[serde(default)]
        listen: bool,
    },
    /// `http://…` multipart JPEG stream (what most IP cameras and `ffmpeg -f mpjpeg` serve).
    Mjpeg { url: String },
    /// A V4L2 device, e.g. `/dev/video0`.
    V4l2 { device: PathBuf },
    /// Image files in a folder (`glob`, default `*.{jpg,jpeg,png,ppm}`), in name order.
    Folder {
        path: PathBuf,
        #[serde(default = "default_glob")]
        glob: String,
        /// Start again at the first image after the last.
        #[serde(default)]
        repeat: bool,
    },
    /// A video file, read at its own pace (`-re`).
    File {
        path: PathBuf,
        /// Loop forever (`-stream_loop -1`).
        #[serde(default)]
        repeat: bool,
    },
}

fn default_glob() -> String {
    "*.{jpg,jpeg,png,ppm}".into()
}

impl SourceConfig {
    /// Whether the source ends by itself (a file or folder without `repeat`); streams never
    /// end: when they drop they are reconnected.
    pub fn finite(&self) -> bool {
        matches!(
            self,
            SourceConfig::File { repeat: false, .. } | SourceConfig::Folder { repeat: false, .. }
        )
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Rtsp { .. } => "rtsp",
            SourceConfig::Mjpeg { .. } => "mjpeg",
            SourceConfig::V4l2 { .. } => "v4l2",
            SourceConfig::Folder { .. } => "folder",
            SourceConfig::File { .. } => "file",
        }
    }
}

/// One camera.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CameraConfig {
    pub source: SourceConfig,
    /// Frames per second ffmpeg delivers (it drops or duplicates to reach it).
    pub fps: f64,
    /// The `ffmpeg` binary.
    pub ffmpeg: PathBuf,
    /// BlazeFace ONNX file (front 128×128), float or its int8 export.
    pub model: PathBuf,
    /// Engine running it: `auto` (Hearth's dense conv engine when it runs the graph and
    /// agrees with tract on probe frames, else tract), `dense` or `tract`.
    pub backend: crate::detector::Backend,
    /// Label of the detected objects in events.
    pub label: String,
    /// Event name: events go to `hearth/<device>/event/<event>`.
    pub event: String,
    /// Detections below this score are discarded.
    pub min_score: f32,
    /// IoU above which weighted NMS merges candidates.
    pub nms_iou: f32,
    /// Motion: per-pixel grey difference (0–255) that counts as change.
    pub motion_pixel_threshold: f32,
    /// Motion: fraction of the 32×32 grey frame that must change.
    pub motion_area: f32,
    /// Rate limit: at most this many detector runs per second.
    pub max_detect_fps: f64,
    /// While a track is live and nothing moves, check it this often (seconds).
    pub track_check_secs: f64,
    /// Without motion and tracks, run the detector anyway this often (seconds).
    pub forced_check_secs: f64,
    /// Tracking: matches a track needs before its `new` event.
    pub min_hits: u32,
    /// Tracking: least time between two `update`s of one track (seconds).
    pub update_interval_secs: f64,
    /// Tracking: a track ends after this long unseen (and 3 detector runs without it).
    pub lost_after_secs: f64,
    /// Tracking: most live tracks.
    pub max_tracks: usize,
    /// Watchdog: a stream that delivers no frame for this long is killed and reconnected.
    pub stall_secs: f64,
    /// Watchdog: time allowed for ffmpeg to open the source and deliver the first frame.
    pub open_timeout_secs: f64,
    /// Reconnect backoff: first wait (ms), doubling up to `backoff_max_secs`, ±20 % jitter.
    pub backoff_min_ms: u64,
    pub backoff_max_secs: f64,
    /// Frame buffers of the camera (its memory bound: `(pool_frames + 1) × 49 152` bytes).
    pub pool_frames: usize,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig {
            source: SourceConfig::Mjpeg {
                url: "http://127.0.0.1:8081/stream.mjpg".into(),
            },
            fps: 5.0,
            ffmpeg: PathBuf::from("ffmpeg"),
            model: PathBuf::from("data/models/face_detection_front_128x128_barracuda.onnx"),
            backend: crate::detector::Backend::Auto,
            label: "face".into(),
            event: "detection".into(),
            min_score: 0.5,
            nms_iou: 0.3,
            motion_pixel_threshold: 12.0,
            motion_area: 0.005,
            max_detect_fps: 5.0,
            track_check_secs: 1.0,
            forced_check_secs: 10.0,
            min_hits: 2,
            update_interval_secs: 5.0,
            lost_after_secs: 2.0,
            max_tracks: 16,
            stall_secs: 5.0,
            open_timeout_secs: 10.0,
            backoff_min_ms: 500,
            backoff_max_secs: 10.0,
            pool_frames: 4,
        }
    }
}

impl CameraConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |k: &str, why: &str| Err(Error::Config(format!("camera.{k}: {why}")));
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !(pos(self.fps) && self.fps <= 60.0) {
            return bad("fps", "must be in (0, 60]");
        }
        for (k, v) in [
            ("max_detect_fps", self.max_detect_fps),
            ("track_check_secs", self.track_check_secs),
            ("forced_check_secs", self.forced_check_secs),
            ("update_interval_secs", self.update_interval_secs),
            ("lost_after_secs", self.lost_after_secs),
            ("stall_secs", self.stall_secs),
            ("open_timeout_secs", self.open_timeout_secs),
            ("backoff_max_secs", self.backoff_max_secs),
        ] {
            if !pos(v) || v > 86_400.0 {
                return bad(k, "must be a positive number of seconds (≤ 1 day)");
            }
        }
        for (k, v) in [
            ("min_score", self.min_score),
            ("nms_iou", self.nms_iou),
            ("motion_area", self.motion_area),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(k, "must be in [0, 1]");
            }
        }
        if !(0.0..=255.0).contains(&self.motion_pixel_threshold) {
            return bad("motion_pixel_threshold", "must be in [0, 255]");
        }
        if !(2..=64).contains(&self.pool_frames) {
            return bad("pool_frames", "must be 2..=64");
        }
        if !(1..=256).contains(&self.max_tracks) {
            return bad("max_tracks", "must be 1..=256");
        }
        if self.min_hits == 0 {
            return bad("min_hits", "must be at least 1");
        }
        if !hearth_proto::mqtt::valid_name(&self.event) {
            return bad("event", "must be one topic level [A-Za-z0-9_-]");
        }
        if self.label.is_empty()
            || self.label.len() > 64
            || !self
                .label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("label", "must be [A-Za-z0-9_], 1–64 characters");
        }
        match &self.source {
            SourceConfig::Rtsp { url, .. } if !url.starts_with("rtsp://") => {
                bad("source.url", "an rtsp source needs an rtsp:// URL")
            }
            SourceConfig::Mjpeg { url }
                if !(url.starts_with("http://") || url.starts_with("https://")) =>
            {
                bad("source.url", "an mjpeg source needs an http:// URL")
            }
            _ => Ok(()),
        }
    }

    /// Bytes of frame memory the camera holds at most: its pool plus the reader's scratch
    /// buffer (the ffmpeg child's own memory is a separate process).
    pub fn frame_memory_bytes(&self) -> usize {
        (self.pool_frames + 1) * crate::detector::FRAME_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: CameraConfig = toml::from_str(
            "fps = 4\n[source]\nkind = \"file\"\npath = \"clip.mp4\"\nrepeat = true\n",
        )
        .unwrap();
        assert_eq!(c.fps, 4.0);
        assert!(!c.source.finite());
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.source = SourceConfig::Mjpeg {
            url: "rtsp://x".into(),
        };
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<CameraConfig>("[source]\nkind = \"ftp\"\n").is_err());
        assert_eq!(CameraConfig::default().frame_memory_bytes(), 5 * 49_152);
    }
}
