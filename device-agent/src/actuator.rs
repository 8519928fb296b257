//! A virtual Zigbee2MQTT-style switch: commands on `<base>/<name>/set`
//! (`{"state":"ON"|"OFF"|"TOGGLE"}`), state retained on `<base>/<name>`,
//! availability on `<base>/<name>/availability` (last will `offline`), and Home
//! Assistant MQTT discovery, re-announced when HA comes `online`.
//!
//! Delivery: the switch uses a persistent session (`clean_session = false`, stable client
//! id `hearth-actuator-<name>`), so a broker that keeps sessions (Mosquitto) queues its
//! commands while it is away. A command may carry an id, `"hearth_id":"…"` (the hub adds
//! one to every command it sends); the switch remembers the last [`IDEMPOTENCY_WINDOW`]
//! ids and applies a redelivered command once (counted in
//! [`ActuatorStats::commands_duplicate`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_edge::Connection;
use hearth_proto::mqtt::valid_name;
use rumqttc::{AsyncClient, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::mqtt;
use crate::stats::add;
use crate::Error;

/// Home Assistant's birth/last-will topic.
pub const HA_STATUS_TOPIC: &str = "homeassistant/status";
/// Largest command payload considered.
pub const MAX_COMMAND_BYTES: usize = 256;
/// How many command ids the switch remembers to recognise a redelivery.
pub const IDEMPOTENCY_WINDOW: usize = 4096;
/// Longest accepted command id.
pub const MAX_ID_BYTES: usize = 64;
const QUEUE: usize = 256;
const OFFLINE_LIMIT: Duration = Duration::from_secs(3);

/// Configuration of one virtual switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActuatorConfig {
    /// Friendly name: one topic level (`[A-Za-z0-9_-]`).
    pub name: String,
    /// Topic base, `zigbee2mqtt` like Zigbee2MQTT.
    pub base: String,
    /// Broker URL, `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (with `ca_file`).
    pub mqtt: String,
    /// PEM file of the CA trusted for an `mqtts://` broker.
    pub ca_file: Option<std::path::PathBuf>,
    /// File holding the MQTT password of the URL's user (`hearth-hub provision-device
    /// <name> --role actuator`).
    pub password_file: Option<std::path::PathBuf>,
    /// MQTT client id (default `hearth-actuator-<name>`).
    pub client_id: Option<String>,
    /// Home Assistant discovery prefix.
    pub discovery_prefix: String,
    /// Persistent MQTT session (`clean_session = false`): a broker that keeps sessions
    /// queues the switch's commands while it is away.
    pub persistent_session: bool,
}

impl Default for ActuatorConfig {
    fn default() -> Self {
        ActuatorConfig {
            name: "switch".into(),
            base: "zigbee2mqtt".into(),
            mqtt: "mqtt://127.0.0.1:1883".into(),
            ca_file: None,
            password_file: None,
            client_id: None,
            discovery_prefix: "homeassistant".into(),
            persistent_session: true,
        }
    }
}

fn topic_prefix_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.ends_with('/')
        && !s.contains(['+', '#', '\0'])
        && s.split('/').all(|l| !l.is_empty())
}

impl ActuatorConfig {
    /// A switch called `name` with the other fields defaulted.
    pub fn new(name: &str, mqtt: &str) -> ActuatorConfig {
        ActuatorConfig {
            name: name.into(),
            mqtt: mqtt.into(),
            ..ActuatorConfig::default()
        }
    }

    /// Checks the name, base, prefix and broker URL.
    pub fn validate(&self) -> Result<(), Error> {
        if !valid_name(&self.name) {
            return Err(Error::Config(format!(
                "actuator name `{}`: use 1-64 characters of [A-Za-z0-9_-]",
                self.name
            )));
        }
        if !topic_prefix_ok(&self.base) || !topic_prefix_ok(&self.discovery_prefix) {
            return Err(Error::Config(format!(
                "base `{}` / discovery prefix `{}`: topic levels without wildcards",
                self.base, self.discovery_prefix
            )));
        }
        mqtt::settings(
            &self.mqtt,
            self.ca_file.as_deref(),
            "check",
            &self.availability_topic(),
        )?
        .password_file(self.password_file.clone())
        .check()?;
        Ok(())
    }

    /// `<base>/<name>`: the retained state.
    pub fn state_topic(&self) -> String {
        format!("{}/{}", self.base, self.name)
    }
    /// `<base>/<name>/set`: commands.
    pub fn command_topic(&self) -> String {
        format!("{}/{}/set", self.base, self.name)
    }
    /// `<base>/<name>/availability`.
    pub fn availability_topic(&self) -> String {
        format!("{}/{}/availability", self.base, self.name)
    }
    /// `homeassistant/switch/hearth/<name>/config`.
    pub fn discovery_topic(&self) -> String {
        format!(
            "{}/switch/hearth/{}/config",
            self.discovery_prefix, self.name
        )
    }

    /// The Home Assistant discovery document for this switch.
    pub fn discovery_config(&self) -> serde_json::Value {
        serde_json::json!({
            "name": null,
            "unique_id": format!("hearth_{}", self.name),
            "object_id": self.name,
            "command_topic": self.command_topic(),
            "state_topic": self.state_topic(),
            "value_template": "{{ value_json.state }}",
            "payload_on": "{\"state\":\"ON\"}",
            "payload_off": "{\"state\":\"OFF\"}",
            "state_on": "ON",
            "state_off": "OFF",
            "availability": [{ "topic": self.availability_topic() }],
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": {
                "identifiers": [format!("hearth_{}", self.name)],
                "name": self.name,
                "manufacturer": "Hearth",
                "model": "Virtual switch",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
        })
    }
}

/// A switch command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    On,
    Off,
    Toggle,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandBody {
    state: String,
    #[serde(default)]
    hearth_id: Option<String>,
}

/// Parses `{"state":"ON"|"OFF"|"TOGGLE"}` (case-insensitive values); anything
/// else (other fields, other values, non-JSON, oversized) is refused. An optional
/// `"hearth_id"` is accepted and ignored here (see [`parse_command_with_id`]).
pub fn parse_command(payload: &[u8]) -> Option<Command> {
    parse_command_with_id(payload).map(|(c, _)| c)
}

/// [`parse_command`], with the command's `"hearth_id"` (1-64 printable ASCII characters)
/// when it carries one.
pub fn parse_command_with_id(payload: &[u8]) -> Option<(Command, Option<String>)> {
    if payload.len() > MAX_COMMAND_BYTES {
        return None;
    }
    let body: CommandBody = serde_json::from_slice(payload).ok()?;
    if let Some(id) = &body.hearth_id {
        if id.is_empty() || id.len() > MAX_ID_BYTES || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
    }
    let c = match body.state.to_ascii_uppercase().as_str() {
        "ON" => Command::On,
        "OFF" => Command::Off,
        "TOGGLE" => Command::Toggle,
        _ => return None,
    };
    Some((c, body.hearth_id))
}

/// The ids of the last `cap` commands applied: a redelivered command (same id) is
/// recognised and applied once.
#[derive(Debug)]
pub struct IdempotencyWindow {
    cap: usize,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl IdempotencyWindow {
    /// A window remembering `cap` ids (at least one).
    pub fn new(cap: usize) -> IdempotencyWindow {
        IdempotencyWindow {
            cap: cap.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `id`; false when it is already in the window (a redelivery). The oldest
    /// id leaves the window once `cap` are held.
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }

    /// The remembered ids, oldest first.
    pub fn ids(&self) -> Vec<String> {
        self.order.iter().cloned().collect()
    }
}

/// State payload `{"state":"ON"}` / `{"state":"OFF"}`.
pub fn state_payload(on: bool) -> String {
    format!("{{\"state\":\"{}\"}}", if on { "ON" } else { "OFF" })
}

/// Live counters and state of a switch.
#[derive(Debug)]
pub struct ActuatorStats {
    /// Messages received on the command topic.
    pub commands_received: AtomicU64,
    /// Commands applied (state published).
    pub commands_applied: AtomicU64,
    /// Commands refused (bad payload, or the queue was full).
    pub commands_refused: AtomicU64,
    /// Redelivered commands (an id already applied) ignored by the idempotency window.
    pub commands_duplicate: AtomicU64,
    /// Home Assistant discovery announcements sent.
    pub discovery_announcements: AtomicU64,
    /// Current state.
    pub on: AtomicBool,
    /// Ids of the last commands applied (the idempotency window).
    applied: Mutex<IdempotencyWindow>,
}

impl Default for ActuatorStats {
    fn default() -> Self {
        ActuatorStats {
            commands_received: AtomicU64::new(0),
            commands_applied: AtomicU64::new(0),
            commands_refused: AtomicU64::new(0),
            commands_duplicate: AtomicU64::new(0),
            discovery_announcements: AtomicU64::new(0),
            on: AtomicBool::new(false),
            applied: Mutex::new(IdempotencyWindow::new(IDEMPOTENCY_WINDOW)),
        }
    }
}

impl ActuatorStats {
    /// Ids of the last [`IDEMPOTENCY_WINDOW`] commands applied, oldest first.
    pub fn applied_ids(&self) -> Vec<String> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).ids()
    }

    /// Records `id` as applied; false if it already was (a redelivery).
    fn first_time(&self, id: &str) -> bool {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_time(id)
    }

    /// `"ON"` or `"OFF"`.
    pub fn state(&self) -> &'static str {
        if self.on.load(Ordering::SeqCst) {
            "ON"
        } else {
            "OFF"
        }
    }
}

enum Work {
    Command(Vec<u8>),
    Announce,
}

/// A running switch.
pub struct ActuatorHandle {
    stats: Arc<ActuatorStats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ActuatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActuatorHandle")
            .field("stats", &self.stats)
            .finish()
    }
}

impl ActuatorHandle {
    /// Live counters and state.
    pub fn stats(&self) -> Arc<ActuatorStats> {
        self.stats.clone()
    }

    /// Publishes `offline` (retained), disconnects and stops, within a time limit.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            match tokio::time::timeout(OFFLINE_LIMIT * 2, t).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::Task(e.to_string())),
                Err(_) => return Err(Error::Task("actuator did not stop in time".into())),
            }
        }
        if let Some(w) = self.worker.take() {
            w.abort();
        }
        Ok(())
    }
}

impl Drop for ActuatorHandle {
    fn drop(&mut self) {
        for t in [self.task.take(), self.worker.take()].into_iter().flatten() {
            t.abort();
        }
    }
}

/// Starts a virtual switch (initially OFF).
pub async fn start_actuator(cfg: ActuatorConfig) -> Result<ActuatorHandle, Error> {
    cfg.validate()?;
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("hearth-actuator-{}", cfg.name));
    let (client, eventloop) = mqtt::settings(
        &cfg.mqtt,
        cfg.ca_file.as_deref(),
        &client_id,
        &cfg.availability_topic(),
    )?
    .persistent_session(cfg.persistent_session)
    .password_file(cfg.password_file.clone())
    .connect()?;
    let conn = Connection::new(eventloop, format!("actuator {}", cfg.name));
    let stats = Arc::new(ActuatorStats::default());
    let cfg = Arc::new(cfg);
    let (work_tx, work_rx) = mpsc::channel(QUEUE);
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = tokio::spawn(worker(cfg.clone(), client.clone(), stats.clone(), work_rx));
    let task = tokio::spawn(event_loop(
        cfg,
        client,
        conn,
        stats.clone(),
        work_tx,
        stop_rx,
    ));
    Ok(ActuatorHandle {
        stats,
        stop: Some(stop_tx),
        task: Some(task),
        worker: Some(worker),
    })
}

/// Runs a virtual switch until `shutdown` resolves.
pub async fn run_actuator(
    cfg: ActuatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let h = start_actuator(cfg).await?;
    shutdown.await;
    h.shutdown().await
}

async fn event_loop(
    cfg: Arc<ActuatorConfig>,
    client: AsyncClient,
    mut conn: Connection,
    stats: Arc<ActuatorStats>,
    work: mpsc::Sender<Work>,
    mut stop: oneshot::Receiver<()>,
) {
    let command_topic = cfg.command_topic();
    while let Some(ev) = conn.poll_until(&mut stop).await {
        match ev {
            rumqttc::Event::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(name = %cfg.name, "actuator connected");
                // Subscriptions are queued here; the worker publishes the rest.
                for t in [command_topic.as_str(), HA_STATUS_TOPIC] {
                    if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                        tracing::warn!("subscribe {t}: {e}");
                    }
                }
                if work.try_send(Work::Announce).is_err() {
                    tracing::warn!("actuator work queue full; announcement skipped");
                }
            }
            rumqttc::Event::Incoming(Packet::Publish(p)) => {
                if p.topic == command_topic {
                    add(&stats.commands_received, 1);
                    if work.try_send(Work::Command(p.payload.to_vec())).is_err() {
                        add(&stats.commands_refused, 1);
                        tracing::warn!("actuator command queue full; command dropped");
                    }
                } else if p.topic == HA_STATUS_TOPIC && p.payload.as_ref() == b"online" {
                    let _ = work.try_send(Work::Announce);
                }
            }
            _ => {}
        }
    }
    conn.go_offline(&client, &cfg.availability_topic(), OFFLINE_LIMIT)
        .await;
}

/// Applies commands and publishes state/announcements in order.
async fn worker(
    cfg: Arc<ActuatorConfig>,
    client: AsyncClient,
    stats: Arc<ActuatorStats>,
    mut rx: mpsc::Receiver<Work>,
) {
    let state_topic = cfg.state_topic();
    while let Some(w) = rx.recv().await {
        let res = match w {
            Work::Announce => announce(&cfg, &client, &stats).await,
            Work::Command(payload) => match parse_command_with_id(&payload) {
                None => {
                    add(&stats.commands_refused, 1);
                    tracing::warn!(
                        name = %cfg.name,
                        bytes = payload.len(),
                        "refused a malformed command"
                    );
                    Ok(())
                }
                Some((_, Some(id))) if !stats.first_time(&id) => {
                    add(&stats.commands_duplicate, 1);
                    tracing::info!(name = %cfg.name, hearth_id = %id, "redelivered command ignored");
                    Ok(())
                }
                Some((c, id)) => {
                    let on = match c {
                        Command::On => true,
                        Command::Off => false,
                        Command::Toggle => !stats.on.load(Ordering::SeqCst),
                    };
                    stats.on.store(on, Ordering::SeqCst);
                    add(&stats.commands_applied, 1);
                    tracing::info!(
                        name = %cfg.name,
                        state = stats.state(),
                        hearth_id = id.as_deref().unwrap_or("-"),
                        "switched"
                    );
                    client
                        .publish(
                            state_topic.as_str(),
                            QoS::AtLeastOnce,
                            true,
                            state_payload(on),
                        )
                        .await
                        .map_err(Error::from)
                }
            },
        };
        if let Err(e) = res {
            tracing::warn!("actuator publish failed: {e}");
            return;
        }
    }
}

async fn announce(
    cfg: &ActuatorConfig,
    client: &AsyncClient,
    stats: &ActuatorStats,
) -> Result<(), Error> {
    let body = serde_json::to_vec(&cfg.discovery_config()).expect("discovery serialises");
    client
        .publish(cfg.discovery_topic(), QoS::AtLeastOnce, true, body)
        .await?;
    client
        .publish(cfg.availability_topic(), QoS::AtLeastOnce, true, "online")
        .await?;
    let on = stats.on.load(Ordering::SeqCst);
    client
        .publish(cfg.state_topic(), QoS::AtLeastOnce, true, state_payload(on))
        .await?;
    add(&stats.discovery_announcements, 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_strictly() {
        assert_eq!(parse_command(br#"{"state":"ON"}"#), Some(Command::On));
        assert_eq!(parse_command(br#"{"state":"off"}"#), Some(Command::Off));
        assert_eq!(
            parse_command(br#"{"state":"TOGGLE"}"#),
            Some(Command::Toggle)
        );
        for bad in [
            &br#"{"state":"DIM"}"#[..],
            br#"{"state":1}"#,
            br#"{"state":"ON","brightness":3}"#,
            b"ON",
            b"",
            br#"{}"#,
        ] {
            assert_eq!(parse_command(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let big = format!(r#"{{"state":"ON"{}}}"#, " ".repeat(300));
        assert_eq!(parse_command(big.as_bytes()), None);
    }

    #[test]
    fn command_ids() {
        assert_eq!(
            parse_command_with_id(br#"{"state":"ON","hearth_id":"h1-7"}"#),
            Some((Command::On, Some("h1-7".into())))
        );
        assert_eq!(
            parse_command_with_id(br#"{"state":"OFF"}"#),
            Some((Command::Off, None))
        );
        for bad in [
            &br#"{"state":"ON","hearth_id":""}"#[..],
            br#"{"state":"ON","hearth_id":"a b"}"#,
            br#"{"state":"ON","hearth_id":7}"#,
        ] {
            assert_eq!(parse_command_with_id(bad), None);
        }
        let long = format!(r#"{{"state":"ON","hearth_id":"{}"}}"#, "x".repeat(65));
        assert_eq!(parse_command_with_id(long.as_bytes()), None);
    }

    #[test]
    fn idempotency_window_applies_each_id_once_and_forgets_the_oldest() {
        let mut w = IdempotencyWindow::new(3);
        assert!(w.first_time("a"));
        assert!(!w.first_time("a"), "a redelivery is recognised");
        assert!(w.first_time("b") && w.first_time("c"));
        assert!(!w.first_time("b"));
        // A fourth id pushes `a` out of the window.
        assert!(w.first_time("d"));
        assert!(w.first_time("a"));
        assert!(!w.first_time("d") && !w.first_time("c"));
    }

    #[test]
    fn topics_and_discovery() {
        let c = ActuatorConfig::new("porch_light", "mqtt://127.0.0.1:1883");
        c.validate().unwrap();
        assert_eq!(c.state_topic(), "zigbee2mqtt/porch_light");
        assert_eq!(c.command_topic(), "zigbee2mqtt/porch_light/set");
        assert_eq!(
            c.availability_topic(),
            "zigbee2mqtt/porch_light/availability"
        );
        assert_eq!(
            c.discovery_topic(),
            "homeassistant/switch/hearth/porch_light/config"
        );
        let d = c.discovery_config();
        assert_eq!(d["command_topic"], "zigbee2mqtt/porch_light/set");
        assert_eq!(d["value_template"], "{{ value_json.state }}");
        assert_eq!(
            d["availability"][0]["topic"],
            "zigbee2mqtt/porch_light/availability"
        );
        assert_eq!(state_payload(true), r#"{"state":"ON"}"#);
        let mut bad = c.clone();
        bad.base = "z2m/+".into();
        assert!(bad.validate().is_err());
        bad.base = "home/z2m".into();
        bad.validate().unwrap();
        bad.name = "porch light".into();
        assert!(bad.validate().is_err());
    }
}
