//! Hearth cameras: real video in, detection on the device, Frigate-style events out.
//!
//! - [`source`]: frames decoded by an `ffmpeg` child (RTSP, HTTP MJPEG, V4L2, image folder,
//!   video file) as raw 128×128 RGB on a pipe; reconnect with backoff, stall and garbage
//!   detection, a fixed frame pool.
//! - [`detector`]: BlazeFace (vendored ONNX) in tract, MediaPipe anchors, box decoding,
//!   weighted NMS.
//! - [`embed`]: BlazeFace's frozen backbone on a track's crop: the embedding a small head
//!   (the agent's federated model) learns the home's decision on.
//! - [`motion`]: frame difference on a 32×32 grey frame, gating the detector.
//! - [`tracker`]: IoU tracks and the `new` / `update` / `end` life cycle.
//! - [`pipeline`]: one camera end to end ([`pipeline::start`]), CPU work on its own thread.
//! - [`scene`]: clips composed from the repo's face crops, for tests, demo and benchmark.
//! - [`testkit`]: ffmpeg on this machine for the tests and the demo (skip without it,
//!   MJPEG server on loopback, children reaped on drop).
//!
//! No pixel leaves this crate: its output is [`hearth_proto::mqtt::CameraEvent`]s.
#![forbid(unsafe_code)]

pub mod config;
pub mod detector;
pub mod embed;
pub mod motion;
pub mod pipeline;
pub mod scene;
pub mod source;
pub mod stats;
pub mod testkit;
pub mod tracker;

pub use config::{CameraConfig, SourceConfig};
pub use detector::{Detection, Detector, DetectorOptions};
pub use embed::{Embedder, EMBED_DIM};
pub use pipeline::{start, start_with, CameraHandle, Gate, TrackFeatures};
pub use stats::{CameraStats, SourceState, StatsSnapshot};

/// Errors of the camera crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("camera config: {0}")]
    Config(String),
    #[error("detector model: {0}")]
    Model(String),
    #[error("frame: {0}")]
    Frame(String),
    #[error("{0}")]
    Io(String),
}
