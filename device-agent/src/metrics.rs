//! The agent's metrics endpoint (`metrics_listen`, off by default; the shipped config binds
//! `127.0.0.1:9466`): `GET /metrics` in Prometheus text, `GET /healthz`.
//!
//! - Every [`crate::AgentStats`] counter as `hearth_agent_<name>_total{device}` (and
//!   `hearth_agent_model_version` as a gauge).
//! - A camera agent's camera: its counters (`hearth_camera_*_total{camera}`: frames, stalls,
//!   reconnects, detector runs, embeddings, events, …; [`CameraStats::prometheus`]) and four
//!   gauges over the last [`WINDOW`] (sampled twice a second by the camera loop):
//!   `hearth_camera_fps`, `hearth_camera_detector_latency_seconds` (mean per run),
//!   `hearth_camera_motion_gated_ratio` (frames on which the detector did not run) and
//!   `hearth_camera_up`.
//!
//! Rendering reads atomics only: a scrape never waits for inference.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_camera::{CameraStats, StatsSnapshot as CameraSnapshot};
use hearth_edge::stopped;
use tokio::sync::watch;

use crate::stats::StatsSnapshot;

/// Span of the camera gauges.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The camera gauges over the last [`WINDOW`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CameraGauges {
    /// Frames per second delivered by the source.
    pub fps: f64,
    /// Mean detector time per run, seconds (all-time mean while no run fell in the window).
    pub detector_latency_secs: f64,
    /// Fraction of the window's frames on which the detector did not run.
    pub motion_gated_ratio: f64,
}

#[derive(Debug)]
struct Camera {
    name: String,
    stats: Arc<CameraStats>,
    window: VecDeque<(Instant, CameraSnapshot)>,
}

/// What the endpoint renders besides the agent's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    camera: Mutex<Option<Camera>>,
}

fn gauges(window: &VecDeque<(Instant, CameraSnapshot)>) -> CameraGauges {
    let (Some((t0, a)), Some((t1, b))) = (window.front(), window.back()) else {
        return CameraGauges::default();
    };
    let secs = t1.saturating_duration_since(*t0).as_secs_f64();
    let frames = b.frames.saturating_sub(a.frames);
    let runs = b.detector_runs.saturating_sub(a.detector_runs);
    let micros = b.detect_micros.saturating_sub(a.detect_micros);
    let mean = |m: u64, r: u64| {
        if r == 0 {
            0.0
        } else {
            m as f64 / r as f64 / 1e6
        }
    };
    CameraGauges {
        fps: if secs > 0.0 {
            frames as f64 / secs
        } else {
            0.0
        },
        detector_latency_secs: if runs > 0 {
            mean(micros, runs)
        } else {
            mean(b.detect_micros, b.detector_runs)
        },
        motion_gated_ratio: if frames > 0 {
            1.0 - (runs.min(frames) as f64 / frames as f64)
        } else {
            0.0
        },
    }
}

impl Metrics {
    /// Registers the agent's camera.
    pub fn set_camera(&self, name: &str, stats: Arc<CameraStats>) {
        *self.camera.lock().unwrap_or_else(|p| p.into_inner()) = Some(Camera {
            name: name.to_string(),
            stats,
            window: VecDeque::new(),
        });
    }

    /// Samples the camera's counters into the window (the camera loop, twice a second).
    pub fn sample_camera(&self, stats: &CameraStats) {
        let mut g = self.camera.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_mut() {
            let now = Instant::now();
            c.window.push_back((now, stats.snapshot()));
            while c
                .window
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
            {
                c.window.pop_front();
            }
        }
    }

    /// The camera gauges now (None without a camera).
    pub fn camera_gauges(&self) -> Option<CameraGauges> {
        let g = self.camera.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|c| gauges(&c.window))
    }

    /// Prometheus text for `device` with the agent's counters `agent`.
    pub fn render(&self, device: &str, agent: &StatsSnapshot) -> String {
        let mut out = String::new();
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(agent) {
            for (k, v) in fields {
                let v = v.as_u64().unwrap_or(0);
                if k == "model_version" {
                    let _ = writeln!(out, "# TYPE hearth_agent_{k} gauge");
                    let _ = writeln!(out, "hearth_agent_{k}{{device=\"{device}\"}} {v}");
                } else {
                    let _ = writeln!(out, "# TYPE hearth_agent_{k}_total counter");
                    let _ = writeln!(out, "hearth_agent_{k}_total{{device=\"{device}\"}} {v}");
                }
            }
        }
        let g = self.camera.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.as_ref() {
            out.push_str(&c.stats.prometheus(&c.name));
            let gs = gauges(&c.window);
            for (name, v) in [
                ("fps", gs.fps),
                ("detector_latency_seconds", gs.detector_latency_secs),
                ("motion_gated_ratio", gs.motion_gated_ratio),
            ] {
                let _ = writeln!(out, "# TYPE hearth_camera_{name} gauge");
                let _ = writeln!(out, "hearth_camera_{name}{{camera=\"{}\"}} {v:.6}", c.name);
            }
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<crate::agent::Shared>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = shared.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        shared
                            .metrics
                            .render(&shared.config.device, &shared.stats.snapshot()),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopped(&mut stop).await })
        .await
    {
        tracing::warn!("metrics endpoint stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_over_the_window() {
        let t0 = Instant::now();
        let snap = |frames, runs, micros| CameraSnapshot {
            frames,
            detector_runs: runs,
            detect_micros: micros,
            ..CameraStats::default().snapshot()
        };
        let mut w = VecDeque::new();
        w.push_back((t0, snap(100, 10, 50_000)));
        w.push_back((t0 + Duration::from_secs(2), snap(120, 12, 58_000)));
        let g = gauges(&w);
        assert!((g.fps - 10.0).abs() < 1e-9);
        assert!((g.detector_latency_secs - 0.004).abs() < 1e-9);
        assert!((g.motion_gated_ratio - 0.9).abs() < 1e-9);
        // No run in the window: the all-time mean.
        w.push_back((t0 + Duration::from_secs(4), snap(140, 12, 58_000)));
        w.pop_front();
        w.pop_front();
        w.push_front((t0 + Duration::from_secs(3), snap(130, 12, 58_000)));
        let g = gauges(&w);
        assert!((g.detector_latency_secs - 58_000.0 / 12.0 / 1e6).abs() < 1e-9);
        assert!((g.motion_gated_ratio - 1.0).abs() < 1e-9);
    }
}
