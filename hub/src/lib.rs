//! Hearth hub: owns the MQTT side of a home.
//!
//! - [`broker`]: embedded rumqttd (default) or an external broker.
//! - [`router`]: privacy guard on event topics, rules → actuator commands (QoS 1),
//!   registry updates, refresh requests.
//! - [`rules`]: the rules file. [`registry`]: devices. [`metrics`]: counters + Prometheus text.
//! - [`federation`]: `refresh` (coordinator `Admin.StartRound`) and model announcements.
//!
//! Entry points: [`start`] (returns a [`HubHandle`]) and [`run`].
#![forbid(unsafe_code)]

pub mod broker;
pub mod config;
pub mod error;
pub mod federation;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod router;
pub mod rules;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

pub use config::{BrokerConfig, Config};
pub use error::Error;
pub use federation::{refresh, start_round, RoundInfo, RoundPhase};
pub use metrics::{DropReason, InvalidKind, Metrics};
pub use registry::{Availability, DeviceInfo, Registry};
pub use rules::{RuleSet, RulesError};

use broker::EmbeddedBroker;
use router::{RefreshTarget, Router};

/// Capacity of each MQTT client's request channel.
const REQUEST_CAPACITY: usize = 1024;
/// Longest pause between MQTT reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Time `shutdown` allows each task to finish before aborting it.
const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Incoming packet limit of the hub's subscriber with an external broker (the embedded
/// broker's own limit is used otherwise): larger packets cost a reconnect, never a crash.
const EXTERNAL_MAX_PACKET: usize = 1024 * 1024;

/// A running hub. Dropping it stops the hub's tasks (use [`HubHandle::shutdown`] to wait
/// for them and flush pending commands). The embedded broker thread cannot be stopped
/// (rumqttd has no stop API) and lives until the process exits.
pub struct HubHandle {
    mqtt_addr: SocketAddr,
    mqtt_host: String,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    rules: Arc<RuleSet>,
    shutdown_tx: watch::Sender<bool>,
    publisher: AsyncClient,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    pub_task: JoinHandle<()>,
    broker: Option<EmbeddedBroker>,
}

impl std::fmt::Debug for HubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubHandle")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("rules", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl HubHandle {
    /// The broker address in use (the embedded broker's real port when configured with port 0;
    /// the resolved address of an external broker).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// `mqtt://host:port` of the broker in use.
    pub fn mqtt_url(&self) -> String {
        if self.mqtt_host.contains(':') {
            format!("mqtt://[{}]:{}", self.mqtt_host, self.mqtt_addr.port())
        } else {
            format!("mqtt://{}:{}", self.mqtt_host, self.mqtt_addr.port())
        }
    }

    /// Address of the metrics endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The hub's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The device registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The loaded rules.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.clone()
    }

    /// The metrics endpoint's text (counters and registry gauges).
    pub fn render_metrics(&self) -> String {
        http::render(&self.metrics, &self.registry)
    }

    /// Whether the embedded broker thread is running (`None` with an external broker).
    pub fn embedded_broker_running(&self) -> Option<bool> {
        self.broker.as_ref().map(EmbeddedBroker::is_running)
    }

    /// Stops routing, the metrics endpoint and the federation follower, flushes queued
    /// commands and disconnects from the broker. Each step is bounded in time.
    pub async fn shutdown(self) {
        let HubHandle {
            shutdown_tx,
            publisher,
            tasks,
            pub_task,
            broker,
            ..
        } = self;
        let _ = shutdown_tx.send(true);
        for (name, t) in tasks {
            stop_task(name, t).await;
        }
        // Queued after any pending command, so commands are flushed first.
        let _ = publisher.try_disconnect();
        drop(publisher);
        stop_task("mqtt publisher", pub_task).await;
        if broker.is_some() {
            tracing::info!(
                "hub stopped (the embedded broker keeps running until the process exits)"
            );
        } else {
            tracing::info!("hub stopped");
        }
    }
}

async fn stop_task(name: &str, mut t: JoinHandle<()>) {
    if tokio::time::timeout(TASK_STOP_TIMEOUT, &mut t)
        .await
        .is_err()
    {
        tracing::warn!(task = name, "did not stop in time; aborting");
        t.abort();
    }
}

fn mqtt_options(
    client_id: String,
    host: &str,
    port: u16,
    creds: Option<(String, String)>,
    max_packet: usize,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(max_packet, max_packet)
        .set_request_channel_capacity(REQUEST_CAPACITY)
        .set_clean_session(true);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    o
}

/// Last MQTT connection error, for the start-up failure message.
type LastError = Arc<Mutex<Option<String>>>;

fn note_error(last: &LastError, e: &rumqttc::ConnectionError) {
    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
}

/// Polls the subscriber connection: (re)subscribes on every ConnAck and routes publishes.
async fn subscriber_loop(
    mut el: EventLoop,
    client: AsyncClient,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    mut ready: Option<oneshot::Sender<()>>,
    last_error: LastError,
) {
    let filters = router::subscriptions();
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u64;
    loop {
        let polled = tokio::select! {
            _ = shutdown.changed() => break,
            e = el.poll() => e,
        };
        match polled {
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = router.handle(&p) => {}
                }
            }
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                Metrics::inc(&router.metrics.mqtt_connects);
                delay = Duration::from_millis(100);
                let subs = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!("broker refused a subscription (check the broker's ACLs)");
                }
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                note_error(&last_error, &e);
                if failures <= 5 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, retry_in = ?delay, "MQTT subscriber connection");
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    }
    // Best effort clean disconnect, bounded.
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            for _ in 0..16 {
                match el.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Polls the publisher connection until a Disconnect has been sent or every client handle is gone.
async fn publisher_loop(
    mut el: EventLoop,
    metrics: Arc<Metrics>,
    mut ready: Option<oneshot::Sender<()>>,
    last_error: LastError,
) {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u64;
    loop {
        match el.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                Metrics::inc(&metrics.mqtt_connects);
                delay = Duration::from_millis(100);
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                failures += 1;
                note_error(&last_error, &e);
                if failures <= 5 || failures.is_power_of_two() {
                    tracing::warn!(error = %e, retry_in = ?delay, "MQTT publisher connection");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
            }
        }
    }
}

/// Starts the hub: validates the config, loads the rules, starts (or connects to) the
/// broker, binds the metrics endpoint, connects and subscribes, and starts the federation
/// follower. Returns once events are being routed.
pub async fn start(config: Config) -> Result<HubHandle, Error> {
    config.validate()?;
    let rules = Arc::new(match &config.rules {
        Some(p) => RuleSet::load(p, &config.actuator_base)?,
        None => RuleSet::empty(),
    });
    let connect_timeout = Duration::from_secs(config.connect_timeout_secs);

    // Broker.
    let (host, port, mqtt_addr, creds, max_packet, broker) = match &config.broker {
        BrokerConfig::Embedded {
            listen,
            max_connections,
            max_payload_bytes,
        } => {
            let addr = broker::resolve_listen(*listen)?;
            let (mc, mp) = (*max_connections, *max_payload_bytes);
            let b =
                tokio::task::spawn_blocking(move || broker::start(addr, mc, mp, connect_timeout))
                    .await
                    .map_err(|e| Error::Broker(format!("broker start-up task failed: {e}")))??;
            let host = if addr.ip().is_unspecified() {
                if addr.is_ipv4() { "127.0.0.1" } else { "::1" }.to_string()
            } else {
                addr.ip().to_string()
            };
            let connect_addr = SocketAddr::new(host.parse().expect("ip literal"), addr.port());
            // Broker packet limit plus room for the fixed header and topic.
            (host, addr.port(), connect_addr, None, mp + 1024, Some(b))
        }
        BrokerConfig::External {
            url,
            username,
            password,
        } => {
            let (host, port) = config::parse_mqtt_url(url).map_err(Error::Config)?;
            let resolved = tokio::time::timeout(
                connect_timeout,
                tokio::net::lookup_host((host.as_str(), port)),
            )
            .await
            .map_err(|_| Error::Broker(format!("resolving {host} timed out")))?
            .map_err(|e| Error::Broker(format!("cannot resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| Error::Broker(format!("{host} has no address")))?;
            let creds = username
                .clone()
                .map(|u| (u, password.clone().unwrap_or_default()));
            (host, port, resolved, creds, EXTERNAL_MAX_PACKET, None)
        }
    };

    // Metrics endpoint (bind before connecting so a taken port fails start-up).
    let metrics_listener = match config.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| Error::Bind {
                    what: "metrics endpoint",
                    addr: a.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let last_error: LastError = Arc::default();

    // Two connections: the subscriber routes, the publisher sends; awaiting a publish
    // never stalls the loop that drains incoming messages.
    let (publisher, pub_el) = AsyncClient::new(
        mqtt_options(
            format!("{}-pub", config.client_id),
            &host,
            port,
            creds.clone(),
            max_packet,
        ),
        REQUEST_CAPACITY,
    );
    let (pub_ready_tx, pub_ready) = oneshot::channel();
    let pub_task = tokio::spawn(publisher_loop(
        pub_el,
        metrics.clone(),
        Some(pub_ready_tx),
        last_error.clone(),
    ));

    let (sub_client, sub_el) = AsyncClient::new(
        mqtt_options(
            format!("{}-sub", config.client_id),
            &host,
            port,
            creds,
            max_packet,
        ),
        REQUEST_CAPACITY,
    );
    let refresh_target = match (&config.coordinator, &config.admin_token) {
        (Some(url), Some(token)) => Some(RefreshTarget {
            url: url.clone(),
            token: token.clone(),
        }),
        _ => None,
    };
    let router = Router {
        rules: rules.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        publisher: publisher.clone(),
        refresh: refresh_target.clone(),
        refresh_gate: Arc::new(Semaphore::new(1)),
    };
    let (sub_ready_tx, sub_ready) = oneshot::channel();
    let sub_task = tokio::spawn(subscriber_loop(
        sub_el,
        sub_client,
        router,
        shutdown_rx.clone(),
        Some(sub_ready_tx),
        last_error.clone(),
    ));

    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = vec![("mqtt subscriber", sub_task)];
    let both_ready = async {
        let (a, b) = tokio::join!(pub_ready, sub_ready);
        a.is_ok() && b.is_ok()
    };
    let ok = matches!(
        tokio::time::timeout(connect_timeout, both_ready).await,
        Ok(true)
    );
    if !ok {
        let _ = shutdown_tx.send(true);
        for (_, t) in tasks {
            t.abort();
        }
        pub_task.abort();
        let why = last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no answer".into());
        return Err(Error::Broker(format!(
            "cannot connect and subscribe to the MQTT broker at {host}:{port} within {connect_timeout:?}: {why}"
        )));
    }

    if let Some(l) = metrics_listener {
        tasks.push((
            "metrics endpoint",
            tokio::spawn(http::serve(
                l,
                metrics.clone(),
                registry.clone(),
                shutdown_rx.clone(),
            )),
        ));
    }
    if let Some(t) = refresh_target {
        tasks.push((
            "federation follower",
            tokio::spawn(federation::follow(
                t.url,
                t.token,
                config.follow_models.clone(),
                publisher.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            )),
        ));
    }
    tracing::info!(
        broker = %format!("{host}:{port}"),
        rules = rules.len(),
        metrics = ?metrics_addr,
        coordinator = ?config.coordinator,
        "hub started"
    );
    Ok(HubHandle {
        mqtt_addr,
        mqtt_host: host,
        metrics_addr,
        metrics,
        registry,
        rules,
        shutdown_tx,
        publisher,
        tasks,
        pub_task,
        broker,
    })
}

/// Runs the hub until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let hub = start(config).await?;
    shutdown.await;
    hub.shutdown().await;
    Ok(())
}
