//! A minimal HTTP/1.1 responder for the status endpoints (no web framework):
//! `GET /metrics` (Prometheus text 0.0.4) and `GET /devices` (registry as JSON).
//! One request per connection, bounded head size, read timeout and concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::metrics::Metrics;
use crate::registry::Registry;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed immediately.
const MAX_CONCURRENT: usize = 16;

/// Metrics text: counters plus registry gauges.
pub fn render(metrics: &Metrics, registry: &Registry) -> String {
    let mut s = metrics.render_prometheus();
    registry.render_prometheus(&mut s);
    s
}

fn devices_json(registry: &Registry) -> String {
    let devices: Vec<serde_json::Value> = registry
        .snapshot()
        .into_iter()
        .map(|d| {
            serde_json::json!({
                "name": d.name,
                "availability": d.availability.as_str(),
                "events": d.events,
                "last_event_unix_ms": d.last_event_unix_ms,
                "meta": d.meta,
            })
        })
        .collect();
    serde_json::Value::Array(devices).to_string()
}

/// Serves until `shutdown` turns true (or its sender is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let gate = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = gate.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (m, r) = (metrics.clone(), registry.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = respond(stream, &m, &r).await {
                tracing::debug!(%peer, error = %e, "metrics endpoint connection");
            }
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    metrics: &Metrics,
    registry: &Registry,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_complete = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if buf.len() >= MAX_HEAD {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let (status, ctype, body): (&str, &str, String) = match head_complete {
        Err(_) => (
            "408 Request Timeout",
            "text/plain",
            "request timeout\n".into(),
        ),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(false)) => ("400 Bad Request", "text/plain", "bad request\n".into()),
        Ok(Ok(true)) => route(&buf, metrics, registry),
    };
    let head_only = buf.starts_with(b"HEAD ");
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" },
    );
    stream.write_all(resp.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

fn route(
    head: &[u8],
    metrics: &Metrics,
    registry: &Registry,
) -> (&'static str, &'static str, String) {
    let line_end = head.iter().position(|&b| b == b'\r').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ("400 Bad Request", "text/plain", "bad request line\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return (
            "505 HTTP Version Not Supported",
            "text/plain",
            "HTTP/1.x only\n".into(),
        );
    }
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(metrics, registry),
        ),
        "/devices" => ("200 OK", "application/json", devices_json(registry)),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics or /devices\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::new();
        let r = Registry::new();
        let (s, t, b) = route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m, &r);
        assert_eq!(s, "200 OK");
        assert!(t.starts_with("text/plain; version=0.0.4"));
        assert!(b.contains("hearth_hub_events_received_total 0"));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n", &m, &r).0,
            "405 Method Not Allowed"
        );
        assert_eq!(
            route(b"GET /nope HTTP/1.1\r\n\r\n", &m, &r).0,
            "404 Not Found"
        );
        assert_eq!(route(b"garbage\r\n\r\n", &m, &r).0, "400 Bad Request");
        assert_eq!(route(b"GET /devices HTTP/1.0\r\n\r\n", &m, &r).2, "[]");
    }
}
