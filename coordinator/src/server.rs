//! Serving: validates the config, builds the [`Coordinator`] (store, models, resumed rounds) and
//! runs the tonic server (TLS with the coordinator's CA unless `insecure`) on a bound listener
//! until the shutdown future resolves, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::limits;
use crate::service::Services;
use crate::{Config, Coordinator, Error};

struct Prepared {
    coord: Arc<Coordinator>,
    stop: Arc<watch::Sender<bool>>,
    metrics: Option<TcpListener>,
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        crate::metrics::PROMETHEUS_CONTENT_TYPE,
                    )],
                    m.render(),
                )
            }
        }),
    );
    let shutdown = async move { crate::state::stopped(&mut stop).await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

async fn prepare(config: Config) -> Result<Prepared, Error> {
    config.validate()?;
    let (stop, stop_rx) = watch::channel(false);
    let metrics = if config.metrics_listen.is_empty() {
        None
    } else {
        Some(TcpListener::bind(&config.metrics_listen).await?)
    };
    // A home aggregator enrols upstream (or loads its stored identity) before anything else:
    // the key its clients pin is the upstream's.
    let upstream = match &config.upstream {
        Some(_) => Some(Arc::new(crate::upstream::Upstream::connect(&config).await?)),
        None => None,
    };
    let coord = Coordinator::new(config, stop_rx, upstream).await?;
    let resumed = coord.resume_rounds().await?;
    if resumed > 0 {
        tracing::info!(rounds = resumed, "resumed open rounds");
    }
    coord.follow_instances()?;
    if coord.upstream().is_some() {
        let me = coord.clone();
        coord.spawn_task(async move { crate::upstream::follow(me).await });
    }
    coord.renew_presence()?;
    Ok(Prepared {
        coord,
        stop: Arc::new(stop),
        metrics,
    })
}

async fn serve(
    p: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let Prepared {
        coord,
        stop,
        metrics,
    } = p;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "coordinator listening");
    let metrics_task = metrics.map(|l| {
        if let Ok(a) = l.local_addr() {
            tracing::info!(addr = %a, "metrics at http://{a}/metrics");
        }
        tokio::spawn(serve_metrics(
            l,
            coord.metrics().clone(),
            coord.shutdown_signal(),
        ))
    });
    let svc = Services::new(coord.clone());
    let stop_on_signal = stop.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: draining calls");
        // Ends subscriptions and timers so connections can close.
        stop_on_signal.send_replace(true);
    };
    let (cfg, metrics) = (coord.config(), coord.metrics().clone());
    let (enrollment, federation, admin) = limits::services(svc, &cfg.limits);
    let upload_limit = Duration::from_secs(cfg.upload_timeout_secs);
    let incoming = limits::incoming(listener, cfg.limits.max_connections, metrics.clone());
    let handshake_limit = Duration::from_secs(cfg.limits.handshake_timeout_secs);
    let tls = tls_config(&coord)?;
    let router = limits::builder(&cfg.limits, upload_limit, metrics.clone())
        .add_service(enrollment)
        .add_service(federation)
        .add_service(admin);
    let served = match tls {
        Some(tls) => {
            let incoming = crate::handshake::incoming(incoming, tls, handshake_limit, metrics);
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        None => router.serve_with_incoming_shutdown(incoming, signal).await,
    };
    stop.send_replace(true);
    let grace = Duration::from_secs(coord.config().shutdown_grace_secs.max(1));
    coord.join_tasks(grace).await;
    if let Some(t) = metrics_task {
        let _ = tokio::time::timeout(grace, t).await;
    }
    let flushed = coord.store().flush().await;
    drop(coord);
    served?;
    flushed?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// TLS with the coordinator's server certificate; client certificates of its CA are verified
/// when presented but optional at this layer (Enroll needs none), and every Federation call
/// requires one (`Services::client`). `None` in insecure mode. The handshake itself is
/// `handshake::incoming`.
fn tls_config(coord: &Coordinator) -> Result<Option<Arc<rustls::ServerConfig>>, Error> {
    let Some(pki) = coord.pki() else {
        return Ok(None);
    };
    let (cert, key) = pki.server_identity();
    crate::handshake::server_config(cert, key, pki.ca_pem())
        .map(Some)
        .map_err(|e| Error::Internal(format!("TLS: {e}")))
}

/// Runs the coordinator on `listener` until `shutdown` resolves, then drains and returns.
/// Fails early (before serving) on an invalid config or a start-up error.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let p = prepare(config).await?;
    serve(p, listener, shutdown).await
}

/// A coordinator running on a background task (see [`start`]).
#[derive(Debug)]
pub struct CoordinatorHandle {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    coord: Arc<Coordinator>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl CoordinatorHandle {
    /// Address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Address of the Prometheus endpoint, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `https://addr` (`http://addr` in insecure mode), for tonic clients.
    pub fn endpoint(&self) -> String {
        let scheme = if self.coord.pki().is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The CA certificate clients trust (`None` in insecure mode).
    pub fn ca_pem(&self) -> Option<&str> {
        self.coord.pki().map(|p| p.ca_pem())
    }

    /// The running coordinator (for in-process inspection).
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coord
    }

    /// Stops the server gracefully and waits for it.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        drop(self.coord);
        self.task
            .await
            .map_err(|e| Error::Internal(format!("server task failed: {e}")))?
    }
}

/// Prepares the coordinator (errors are returned here) and serves it on a background task.
/// Dropping the handle also stops the server.
pub async fn start(config: Config, listener: TcpListener) -> Result<CoordinatorHandle, Error> {
    let addr = listener.local_addr()?;
    let p = prepare(config).await?;
    let coord = p.coord.clone();
    let metrics_addr = p.metrics.as_ref().and_then(|l| l.local_addr().ok());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(p, listener, async move {
        let _ = rx.await;
    }));
    Ok(CoordinatorHandle {
        addr,
        metrics_addr,
        coord,
        stop: Some(tx),
        task,
    })
}
