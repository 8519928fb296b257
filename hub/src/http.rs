//! The hub's status endpoints, served with axum (HTTP/1.1):
//!
//! - `GET /metrics`: Prometheus text exposition 0.0.4 (counters and registry gauges);
//! - `GET /rules/history?rule=<name>&limit=<n>`: the rules' firing history as JSON,
//!   newest first (what `hearth-hub rules history` reads while the hub runs);
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
    /// The rules engine (firings, reloads, history).
    pub engine: Option<Arc<crate::rules::engine::Engine>>,
    /// The hub's MQTT connections, by name.
    pub links: Vec<(&'static str, Arc<LinkStatus>)>,
    /// Whether the embedded broker thread runs (`None` with an external broker).
    pub broker_running: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// Wakes Home Assistant discovery after a removal.
    pub discovery: Kicker,
    /// The home aggregator's counters (`[federation.aggregate]`), served with the hub's.
    pub aggregator: Option<Arc<hearth_coordinator::metrics::Metrics>>,
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

/// Everything `/metrics` serves: counters, registry gauges, rules, and the state of each
/// MQTT connection (`hearth_hub_mqtt_connected{link}`) and of the embedded broker.
pub(crate) fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = render(&s.metrics, &s.registry);
    if let Some(e) = &s.engine {
        e.render_prometheus(&mut out);
    }
    if let Some(a) = &s.aggregator {
        out.push_str(&a.render());
    }
    out.push_str("# HELP hearth_hub_mqtt_connected Whether each of the hub's MQTT connections is up (1) or down (0).
");
    out.push_str(
        "# TYPE hearth_hub_mqtt_connected gauge
",
    );
    for (name, l) in &s.links {
        let _ = writeln!(
            out,
            "hearth_hub_mqtt_connected{{link=\"{name}\"}} {}",
            u8::from(l.is_up())
        );
    }
    if let Some(running) = &s.broker_running {
        out.push_str(
            "# HELP hearth_hub_embedded_broker_running Whether the embedded broker thread runs.
",
        );
        out.push_str(
            "# TYPE hearth_hub_embedded_broker_running gauge
",
        );
        let _ = writeln!(
            out,
            "hearth_hub_embedded_broker_running {}",
            u8::from(running())
        );
    }
    out
}

/// `rule` and `limit` from a query string (`%XX` and `+` decoded).
fn history_query(q: Option<&str>) -> (Option<String>, usize) {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                },
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    let (mut rule, mut limit) = (None, 100);
    for pair in q.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("rule", v)) => rule = Some(decode(v)),
            Some(("limit", v)) => limit = v.parse().unwrap_or(100),
            _ => {}
        }
    }
    (rule, limit.min(10_000))
}

async fn rules_history(State(s): State<Status>, uri: axum::http::Uri) -> impl IntoResponse {
    let (rule, limit) = history_query(uri.query());
    let q = HistoryArgs { rule };
    let list = match &s.engine {
        Some(e) => {
            let e = e.clone();
            tokio::task::spawn_blocking(move || e.history.list(q.rule.as_deref(), limit))
                .await
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&list).unwrap_or_else(|_| "[]".into()),
    )
}

struct HistoryArgs {
    rule: Option<String>,
}

fn devices_json(registry: &Registry) -> String {
    let devices: Vec<DeviceInfo> = registry.snapshot();
    serde_json::to_string(&devices).expect("devices serialise")
}

async fn metrics(State(s): State<Status>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        render_status(&s),
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
        "not found: try /metrics, /devices, /rules/history or /healthz\n",
    )
}

/// The endpoints' routes.
pub(crate) fn router(status: Status) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/devices", get(devices))
        .route("/rules/history", get(rules_history))
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
            engine: None,
            links,
            broker_running: None,
            discovery: Kicker::default(),
            aggregator: None,
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

    /// One HTTP/1.0 request over loopback TCP: (status code, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: hub\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_string(&mut out),
        )
        .await
        .expect("answered in time")
        .unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    #[tokio::test]
    async fn delete_removes_a_device_for_loopback_clients_only() {
        let reg = Arc::new(Registry::new());
        reg.record_event("door-cam");
        reg.record_event("garage-cam");
        let mut st = status(vec![]);
        st.registry = reg.clone();
        // The real server over loopback.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(l, st.clone(), stop_rx));
        let (code, body) = request(addr, "DELETE", "/devices/door-cam").await;
        assert_eq!((code, body.as_str()), (200, "removed hearth/door-cam\n"));
        assert!(reg.get("door-cam").is_none(), "removed from the registry");
        let (_, listing) = request(addr, "GET", "/devices").await;
        assert!(
            !listing.contains("door-cam") && listing.contains("garage-cam"),
            "{listing}"
        );
        let (code, body) = request(addr, "DELETE", "/devices/door-cam").await;
        assert_eq!(code, 404, "{body}");
        let (code, _) = request(addr, "GET", "/devices/garage-cam").await;
        assert_eq!(code, 405, "only DELETE on a device");
        let _ = stop_tx.send(true);
        let _ = server.await;

        // The same request from another machine (the peer address as the router sees it)
        // is refused and removes nothing.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = router(st).layer(axum::extract::connect_info::MockConnectInfo(
            SocketAddr::from(([192, 168, 1, 20], 40000)),
        ));
        let remote = tokio::spawn(async move { axum::serve(l, app).await });
        let (code, body) = request(addr, "DELETE", "/devices/garage-cam").await;
        assert_eq!(code, 403, "{body}");
        assert!(
            reg.get("garage-cam").is_some(),
            "a refused removal removes nothing"
        );
        remote.abort();
    }

    #[test]
    fn renders() {
        let m = Metrics::new();
        let r = Registry::new();
        assert!(render(&m, &r).contains("hearth_hub_events_received_total 0"));
        assert_eq!(devices_json(&r), "[]");
        assert_eq!(
            history_query(Some("rule=porch+light%21&limit=5")),
            (Some("porch light!".to_string()), 5)
        );
        assert_eq!(history_query(None), (None, 100));
    }
}
