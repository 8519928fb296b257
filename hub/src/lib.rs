//! Hearth hub: owns the MQTT side of a home.
//!
//! - [`broker`]: the embedded rumqttd (default; from `hearth-edge`) or an external broker
//!   (`mqtt://` or `mqtts://`, URL rules and client options from `hearth-edge`).
//! - [`router`]: privacy guard on event topics, rules → actuator commands (QoS 1),
//!   registry updates, refresh requests.
//! - [`delivery`]: the command outbox (persisted, held while an actuator is offline,
//!   bounded, expiring, ids for deduplication) and its own MQTT connection.
//! - [`rules`]: the rules file. [`registry`]: devices (persisted in sled with `state_dir`).
//!   [`metrics`]: counters + Prometheus text.
//! - [`discovery`]: Home Assistant MQTT discovery for agents and the hub.
//! - [`zigbee`]: Zigbee2MQTT's bridge and device topics.
//! - [`federation`]: `refresh` (coordinator `Admin.StartRound`) and model announcements.
//! - [`http`]: `/metrics`, `/devices`, `/healthz` (axum).
//! - [`auth`]: the MQTT credential store (Mosquitto password file and ACLs, the hub's own
//!   login, provisioning) and signed refresh requests.
//!
//! Entry points: [`run`] (config → bind → serve until a shutdown future resolves) and
//! [`start`] (the same start-up, returning a [`HubHandle`]).
#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod delivery;
pub mod discovery;
pub mod error;
pub mod federation;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod router;
pub mod rules;
pub mod zigbee;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_edge::broker::{BrokerSettings, EmbeddedBroker};
use hearth_edge::{stopped, ClientSettings, Connection, MqttUrl};
use rumqttc::{AsyncClient, Event as MqttEvent, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

/// The embedded broker (rumqttd), from the edge layer.
pub use hearth_edge::broker;

pub use auth::{CredentialStore, Deprovisioned, Provisioned, Role};
pub use config::{
    AggregateConfig, BrokerConfig, Config, FederationConfig, MqttAuthConfig, RefreshAuth,
};
pub use delivery::DeliveryConfig;
pub use discovery::{DiscoveryStats, HomeAssistantConfig};
pub use error::Error;
pub use federation::{refresh, start_round, RoundInfo, RoundPhase};
pub use metrics::{DropReason, InvalidKind, Metrics};
pub use registry::{Availability, DeviceInfo, Registry, Source};
pub use rules::engine::{Reloaded, RulesEngineConfig};
pub use rules::history::Firing;
pub use rules::{RuleSet, RulesError};
pub use zigbee::ZigbeeConfig;

use router::{RefreshGuard, RefreshTarget, Router};

/// Capacity of each MQTT client's request channel.
const REQUEST_CAPACITY: usize = 1024;
/// Keep-alive of the hub's MQTT connections.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
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
    mqtt_url: MqttUrl,
    metrics_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    engine: Arc<rules::engine::Engine>,
    exec: Arc<rules::engine::Executor>,
    shutdown_tx: watch::Sender<bool>,
    publisher: AsyncClient,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    pub_task: JoinHandle<()>,
    broker: Option<Arc<EmbeddedBroker>>,
    status: http::Status,
    credentials: Option<CredentialStore>,
    actuator_base: String,
    discovery: discovery::Kicker,
    discovery_stats: Arc<DiscoveryStats>,
    /// The home aggregator (`[federation.aggregate]`), when configured.
    aggregator: Option<hearth_coordinator::CoordinatorHandle>,
}

impl std::fmt::Debug for HubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubHandle")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("rules", &self.engine.current().len())
            .finish_non_exhaustive()
    }
}

impl HubHandle {
    /// The broker address in use (the embedded broker's real port when configured with port 0;
    /// the resolved address of an external broker).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// `mqtt://host:port` (or `mqtts://`) of the broker in use, without credentials.
    pub fn mqtt_url(&self) -> String {
        self.mqtt_url.to_string()
    }

    /// Address of the metrics endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The hub's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The home aggregator (`[federation.aggregate]`): its gRPC address, CA and counters.
    pub fn aggregator(&self) -> Option<&hearth_coordinator::CoordinatorHandle> {
        self.aggregator.as_ref()
    }

    /// The credential store (`None` when neither the embedded broker's logins nor signed
    /// refreshes need one).
    pub fn credentials(&self) -> Option<&CredentialStore> {
        self.credentials.as_ref()
    }

    /// Issues MQTT credentials for `name` (see [`CredentialStore::provision`]); with the
    /// embedded broker they work at once.
    pub fn provision(&self, name: &str, role: Role) -> Result<Provisioned, Error> {
        let store = self.credentials.as_ref().ok_or_else(|| {
            Error::Config("this hub keeps no credential store (mqtt_auth)".into())
        })?;
        store.provision(name, role, &self.actuator_base, true)
    }

    /// Withdraws `name`'s MQTT credentials (see [`CredentialStore::deprovision`]); the
    /// embedded broker refuses its next login (a connection already open is not cut).
    pub fn deprovision(&self, name: &str) -> Result<Deprovisioned, Error> {
        let store = self.credentials.as_ref().ok_or_else(|| {
            Error::Config("this hub keeps no credential store (mqtt_auth)".into())
        })?;
        store.deprovision(name, &self.actuator_base)
    }

    /// `mqtt://user:password@host:port` (or `mqtts://`) for `p`, to hand to a client.
    pub fn client_url(&self, p: &Provisioned) -> String {
        let mut u = self.mqtt_url.clone();
        u.username = Some(p.user.clone());
        u.password = Some(p.password.clone());
        u.to_url_with_password()
    }

    /// The device registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// What Home Assistant discovery published.
    pub fn discovery_stats(&self) -> Arc<DiscoveryStats> {
        self.discovery_stats.clone()
    }

    /// Removes a device from the registry (`name` or `<source>/<name>`, see
    /// [`Registry::remove_id`]); its Home Assistant entities are removed too.
    pub fn remove_device(&self, id: &str) -> Option<DeviceInfo> {
        let d = self.registry.remove_id(id)?;
        self.discovery.changed();
        Some(d)
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.engine.current()
    }

    /// Re-reads the rules file now (what SIGHUP does). On an error the last good rules
    /// stay in force; the error is also logged and counted.
    pub fn reload_rules(&self) -> Result<Reloaded, RulesError> {
        self.exec.reload(true).unwrap_or(Ok(Reloaded::Unchanged))
    }

    /// Successful and refused rules reloads so far.
    pub fn rules_reloads(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.engine.reloads.load(Relaxed),
            self.engine.reload_failures.load(Relaxed),
        )
    }

    /// Firing history, newest first (optionally of one rule).
    pub fn rules_history(&self, rule: Option<&str>, limit: usize) -> Vec<Firing> {
        self.engine.history.list(rule, limit)
    }

    /// The metrics endpoint's text (counters, registry gauges, rules, connections).
    pub fn render_metrics(&self) -> String {
        http::render_status(&self.status)
    }

    /// `Ok` while the hub's MQTT connections are up (and the embedded broker runs), else
    /// what is down: what `/healthz` answers.
    pub fn health(&self) -> Result<(), String> {
        self.status.health()
    }

    /// Whether the embedded broker thread is running (`None` with an external broker).
    pub fn embedded_broker_running(&self) -> Option<bool> {
        self.broker.as_ref().map(|b| b.is_running())
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
            engine,
            registry,
            aggregator,
            ..
        } = self;
        let _ = shutdown_tx.send(true);
        if let Some(a) = aggregator {
            if let Err(e) = a.shutdown().await {
                tracing::warn!(error = %e, "home aggregator stopped with an error");
            }
        }
        for (name, t) in tasks {
            stop_task(name, t).await;
        }
        registry.flush_sync();
        // Queued after any pending command, so commands are flushed first.
        let _ = publisher.try_disconnect();
        drop(publisher);
        stop_task("mqtt publisher", pub_task).await;
        // Writes the queued firings and releases the history database.
        tokio::task::spawn_blocking(move || engine.history.close())
            .await
            .ok();
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

/// Polls the subscriber connection: (re)subscribes on every ConnAck and routes publishes.
async fn subscriber_loop(
    mut conn: Connection,
    client: AsyncClient,
    router: Router,
    filters: Arc<std::sync::Mutex<Vec<String>>>,
    mut shutdown: watch::Receiver<bool>,
    mut ready: Option<oneshot::Sender<()>>,
) {
    loop {
        let polled = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            e = conn.poll() => e,
        };
        match polled {
            None => break,
            Some(MqttEvent::Incoming(Packet::Publish(p))) => {
                tokio::select! {
                    _ = stopped(&mut shutdown) => break,
                    _ = router.handle(&p) => {}
                }
            }
            Some(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                Metrics::inc(&router.metrics.mqtt_connects);
                let subs: Vec<_> = filters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
                    .collect();
                if let Err(e) = client.try_subscribe_many(subs) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Some(MqttEvent::Incoming(Packet::SubAck(ack))) => {
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
            Some(_) => {}
        }
    }
    // Best effort clean disconnect, bounded.
    conn.disconnect(&client, Duration::from_millis(500)).await;
}

/// Fires time and interval rules, and reloads the rules file when it changes (every
/// `reload_secs`; 0 = never, SIGHUP only).
async fn rules_timers(
    exec: Arc<rules::engine::Executor>,
    reload_secs: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(rules::engine::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_poll = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = tick.tick() => {}
        }
        exec.tick().await;
        if reload_secs > 0 && last_poll.elapsed() >= Duration::from_secs(reload_secs) {
            last_poll = tokio::time::Instant::now();
            let _ = exec.reload(false);
        }
    }
}

/// Polls the publisher connection until a Disconnect has been sent or every client handle is gone.
async fn publisher_loop(
    mut conn: Connection,
    metrics: Arc<Metrics>,
    mut ready: Option<oneshot::Sender<()>>,
    discovery: discovery::Kicker,
) {
    while let Some(ev) = conn.poll().await {
        match ev {
            MqttEvent::Incoming(Packet::ConnAck(_)) => {
                Metrics::inc(&metrics.mqtt_connects);
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(());
                    }
                    // Back after an outage: the broker may have lost retained configs.
                    None => discovery.all(),
                }
            }
            MqttEvent::Outgoing(Outgoing::Disconnect) => return,
            _ => {}
        }
    }
}

/// Starts the hub: validates the config, loads the rules, starts (or connects to) the
/// broker, binds the status endpoint, connects and subscribes, and starts the federation
/// follower. Returns once events are being routed.
pub async fn start(config: Config) -> Result<HubHandle, Error> {
    config.validate()?;
    let rules = match &config.rules {
        Some(p) => RuleSet::load(p, &config.actuator_base)?,
        None => RuleSet::empty(),
    };
    let history = {
        let path = config.rules_engine.history.clone();
        let max = config.rules_engine.history_max;
        let per_rule = config.rules_engine.history_max_per_rule;
        tokio::task::spawn_blocking(move || {
            rules::history::History::open(path.as_deref(), max, per_rule)
        })
        .await
        .map_err(|e| Error::Config(format!("history start-up task failed: {e}")))?
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?
    };
    let engine = Arc::new(rules::engine::Engine::new(
        rules,
        config.rules.clone(),
        &config.actuator_base,
        history,
    ));
    let connect_timeout = Duration::from_secs(config.connect_timeout_secs);
    let embedded = matches!(config.broker, BrokerConfig::Embedded { .. });
    let auth = &config.mqtt_auth;
    let signed_refresh = auth.refresh == RefreshAuth::Signed && config.coordinator.is_some();
    let credentials = if (embedded && !auth.allow_anonymous) || signed_refresh {
        Some(
            CredentialStore::open(&auth.dir)?
                .with_discovery_prefix(&config.home_assistant.discovery_prefix),
        )
    } else {
        None
    };

    // Broker.
    let (url, mqtt_addr, ca_file, password_file, max_packet, broker) = match &config.broker {
        BrokerConfig::Embedded {
            listen,
            max_connections,
            max_payload_bytes,
            queue_kib,
        } => {
            let login = match (&credentials, auth.allow_anonymous) {
                (Some(store), false) => Some((
                    store.ensure_hub(&config.actuator_base)?,
                    store.passwd_path(),
                )),
                _ => {
                    tracing::warn!(
                        "mqtt_auth.allow_anonymous: the embedded broker accepts clients without \
                         credentials; anything that reaches its port can publish as any device"
                    );
                    None
                }
            };
            let settings = BrokerSettings {
                listen: *listen,
                max_connections: *max_connections,
                max_payload: *max_payload_bytes,
                password_file: login.as_ref().map(|(_, p)| p.clone()),
                ..BrokerSettings::default()
            }
            .with_queue_kib(*queue_kib);
            let b = tokio::task::spawn_blocking(move || {
                hearth_edge::broker::start(&settings, connect_timeout)
            })
            .await
            .map_err(|e| Error::Broker(format!("broker start-up task failed: {e}")))??;
            let addr = b.connect_addr();
            let url = MqttUrl {
                tls: false,
                host: addr.ip().to_string(),
                port: addr.port(),
                username: login.as_ref().map(|_| auth::HUB_USER.to_string()),
                password: login.map(|(pw, _)| pw),
            };
            // Broker packet limit plus room for the fixed header and topic.
            (
                url,
                addr,
                None,
                None,
                max_payload_bytes + 1024,
                Some(Arc::new(b)),
            )
        }
        BrokerConfig::External {
            ca_file,
            password_file,
            ..
        } => {
            let url = config.broker.external_url()?.expect("external broker");
            let resolved = tokio::time::timeout(
                connect_timeout,
                tokio::net::lookup_host((url.host.as_str(), url.port)),
            )
            .await
            .map_err(|_| Error::Broker(format!("resolving {} timed out", url.host)))?
            .map_err(|e| Error::Broker(format!("cannot resolve {}: {e}", url.host)))?
            .next()
            .ok_or_else(|| Error::Broker(format!("{} has no address", url.host)))?;
            (
                url,
                resolved,
                ca_file.clone(),
                password_file.clone(),
                EXTERNAL_MAX_PACKET,
                None,
            )
        }
    };
    let refresh_guard = match auth.refresh {
        RefreshAuth::Signed => match &credentials {
            Some(store) => RefreshGuard::Signed(Arc::new(auth::RefreshVerifier::persistent(
                &store.refresh_key()?,
                &store.dir().join(auth::REFRESH_NONCES_FILE),
            )?)),
            // No coordinator: nothing a refresh could start; refuse them all.
            None => RefreshGuard::Off,
        },
        RefreshAuth::BrokerAcl => RefreshGuard::BrokerAcl,
        RefreshAuth::Off => RefreshGuard::Off,
    };
    let public_url = MqttUrl {
        username: None,
        password: None,
        ..url.clone()
    };

    // Status endpoint (bind before connecting so a taken port fails start-up).
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
    // The home aggregator: binds its gRPC port, enrols upstream at first start.
    let aggregator = if config.federation.aggregate.enabled() {
        Some(start_aggregator(&config).await?)
    } else {
        None
    };

    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::open_or_memory(config.state_dir.as_deref())?);
    let ha = config
        .home_assistant
        .enabled
        .then_some(&config.home_assistant);
    let hub_will = ha
        .filter(|h| h.hub_entities)
        .map(|_| discovery::hub_status_topic());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let client = |suffix: &str| -> Result<(AsyncClient, rumqttc::EventLoop), hearth_edge::Error> {
        let mut s = ClientSettings::new(url.clone(), format!("{}-{suffix}", config.client_id));
        if suffix == "pub" {
            if let Some(t) = &hub_will {
                s = s.offline_will(t.clone());
            }
        }
        let s = s
            .keep_alive(KEEP_ALIVE)
            .max_packet_size(max_packet)
            .request_capacity(REQUEST_CAPACITY)
            .ca_file(ca_file.clone())
            .password_file(password_file.clone())
            .persistent_session(config.delivery.persistent_session);
        if suffix == "cmd" {
            // Room for the delivery task's window of unacknowledged commands.
            let mut o = s.options()?;
            o.set_inflight(delivery::CLIENT_INFLIGHT);
            return Ok(AsyncClient::new(o, REQUEST_CAPACITY));
        }
        s.connect()
    };
    let outbox = delivery::Outbox::open(&config.delivery, metrics.clone())?;

    // Two connections: the subscriber routes, the publisher sends; awaiting a publish
    // never stalls the loop that drains incoming messages.
    let (publisher, pub_el) = client("pub")?;
    let pub_conn = Connection::new(pub_el, "hub publisher");
    let pub_status = pub_conn.status();
    let (pub_ready_tx, pub_ready) = oneshot::channel();
    let discovery_stats = Arc::new(DiscoveryStats::default());
    let (kicker, discovery_task) = match ha {
        Some(h) => {
            let (k, t) = discovery::spawn(
                discovery::Discovery {
                    cfg: h.clone(),
                    registry: registry.clone(),
                    metrics: metrics.clone(),
                    client: publisher.clone(),
                    guard: refresh_guard.clone(),
                    follow_models: config.follow_models.clone(),
                    stats: discovery_stats.clone(),
                },
                shutdown_rx.clone(),
            );
            (k, Some(t))
        }
        None => (discovery::Kicker::default(), None),
    };
    let pub_task = tokio::spawn(publisher_loop(
        pub_conn,
        metrics.clone(),
        Some(pub_ready_tx),
        kicker.clone(),
    ));

    // Commands have their own connection, owned by the delivery task.
    let (cmd_client, cmd_el) = client("cmd")?;
    let cmd_conn = Connection::new(cmd_el, "hub commands");
    let cmd_status = cmd_conn.status();
    let (cmd_ready_tx, cmd_ready) = oneshot::channel();
    let (commands, cmd_task) = delivery::spawn(
        outbox,
        &config.delivery,
        cmd_conn,
        cmd_client,
        shutdown_rx.clone(),
        cmd_ready_tx,
    );

    let (sub_client, sub_el) = client("sub")?;
    let sub_conn = Connection::new(sub_el, "hub subscriber");
    let sub_status = sub_conn.status();
    let refresh_target = match (&config.coordinator, &config.admin_token) {
        (Some(url), Some(token)) => Some(RefreshTarget {
            url: url.clone(),
            ca_pem: config.coordinator_ca()?,
            token: token.clone(),
        }),
        _ => None,
    };
    let refresh_gate = Arc::new(Semaphore::new(1));
    let refresh_fn: rules::engine::RefreshFn = {
        let (target, gate, metrics) = (
            refresh_target.clone(),
            refresh_gate.clone(),
            metrics.clone(),
        );
        Arc::new(move |model: &str| {
            Metrics::inc(&metrics.refresh_requests);
            router::start_refresh(target.clone(), &gate, &metrics, model, "rule")
        })
    };
    let exec = Arc::new(rules::engine::Executor::new(
        engine.clone(),
        commands.clone(),
        refresh_fn,
        metrics.clone(),
    ));
    let mut filters = router::subscriptions(&engine.current(), &config.actuator_base);
    if config.zigbee2mqtt.enabled {
        // `<base>/+/availability` covers every actuator's: drop the exact ones, so no
        // broker delivers a message twice through overlapping subscriptions.
        let any = format!("{}/+/availability", config.actuator_base);
        filters.retain(|f| !(f.starts_with(&config.actuator_base) && f.ends_with("/availability")));
        filters.extend(zigbee::subscriptions(&config.actuator_base));
        debug_assert!(filters.contains(&any));
    }
    if let Some(h) = ha {
        filters.push(h.status_topic());
        filters.push(discovery::button_topic("+"));
    }
    let filters = Arc::new(std::sync::Mutex::new(filters));
    exec.set_subscriber(sub_client.clone(), filters.clone());
    let router = Router {
        exec: exec.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        commands,
        actuator_base: config.actuator_base.clone(),
        refresh: refresh_target.clone(),
        refresh_guard,
        refresh_gate,
        zigbee: config.zigbee2mqtt.enabled,
        get_state: config
            .zigbee2mqtt
            .get_state_on_online
            .then(|| publisher.clone()),
        ha_status: ha.map(HomeAssistantConfig::status_topic),
        discovery: kicker.clone(),
    };
    let (sub_ready_tx, sub_ready) = oneshot::channel();
    let sub_task = tokio::spawn(subscriber_loop(
        sub_conn,
        sub_client,
        router,
        filters,
        shutdown_rx.clone(),
        Some(sub_ready_tx),
    ));

    let mut tasks: Vec<(&'static str, JoinHandle<()>)> = vec![
        ("mqtt subscriber", sub_task),
        ("command delivery", cmd_task),
        (
            "rules timers",
            tokio::spawn(rules_timers(
                exec.clone(),
                config.rules_engine.reload_secs,
                shutdown_rx.clone(),
            )),
        ),
        (
            "registry flusher",
            tokio::spawn(flush_registry(registry.clone(), shutdown_rx.clone())),
        ),
    ];
    if let Some(t) = discovery_task {
        tasks.push(("home assistant discovery", t));
    }
    let both_ready = async {
        let (a, b, c) = tokio::join!(pub_ready, sub_ready, cmd_ready);
        a.is_ok() && b.is_ok() && c.is_ok()
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
        let why = sub_status
            .last_error()
            .or_else(|| pub_status.last_error())
            .or_else(|| cmd_status.last_error())
            .unwrap_or_else(|| "no answer".into());
        return Err(Error::Broker(format!(
            "cannot connect and subscribe to the MQTT broker at {public_url} within {connect_timeout:?}: {why}"
        )));
    }

    let status = http::Status {
        metrics: metrics.clone(),
        registry: registry.clone(),
        engine: Some(engine.clone()),
        links: vec![
            ("subscriber", sub_status),
            ("publisher", pub_status),
            ("commands", cmd_status),
        ],
        broker_running: broker
            .clone()
            .map(|b| Arc::new(move || b.is_running()) as Arc<dyn Fn() -> bool + Send + Sync>),
        discovery: kicker.clone(),
        aggregator: aggregator
            .as_ref()
            .map(|a| a.coordinator().metrics().clone()),
    };
    if let Some(l) = metrics_listener {
        tasks.push((
            "status endpoint",
            tokio::spawn(http::serve(l, status.clone(), shutdown_rx.clone())),
        ));
    }
    if let Some(t) = refresh_target {
        tasks.push((
            "federation follower",
            tokio::spawn(federation::follow(
                t.url,
                t.ca_pem,
                t.token,
                config.follow_models.clone(),
                publisher.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            )),
        ));
    }
    tracing::info!(
        broker = %public_url,
        rules = engine.current().len(),
        metrics = ?metrics_addr,
        coordinator = ?config.coordinator,
        "hub started"
    );
    Ok(HubHandle {
        mqtt_addr,
        mqtt_url: public_url,
        metrics_addr,
        metrics,
        registry,
        engine,
        exec,
        shutdown_tx,
        publisher,
        tasks,
        pub_task,
        broker,
        status,
        credentials,
        actuator_base: config.actuator_base.clone(),
        discovery: kicker,
        discovery_stats,
        aggregator,
    })
}

/// Starts the home aggregator of `[federation.aggregate]`: the coordinator's server in
/// home-aggregator mode on its own port. A bad section or a refused upstream enrolment is a
/// configuration error (exit 64); a port that cannot be bound or an unreachable upstream
/// is unavailable (69).
async fn start_aggregator(config: &Config) -> Result<hearth_coordinator::CoordinatorHandle, Error> {
    let a = &config.federation.aggregate;
    let dir = a.dir(config.state_dir.as_deref());
    std::fs::create_dir_all(&dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The database holds enrolment tokens, the CA key and the upstream identity.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|source| Error::Bind {
            what: "home aggregator",
            addr: a.listen.to_string(),
            source,
        })?;
    let cfg = a.coordinator_config(config.state_dir.as_deref());
    let handle = hearth_coordinator::start(cfg, listener)
        .await
        .map_err(|e| match e {
            hearth_coordinator::Error::Config(e) => {
                Error::Config(format!("federation.aggregate: {e}"))
            }
            hearth_coordinator::Error::Init(m) => {
                Error::Config(format!("federation.aggregate: {m}"))
            }
            e => Error::Coordinator(format!("home aggregator: {e}")),
        })?;
    tracing::info!(
        addr = %handle.local_addr(), models = ?a.models, upstream = %a.upstream,
        ca = %dir.join("pki").join("ca.pem").display(),
        "home aggregator serving the home's agents"
    );
    Ok(handle)
}

/// Writes the registry's changes every [`registry::FLUSH_INTERVAL`].
async fn flush_registry(registry: Arc<Registry>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(registry::FLUSH_INTERVAL);
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            _ = tick.tick() => {}
        }
        let r = registry.clone();
        // sled writes are blocking file work: off the async threads.
        let _ = tokio::task::spawn_blocking(move || r.flush()).await;
    }
}

/// Runs the hub: configuration check, binding (broker, status endpoint), connecting, then
/// serving until `shutdown` completes; then stops gracefully (each step bounded). Errors
/// before serving say whether the configuration ([`Error::Config`], [`Error::Rules`]) or a
/// resource (anything else) is at fault.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let hub = start(config).await?;
    shutdown.await;
    hub.shutdown().await;
    Ok(())
}
