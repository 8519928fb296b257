//! Limits on every gRPC connection, call and stream (`[limits]` in the config), so a hostile
//! or broken peer cannot hold the coordinator's memory, tasks or sockets:
//!
//! - **connections**: at most `max_connections` open at once; at the cap the accept loop
//!   stops accepting (new connections wait in the kernel's backlog, and are accepted as soon
//!   as one closes: backpressure, as in mini-redis's `server.rs`);
//! - **streams per connection**: HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` =
//!   `max_streams_per_connection` (further calls wait on the client side);
//! - **message sizes**: every service decodes at most `max_message_bytes` and encodes at most
//!   `max_response_bytes` per message (larger: `ResourceExhausted`/`OutOfRange`);
//! - **call time**: a unary call (and a streaming call until its response starts) must answer
//!   within `call_timeout_secs`; an `UploadUpdate` must be received whole within
//!   `upload_timeout_secs`; `FetchModel` streams are cut at `fetch_timeout_secs`
//!   (`service.rs`); `Subscribe` is long-lived and kept honest by HTTP/2 keepalive pings
//!   (`keepalive_interval_secs`, a peer that does not answer within `keepalive_timeout_secs`
//!   is dropped; every connection is pinged, not only `Subscribe`'s);
//! - **TLS handshakes**: at most `handshake_timeout_secs` (`handshake.rs`).
//!
//! Every refusal here is logged and counted through [`Metrics::reject`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use hearth_proto::v1::{
    admin_server::AdminServer, enrollment_server::EnrollmentServer,
    federation_server::FederationServer,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::Metrics;
use crate::service::Services;

/// The `[limits]` section of the coordinator config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections served at once; more wait to be accepted until one closes.
    pub max_connections: usize,
    /// Concurrent calls (HTTP/2 streams) per connection.
    pub max_streams_per_connection: u32,
    /// Largest message a service decodes (upload chunks are 64 KiB).
    pub max_message_bytes: usize,
    /// Largest message a service encodes (model chunks are 64 KiB).
    pub max_response_bytes: usize,
    /// Time limit of a unary call, and of a streaming call until its response starts.
    pub call_timeout_secs: u64,
    /// HTTP/2 ping interval on every connection (dead peers of long-lived `Subscribe`
    /// streams are found this way); also the TCP keepalive time.
    pub keepalive_interval_secs: u64,
    /// A connection whose peer does not answer a ping within this is closed.
    pub keepalive_timeout_secs: u64,
    /// A TLS handshake not finished within this is refused (`handshake_timeout`).
    pub handshake_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_streams_per_connection: 32,
            max_message_bytes: 1024 * 1024,
            max_response_bytes: 1024 * 1024,
            call_timeout_secs: 30,
            keepalive_interval_secs: 30,
            keepalive_timeout_secs: 10,
            handshake_timeout_secs: 10,
        }
    }
}

impl Limits {
    /// Checks every value; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=65_536).contains(&self.max_connections) {
            return Err("limits.max_connections must be in 1..=65536".into());
        }
        if !(1..=1024).contains(&self.max_streams_per_connection) {
            return Err("limits.max_streams_per_connection must be in 1..=1024".into());
        }
        // A model chunk (64 KiB of data plus its header fields) must fit both ways.
        let min = hearth_proto::CHUNK_SIZE + 4096;
        for (key, v) in [
            ("max_message_bytes", self.max_message_bytes),
            ("max_response_bytes", self.max_response_bytes),
        ] {
            if !(min..=64 << 20).contains(&v) {
                return Err(format!("limits.{key} must be in {min}..=67108864"));
            }
        }
        for (key, v) in [
            ("call_timeout_secs", self.call_timeout_secs),
            ("keepalive_interval_secs", self.keepalive_interval_secs),
            ("keepalive_timeout_secs", self.keepalive_timeout_secs),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
        ] {
            if !(1..=86_400).contains(&v) {
                return Err(format!("limits.{key} must be in 1..=86400"));
            }
        }
        Ok(())
    }
}

/// The three services with the message-size limits applied.
pub fn services(
    svc: Services,
    l: &Limits,
) -> (
    EnrollmentServer<Services>,
    FederationServer<Services>,
    AdminServer<Services>,
) {
    (
        EnrollmentServer::new(svc.clone())
            .max_decoding_message_size(l.max_message_bytes)
            .max_encoding_message_size(l.max_response_bytes),
        FederationServer::new(svc.clone())
            .max_decoding_message_size(l.max_message_bytes)
            .max_encoding_message_size(l.max_response_bytes),
        AdminServer::new(svc)
            .max_decoding_message_size(l.max_message_bytes)
            .max_encoding_message_size(l.max_response_bytes),
    )
}

/// A tonic server builder with the per-connection limits (streams, keepalive) and the
/// per-call time limits ([`CallTimeoutLayer`]).
pub fn builder(
    l: &Limits,
    upload_timeout: Duration,
    metrics: Arc<Metrics>,
) -> tonic::transport::Server<tower_layer::Stack<CallTimeoutLayer, tower_layer::Identity>> {
    let keepalive = Duration::from_secs(l.keepalive_interval_secs);
    tonic::transport::Server::builder()
        .max_concurrent_streams(l.max_streams_per_connection)
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(Duration::from_secs(l.keepalive_timeout_secs)))
        .tcp_keepalive(Some(keepalive))
        .layer(CallTimeoutLayer {
            call: Duration::from_secs(l.call_timeout_secs),
            upload: upload_timeout,
            metrics,
        })
}

// ---------------------------------------------------------------- connections

/// An accepted connection holding one of the `max_connections` slots until it is dropped
/// (when the server closes the connection).
/// Opening and closing are counted (`hearth_coordinator_connections_{accepted,closed}_total`:
/// their difference is the number open, so a slot freed by a keepalive timeout shows).
#[derive(Debug)]
pub struct CappedConn {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for CappedConn {
    fn drop(&mut self) {
        self.metrics
            .inc("hearth_coordinator_connections_closed_total", String::new());
    }
}

impl CappedConn {
    /// The peer's address, when the socket still knows it.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.inner.peer_addr().ok()
    }
}

impl Connected for CappedConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CappedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The accept loop with the connection cap: a slot is taken *before* `accept`, so while
/// `max_connections` are open nothing more is accepted (the kernel backlog holds the
/// newcomers) and the next one proceeds as soon as a connection closes. Reaching the cap is
/// logged and counted (`reason = "connection_cap"`) once per time it is reached.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<CappedConn>> {
    let slots = Arc::new(Semaphore::new(max_connections));
    futures_util::stream::unfold(
        (listener, slots, metrics),
        move |(listener, slots, metrics)| async move {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(s) => s,
                Err(_) => {
                    metrics.reject(
                        "connect",
                        "connection_cap",
                        "",
                        &format!("{max_connections} connections open; new ones wait"),
                    );
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the semaphore is never closed")
                }
            };
            let conn = listener.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                metrics.inc(
                    "hearth_coordinator_connections_accepted_total",
                    String::new(),
                );
                CappedConn {
                    inner: s,
                    _slot: slot,
                    metrics: metrics.clone(),
                }
            });
            Some((conn, (listener, slots, metrics)))
        },
    )
}

// ---------------------------------------------------------------- call time

/// Tower layer cutting a call that has not answered within its time limit with
/// `DeadlineExceeded` (logged and counted, `reason = "timeout"`): `UploadUpdate` gets the
/// upload limit (the whole client stream is read before it answers), every other call the
/// call limit (a server stream is bounded separately once it has started).
#[derive(Clone, Debug)]
pub struct CallTimeoutLayer {
    call: Duration,
    upload: Duration,
    metrics: Arc<Metrics>,
}

impl<S> tower_layer::Layer<S> for CallTimeoutLayer {
    type Service = CallTimeout<S>;
    fn layer(&self, inner: S) -> CallTimeout<S> {
        CallTimeout {
            inner,
            limits: self.clone(),
        }
    }
}

/// The service made by [`CallTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct CallTimeout<S> {
    inner: S,
    limits: CallTimeoutLayer,
}

/// A short, stable name of a gRPC method path for logs and counters.
pub fn call_name(path: &str) -> &'static str {
    match path.rsplit('/').next().unwrap_or("") {
        "Enroll" => "enroll",
        "Subscribe" => "subscribe",
        "FetchModel" => "fetch",
        "UploadUpdate" => "upload",
        _ if path.contains(".Admin/") => "admin",
        _ => "other",
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for CallTimeout<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = call_name(req.uri().path());
        let limit = if call == "upload" {
            self.limits.upload
        } else {
            self.limits.call
        };
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .map(|a| a.to_string())
            .unwrap_or_default();
        let metrics = self.limits.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(Ok(resp)) => {
                    // tonic refuses an over-limit message before any handler sees it.
                    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
                        if s.code() == tonic::Code::OutOfRange
                            && s.message().contains("message length too large")
                        {
                            metrics.reject(call, "message_too_large", &peer, &s.message());
                        }
                    }
                    Ok(resp)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let msg = format!("{call} took longer than {} s", limit.as_secs_f32());
                    metrics.reject(call, "timeout", &peer, &msg);
                    Ok(tonic::Status::deadline_exceeded(msg).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        Limits::default().validate().unwrap();
        let l = Limits {
            max_connections: 0,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("max_connections"));
        let l = Limits {
            max_message_bytes: 1000,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("max_message_bytes"));
        let l = Limits {
            keepalive_timeout_secs: 0,
            ..Limits::default()
        };
        assert!(l.validate().unwrap_err().contains("keepalive_timeout_secs"));
    }

    #[test]
    fn method_paths_have_short_names() {
        assert_eq!(call_name("/hearth.v1.Federation/UploadUpdate"), "upload");
        assert_eq!(call_name("/hearth.v1.Enrollment/Enroll"), "enroll");
        assert_eq!(call_name("/hearth.v1.Admin/ListVersions"), "admin");
        assert_eq!(call_name("/x.Y/Z"), "other");
    }
}
