//! The hub's status endpoints, served with axum (HTTP/1.1):
//!
//! - `GET /metrics`: Prometheus text exposition 0.0.4 (counters and registry gauges);
//! - `GET /devices`: the device registry as JSON (an array of [`DeviceInfo`]);
//! - `DELETE /devices/{id}`: removes a device (and its Home Assistant entities); answered
//!   only to clients on the loopback interface (`hearth-hub devices remove` on the hub's
//!   machine), 403 otherwise;
//! - `GET /healthz`: `200 ok` while the hub's MQTT connections (subscriber and publisher)
//!   are up and, with the embedded broker, its thread runs; `503` with the reason otherwise.
//!
//! `HEAD` works on each; other methods get 405, other paths 404. The server stops
//! gracefully with the hub.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::Router;
use hearth_edge::LinkStatus;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery::Kicker;
use crate::metrics::Metrics;
use crate::registry::{DeviceInfo, Registry};

/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoints read.
#[derive(Clone)]
pub(crate) struct Status {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    /// The hub's MQTT connections, by name.
    pub links: Vec<(&'static str, Arc<LinkStatus>)>,
    /// Whether the embedded broker thread runs (`None` with an external broker).
    pub broker_running: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// Wakes Home Assistant discovery after a removal.
    pub discovery: Kicker,
}

impl Status {
    /// `Ok` when healthy, else what is down.
    pub fn health(&self) -> Result<(), String> {
        let mut down: Vec<String> = self
            .links
            .iter()
            .filter(|(_, l)| !l.is_up())
            .map(|(name, l)| match l.last_error() {
                Some(e) => format!("MQTT {name} down ({e})"),
                None => format!("MQTT {name} down"),
            })
            .collect();
        if let Some(running) = &self.broker_running {
            if !running() {
                down.push("embedded broker stopped".into());
            }
        }
        if down.is_empty() {
            Ok(())
        } else {
            Err(down.join("; "))
        }
    }
}

/// Metrics text: counters plus registry gauges.
pub fn render(metrics: &Metrics, registry: &Registry) -> String {
    let mut s = metrics.render_prometheus();
    registry.render_prometheus(&mut s);
    s
}

fn devices_json(registry: &Registry) -> String {
    let devices: Vec<DeviceInfo> = registry.snapshot();
    serde_json::to_string(&devices).expect("devices serialise")
}

async fn metrics(State(s): State<Status>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        render(&s.metrics, &s.registry),
    )
}

async fn devices(State(s): State<Status>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        devices_json(&s.registry),
    )
}

async fn remove_device(
    State(s): State<Status>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> impl IntoResponse {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "devices are removed from the hub's own machine only\n".to_string(),
        );
    }
    match s.registry.remove_id(&id) {
        Some(d) => {
            s.discovery.changed();
            tracing::info!(device = %d.name, source = d.source.as_str(), "device removed");
            (
                StatusCode::OK,
                format!("removed {}/{}\n", d.source.as_str(), d.name),
            )
        }
        None => (StatusCode::NOT_FOUND, format!("no device `{id}`\n")),
    }
}

async fn healthz(State(s): State<Status>) -> impl IntoResponse {
    match s.health() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "not found: try /metrics, /devices or /healthz\n",
    )
}

/// The endpoints' routes.
pub(crate) fn router(status: Status) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/devices", get(devices))
        .route("/devices/{id}", delete(remove_device))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(status)
}

/// Serves until `shutdown` turns true (or its sender is dropped), then stops gracefully.
pub(crate) async fn serve(
    listener: TcpListener,
    status: Status,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move { hearth_edge::stopped(&mut shutdown).await };
    if let Err(e) = axum::serve(
        listener,
        router(status).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await
    {
        tracing::error!(error = %e, "status endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(links: Vec<(&'static str, Arc<LinkStatus>)>) -> Status {
        Status {
            metrics: Arc::new(Metrics::new()),
            registry: Arc::new(Registry::new()),
            links,
            broker_running: None,
            discovery: Kicker::default(),
        }
    }

    #[test]
    fn health_names_what_is_down() {
        let down = Arc::new(LinkStatus::default());
        let s = status(vec![("subscriber", down)]);
        assert_eq!(s.health().unwrap_err(), "MQTT subscriber down");
        assert!(status(vec![]).health().is_ok());
        let mut s = status(vec![]);
        s.broker_running = Some(Arc::new(|| false));
        assert_eq!(s.health().unwrap_err(), "embedded broker stopped");
    }

    #[test]
    fn renders() {
        let m = Metrics::new();
        let r = Registry::new();
        assert!(render(&m, &r).contains("hearth_hub_events_received_total 0"));
        assert_eq!(devices_json(&r), "[]");
    }
}
