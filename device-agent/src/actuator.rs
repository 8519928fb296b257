//! A virtual Zigbee2MQTT device — a switch or a light — that speaks exactly as Zigbee2MQTT
//! does, so whatever drives it drives a real one unchanged:
//!
//! - commands on `<base>/<name>/set`: the fields of a Zigbee2MQTT switch (`state`: `ON`,
//!   `OFF`, `TOGGLE`) or light (also `brightness` 0–254, where 0 switches off and a value on
//!   an off light switches it on; `color_temp` in mireds, clamped to 153–500, or the presets
//!   `coolest`, `cool`, `neutral`, `warm`, `warmest`; `transition` in seconds), plus
//!   Hearth's `hearth_id`. Anything else is refused whole (Zigbee2MQTT would log "No
//!   converter available" and apply the rest; a virtual device has no reason to guess), as
//!   is a known key with a wrong value or a body with none of `state`, `brightness`,
//!   `color_temp`;
//! - state reads on `<base>/<name>/get` (any body, `{"state":""}` by convention): the
//!   state is published again;
//! - state retained on `<base>/<name>`, Zigbee2MQTT's form: `{"state":"ON"}` for a switch,
//!   `{"brightness":254,"color_mode":"color_temp","color_temp":370,"state":"ON"}` for a light;
//! - availability on `<base>/<name>/availability` (last will `offline`), and Home
//!   Assistant MQTT discovery (a `switch`, or a `light` with the JSON schema, which sends
//!   Zigbee2MQTT's own command bodies), re-announced when HA comes `online` on
//!   `<discovery_prefix>/status`.
//!
//! After a restart the device comes back in the state it had: from its state directory
//! when it has one, else from its own retained state on the broker (read for
//! [`RESTORE_WAIT`] before it announces anything).
//!
//! Delivery: the device uses a persistent session (`clean_session = false`, stable client
//! id `hearth-actuator-<name>`), so a broker that keeps sessions (Mosquitto) queues its
//! commands while it is away. A command may carry an id, `"hearth_id":"…"` (the hub adds
//! one to every command it sends); the device remembers the last [`IDEMPOTENCY_WINDOW`]
//! ids and applies a redelivered command once (counted in
//! [`ActuatorStats::commands_duplicate`]). With `state_dir` the window and the state are
//! kept in a journal (`<state_dir>/actuator-<name>.jsonl`, one line appended per applied
//! command *before* its new state is published, compacted by rename), so a command
//! redelivered after the device restarted — the hub re-sends what its broker may have lost —
//! is still applied once. A command is acknowledged (PUBACK) only once it has been decided:
//! applied (journal line written, state set), refused or recognised as a redelivery, so a
//! device killed between receiving and applying a command gets it again from a broker that
//! keeps its session. Manual acks also bound the commands waiting for the worker by the
//! broker's in-flight window; one that still finds the queue full stays unacknowledged
//! (redelivered on the next connection) rather than dropped.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
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

/// Largest command payload considered.
pub const MAX_COMMAND_BYTES: usize = 512;
/// How long a device without a state directory waits for its retained state after its
/// first connection, before it announces itself.
pub const RESTORE_WAIT: Duration = Duration::from_millis(500);
/// Colour temperature range of the virtual light, in mireds (Zigbee2MQTT's usual bounds).
pub const COLOR_TEMP_RANGE: (u16, u16) = (153, 500);
/// Longest accepted `transition`, in seconds.
pub const MAX_TRANSITION_SECS: f64 = 3600.0;
/// How many command ids the switch remembers to recognise a redelivery.
pub const IDEMPOTENCY_WINDOW: usize = 4096;
/// Longest accepted command id.
pub const MAX_ID_BYTES: usize = 64;
const QUEUE: usize = 256;
const OFFLINE_LIMIT: Duration = Duration::from_secs(3);

/// What the virtual device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// On/off only: `{"state":…}`.
    #[default]
    Switch,
    /// On/off, brightness and colour temperature.
    Light,
}

/// Configuration of one virtual switch or light.
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
    /// A switch or a light.
    pub kind: DeviceKind,
    /// Where the state and the command-id window are kept across restarts (memory only
    /// when absent: then the state comes back from the broker's retained message, and the
    /// window starts empty).
    pub state_dir: Option<PathBuf>,
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
            kind: DeviceKind::Switch,
            state_dir: None,
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
    /// `<base>/<name>/get`: state reads.
    pub fn get_topic(&self) -> String {
        format!("{}/{}/get", self.base, self.name)
    }
    /// `<base>/<name>/availability`.
    pub fn availability_topic(&self) -> String {
        format!("{}/{}/availability", self.base, self.name)
    }
    /// `<discovery_prefix>/status`: Home Assistant's birth and last-will topic.
    pub fn ha_status_topic(&self) -> String {
        format!("{}/status", self.discovery_prefix)
    }
    /// `<discovery_prefix>/switch/hearth/<name>/config` (`light` for a light).
    pub fn discovery_topic(&self) -> String {
        let component = match self.kind {
            DeviceKind::Switch => "switch",
            DeviceKind::Light => "light",
        };
        format!(
            "{}/{component}/hearth/{}/config",
            self.discovery_prefix, self.name
        )
    }
    /// The journal in the state directory.
    pub fn journal_path(&self) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join(format!("actuator-{}.jsonl", self.name)))
    }

    /// The Home Assistant discovery document for this device.
    pub fn discovery_config(&self) -> serde_json::Value {
        if self.kind == DeviceKind::Light {
            let (min, max) = COLOR_TEMP_RANGE;
            return serde_json::json!({
                "name": null,
                "unique_id": format!("hearth_{}", self.name),
                "schema": "json",
                "command_topic": self.command_topic(),
                "state_topic": self.state_topic(),
                "brightness": true,
                "brightness_scale": 254,
                "supported_color_modes": ["color_temp"],
                "min_mireds": min,
                "max_mireds": max,
                "availability": [{ "topic": self.availability_topic() }],
                "payload_available": "online",
                "payload_not_available": "offline",
                "qos": 1,
                "device": {
                    "identifiers": [format!("hearth_{}", self.name)],
                    "name": self.name,
                    "manufacturer": "Hearth",
                    "model": "Virtual light",
                    "sw_version": env!("CARGO_PKG_VERSION"),
                },
            });
        }
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

/// A switch command (the `state` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    On,
    Off,
    Toggle,
}

/// A parsed `/set` body: the fields a Zigbee2MQTT switch or light accepts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SetCommand {
    pub state: Option<Command>,
    /// 0–254.
    pub brightness: Option<u8>,
    /// Mireds, clamped to [`COLOR_TEMP_RANGE`].
    pub color_temp: Option<u16>,
    /// Seconds (accepted; the virtual device changes at once).
    pub transition: Option<f64>,
}

/// The device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub on: bool,
    /// 1–254 (kept while off).
    pub brightness: u8,
    /// Mireds.
    pub color_temp: u16,
}

impl Default for DeviceState {
    fn default() -> Self {
        DeviceState {
            on: false,
            brightness: 254,
            color_temp: 370,
        }
    }
}

impl DeviceState {
    /// The state after `c`; `None` when `c` changes nothing this kind of device has (a
    /// brightness sent to a switch: Zigbee2MQTT has no converter for it either).
    pub fn apply(self, kind: DeviceKind, c: &SetCommand) -> Option<DeviceState> {
        let mut s = self;
        let light = kind == DeviceKind::Light;
        let mut touched = false;
        if let Some(b) = c.brightness.filter(|_| light) {
            touched = true;
            if b == 0 {
                s.on = false;
            } else {
                s.brightness = b;
                s.on = true;
            }
        }
        if let Some(t) = c.color_temp.filter(|_| light) {
            touched = true;
            s.color_temp = t;
        }
        if let Some(st) = c.state {
            touched = true;
            s.on = match st {
                Command::On => true,
                Command::Off => false,
                Command::Toggle => !self.on,
            };
        }
        touched.then_some(s)
    }

    /// The state payload, as Zigbee2MQTT publishes it (keys sorted).
    pub fn to_json(self, kind: DeviceKind) -> String {
        let state = if self.on { "ON" } else { "OFF" };
        match kind {
            DeviceKind::Switch => state_payload(self.on),
            DeviceKind::Light => serde_json::json!({
                "brightness": self.brightness,
                "color_mode": "color_temp",
                "color_temp": self.color_temp,
                "state": state,
            })
            .to_string(),
        }
    }

    /// Reads a state payload (a retained `<base>/<name>`); fields missing keep `self`'s.
    pub fn parse(self, payload: &[u8]) -> Option<DeviceState> {
        if payload.len() > MAX_COMMAND_BYTES {
            return None;
        }
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(payload).ok()?;
        let mut s = self;
        s.on = match v.get("state")?.as_str()? {
            "ON" => true,
            "OFF" => false,
            _ => return None,
        };
        if let Some(b) = v.get("brightness").and_then(|b| b.as_u64()) {
            s.brightness = b.clamp(1, 254) as u8;
        }
        if let Some(t) = v.get("color_temp").and_then(|t| t.as_u64()) {
            s.color_temp = clamp_mireds(t as f64);
        }
        Some(s)
    }
}

fn clamp_mireds(m: f64) -> u16 {
    m.round()
        .clamp(COLOR_TEMP_RANGE.0 as f64, COLOR_TEMP_RANGE.1 as f64) as u16
}

/// Parses a `/set` body with its optional `"hearth_id"` (1-64 printable ASCII characters).
/// `None` for anything refused: not a JSON object, oversized, a known key with a wrong value,
/// an unknown key, or none of `state`, `brightness`, `color_temp`.
pub fn parse_set(payload: &[u8]) -> Option<(SetCommand, Option<String>)> {
    use serde_json::Value;
    if payload.len() > MAX_COMMAND_BYTES {
        return None;
    }
    let body: serde_json::Map<String, Value> = serde_json::from_slice(payload).ok()?;
    let mut c = SetCommand::default();
    let mut id = None;
    for (k, v) in body {
        match k.as_str() {
            "state" => {
                c.state = Some(match v.as_str()?.to_ascii_uppercase().as_str() {
                    "ON" => Command::On,
                    "OFF" => Command::Off,
                    "TOGGLE" => Command::Toggle,
                    _ => return None,
                })
            }
            "brightness" => {
                c.brightness = Some(u8::try_from(v.as_u64()?).ok().filter(|b| *b <= 254)?)
            }
            "color_temp" => {
                c.color_temp = Some(match &v {
                    Value::Number(n) => {
                        let m = n.as_f64()?;
                        if !(1.0..=10_000.0).contains(&m) {
                            return None;
                        }
                        clamp_mireds(m)
                    }
                    Value::String(p) => match p.as_str() {
                        "coolest" => 153,
                        "cool" => 250,
                        "neutral" => 370,
                        "warm" => 454,
                        "warmest" => 500,
                        _ => return None,
                    },
                    _ => return None,
                })
            }
            "transition" => {
                let t = v.as_f64()?;
                if !(0.0..=MAX_TRANSITION_SECS).contains(&t) {
                    return None;
                }
                c.transition = Some(t);
            }
            "hearth_id" => {
                let s = v.as_str()?;
                if s.is_empty()
                    || s.len() > MAX_ID_BYTES
                    || !s.bytes().all(|b| b.is_ascii_graphic())
                {
                    return None;
                }
                id = Some(s.to_string());
            }
            _ => return None,
        }
    }
    if c.state.is_none() && c.brightness.is_none() && c.color_temp.is_none() {
        return None;
    }
    Some((c, id))
}

/// Parses a switch command: `{"state":"ON"|"OFF"|"TOGGLE"}` (case-insensitive values),
/// with any other field refused. An optional `"hearth_id"` is accepted and ignored here.
pub fn parse_command(payload: &[u8]) -> Option<Command> {
    parse_command_with_id(payload).map(|(c, _)| c)
}

/// [`parse_command`], with the command's `"hearth_id"` when it carries one.
pub fn parse_command_with_id(payload: &[u8]) -> Option<(Command, Option<String>)> {
    match parse_set(payload)? {
        (
            SetCommand {
                state: Some(c),
                brightness: None,
                color_temp: None,
                transition: None,
            },
            id,
        ) => Some((c, id)),
        _ => None,
    }
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

    /// Whether `id` is in the window.
    pub fn contains(&self, id: &str) -> bool {
        self.seen.contains(id)
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

/// One journal line: a command applied (its id, if any) and the state it left.
#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    state: DeviceState,
}

/// The state directory's journal: the command-id window and the state, kept across
/// restarts (appended with one write per command, compacted by rename).
#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl Journal {
    /// Opens the journal (creating the directory 0700): the window and state it holds.
    fn open(path: &Path) -> Result<(Journal, IdempotencyWindow, Option<DeviceState>), Error> {
        let io = |what: &str, e: std::io::Error| {
            Error::Config(format!("actuator state {}: {what}: {e}", path.display()))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("cannot create the directory", e))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        let mut window = IdempotencyWindow::new(IDEMPOTENCY_WINDOW);
        let mut state = None;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(|e| io("read", e))?;
                    // A torn last line (killed mid-write) is skipped.
                    if let Ok(l) = serde_json::from_str::<JournalLine>(&line) {
                        if let Some(id) = l.id {
                            window.first_time(&id);
                        }
                        state = Some(l.state);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("open", e)),
        }
        let mut j = Journal {
            path: path.to_path_buf(),
            file: File::create(path.with_extension("tmp")).map_err(|e| io("create", e))?,
            lines: 0,
        };
        j.compact(&window, state.unwrap_or_default())
            .map_err(|e| io("compact", e))?;
        Ok((j, window, state))
    }

    /// Rewrites the journal with the window and `state` (temporary file, fsync, rename).
    fn compact(&mut self, window: &IdempotencyWindow, state: DeviceState) -> std::io::Result<()> {
        let mut text = String::new();
        let ids = window.ids();
        for id in &ids {
            let l = JournalLine {
                id: Some(id.clone()),
                state,
            };
            text.push_str(&serde_json::to_string(&l).expect("journal line"));
            text.push('\n');
        }
        if ids.is_empty() {
            text.push_str(&serde_json::to_string(&JournalLine { id: None, state }).expect("line"));
            text.push('\n');
        }
        hearth_edge::fsutil::write_atomic(
            &self.path,
            text.as_bytes(),
            hearth_edge::fsutil::PRIVATE,
        )?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = ids.len().max(1);
        Ok(())
    }

    /// Appends one applied command (one `write`: in the page cache at once, so a SIGKILL
    /// loses nothing written).
    fn append(&mut self, id: Option<&str>, state: DeviceState, window: &IdempotencyWindow) {
        let l = JournalLine {
            id: id.map(str::to_string),
            state,
        };
        let mut line = serde_json::to_string(&l).expect("journal line");
        line.push('\n');
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            tracing::error!(file = %self.path.display(), "cannot write the actuator journal: {e}");
            return;
        }
        self.lines += 1;
        if self.lines > 2 * IDEMPOTENCY_WINDOW {
            if let Err(e) = self.compact(window, state) {
                tracing::error!(file = %self.path.display(), "cannot compact the actuator journal: {e}");
            }
        }
    }
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
    /// State reads answered (`/get`).
    pub state_reads: AtomicU64,
    /// Home Assistant discovery announcements sent.
    pub discovery_announcements: AtomicU64,
    /// Whether the state came back after a restart (from the state directory or the
    /// broker's retained state).
    pub restored: AtomicBool,
    /// Current on/off state.
    pub on: AtomicBool,
    state: Mutex<DeviceState>,
    /// Ids of the last commands applied (the idempotency window).
    applied: Mutex<IdempotencyWindow>,
    /// Ids applied by this run (tests compare runs).
    applied_here: Mutex<Vec<String>>,
}

impl Default for ActuatorStats {
    fn default() -> Self {
        ActuatorStats {
            commands_received: AtomicU64::new(0),
            commands_applied: AtomicU64::new(0),
            commands_refused: AtomicU64::new(0),
            commands_duplicate: AtomicU64::new(0),
            state_reads: AtomicU64::new(0),
            discovery_announcements: AtomicU64::new(0),
            restored: AtomicBool::new(false),
            on: AtomicBool::new(false),
            state: Mutex::new(DeviceState::default()),
            applied: Mutex::new(IdempotencyWindow::new(IDEMPOTENCY_WINDOW)),
            applied_here: Mutex::new(Vec::new()),
        }
    }
}

impl ActuatorStats {
    /// Ids of the commands this run applied, in order (at most [`IDEMPOTENCY_WINDOW`]).
    pub fn applied_ids(&self) -> Vec<String> {
        self.applied_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `"ON"` or `"OFF"`.
    pub fn state(&self) -> &'static str {
        if self.on.load(Ordering::SeqCst) {
            "ON"
        } else {
            "OFF"
        }
    }

    /// The full state (brightness and colour temperature too).
    pub fn device_state(&self) -> DeviceState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, s: DeviceState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.on.store(s.on, Ordering::SeqCst);
    }
}

enum Work {
    /// A command, acknowledged by the worker once decided.
    Command(rumqttc::Publish),
    Announce,
    /// Our retained state, read back from the broker after a restart.
    Restore(Vec<u8>),
    Get,
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

/// Starts a virtual switch or light (initially OFF, or as it was before a restart).
pub async fn start_actuator(cfg: ActuatorConfig) -> Result<ActuatorHandle, Error> {
    cfg.validate()?;
    let stats = Arc::new(ActuatorStats::default());
    let journal = match cfg.journal_path() {
        Some(p) => {
            let (j, window, state) = tokio::task::spawn_blocking(move || Journal::open(&p))
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
            *stats.applied.lock().unwrap_or_else(|p| p.into_inner()) = window;
            if let Some(s) = state {
                stats.set_state(s);
                stats.restored.store(true, Ordering::SeqCst);
            }
            Some(j)
        }
        None => None,
    };
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("hearth-actuator-{}", cfg.name));
    let settings = mqtt::settings(
        &cfg.mqtt,
        cfg.ca_file.as_deref(),
        &client_id,
        &cfg.availability_topic(),
    )?
    .persistent_session(cfg.persistent_session)
    .password_file(cfg.password_file.clone());
    let mut options = settings.options()?;
    // Commands are acknowledged by the worker once applied (see the module documentation).
    options.set_manual_acks(true);
    let (client, eventloop) = AsyncClient::new(options, settings.request_capacity);
    let conn = Connection::new(eventloop, format!("actuator {}", cfg.name));
    let cfg = Arc::new(cfg);
    let (work_tx, work_rx) = mpsc::channel(QUEUE);
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = tokio::spawn(worker(
        cfg.clone(),
        client.clone(),
        stats.clone(),
        work_rx,
        journal,
    ));
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
    let get_topic = cfg.get_topic();
    let state_topic = cfg.state_topic();
    let ha_status = cfg.ha_status_topic();
    let mut first = true;
    while let Some(ev) = conn.poll_until(&mut stop).await {
        match ev {
            rumqttc::Event::Incoming(Packet::ConnAck(_)) => {
                tracing::info!(name = %cfg.name, "actuator connected");
                // Subscriptions are queued here; the worker publishes the rest.
                let mut topics = vec![command_topic.as_str(), get_topic.as_str(), &ha_status];
                let restore = first && !stats.restored.load(Ordering::SeqCst);
                if restore {
                    // Read our own retained state before announcing anything.
                    topics.push(state_topic.as_str());
                }
                for t in topics {
                    if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                        tracing::warn!("subscribe {t}: {e}");
                    }
                }
                if restore {
                    let (work, client, topic) = (work.clone(), client.clone(), state_topic.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(RESTORE_WAIT).await;
                        let _ = client.unsubscribe(topic).await;
                        let _ = work.send(Work::Announce).await;
                    });
                } else if work.try_send(Work::Announce).is_err() {
                    tracing::warn!("actuator work queue full; announcement skipped");
                }
                first = false;
            }
            rumqttc::Event::Incoming(Packet::Publish(p)) => {
                if p.topic == command_topic {
                    add(&stats.commands_received, 1);
                    if work.try_send(Work::Command(p)).is_err() {
                        add(&stats.commands_refused, 1);
                        tracing::warn!(
                            "actuator command queue full; command left unacknowledged (the \
                             broker sends it again on the next connection)"
                        );
                    }
                    continue;
                }
                // Everything else is acknowledged at once.
                if let Err(e) = client.try_ack(&p) {
                    tracing::warn!("ack: {e}");
                }
                if p.topic == get_topic {
                    let _ = work.try_send(Work::Get);
                } else if p.topic == state_topic && p.retain {
                    let _ = work.try_send(Work::Restore(p.payload.to_vec()));
                } else if p.topic == ha_status && p.payload.as_ref() == b"online" {
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
    mut journal: Option<Journal>,
) {
    let state_topic = cfg.state_topic();
    // A retained state is taken only before the first announcement, and only when the
    // state directory had none.
    let mut restorable = !stats.restored.load(Ordering::SeqCst);
    while let Some(w) = rx.recv().await {
        let res = match w {
            Work::Announce => {
                restorable = false;
                announce(&cfg, &client, &stats).await
            }
            Work::Restore(payload) => {
                if restorable {
                    if let Some(s) = stats.device_state().parse(&payload) {
                        stats.set_state(s);
                        stats.restored.store(true, Ordering::SeqCst);
                        tracing::info!(name = %cfg.name, state = %s.to_json(cfg.kind), "state restored from the broker");
                    }
                }
                Ok(())
            }
            Work::Get => {
                add(&stats.state_reads, 1);
                let s = stats.device_state().to_json(cfg.kind);
                client
                    .publish(state_topic.as_str(), QoS::AtLeastOnce, true, s)
                    .await
                    .map_err(Error::from)
            }
            Work::Command(publish) => {
                let payload = &publish.payload;
                let parsed = parse_set(payload);
                let applied = parsed
                    .as_ref()
                    .and_then(|(c, _)| stats.device_state().apply(cfg.kind, c));
                let decided = match (parsed, applied) {
                    (None, _) | (_, None) => {
                        add(&stats.commands_refused, 1);
                        tracing::warn!(
                            name = %cfg.name,
                            bytes = payload.len(),
                            "refused a malformed command"
                        );
                        Ok(())
                    }
                    (Some((_, Some(id))), _)
                        if stats
                            .applied
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .contains(&id) =>
                    {
                        add(&stats.commands_duplicate, 1);
                        tracing::info!(name = %cfg.name, hearth_id = %id, "redelivered command ignored");
                        Ok(())
                    }
                    (Some((c, id)), Some(new)) => {
                        restorable = false;
                        {
                            let mut w = stats.applied.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(id) = &id {
                                w.first_time(id);
                                let mut here =
                                    stats.applied_here.lock().unwrap_or_else(|p| p.into_inner());
                                if here.len() >= IDEMPOTENCY_WINDOW {
                                    here.remove(0);
                                }
                                here.push(id.clone());
                            }
                            // On disk before anyone can see the new state.
                            if let Some(j) = &mut journal {
                                j.append(id.as_deref(), new, &w);
                            }
                        }
                        stats.set_state(new);
                        add(&stats.commands_applied, 1);
                        tracing::info!(
                            name = %cfg.name,
                            state = stats.state(),
                            transition = c.transition.unwrap_or(0.0),
                            hearth_id = id.as_deref().unwrap_or("-"),
                            "switched"
                        );
                        client
                            .publish(
                                state_topic.as_str(),
                                QoS::AtLeastOnce,
                                true,
                                new.to_json(cfg.kind),
                            )
                            .await
                            .map_err(Error::from)
                    }
                };
                // Decided (applied, refused or a redelivery): only now acknowledged.
                let acked = client.ack(&publish).await.map_err(Error::from);
                decided.and(acked)
            }
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
    client
        .publish(
            cfg.state_topic(),
            QoS::AtLeastOnce,
            true,
            stats.device_state().to_json(cfg.kind),
        )
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
        let big = format!(r#"{{"state":"ON"{}}}"#, " ".repeat(600));
        assert_eq!(parse_command(big.as_bytes()), None);
    }

    #[test]
    fn zigbee2mqtt_light_and_switch_fields() {
        let set = |b: &str| parse_set(b.as_bytes()).map(|(c, _)| c);
        let c = set(r#"{"state":"ON","brightness":128,"color_temp":"warmest","transition":1.5}"#)
            .unwrap();
        assert_eq!(
            (c.state, c.brightness, c.color_temp, c.transition),
            (Some(Command::On), Some(128), Some(500), Some(1.5))
        );
        assert_eq!(set(r#"{"color_temp":90}"#).unwrap().color_temp, Some(153));
        assert_eq!(
            set(r#"{"color_temp":370.4}"#).unwrap().color_temp,
            Some(370)
        );
        for bad in [
            r#"{"state":"off","linkquality":3}"#,
            r#"{"brightness":255}"#,
            r#"{"brightness":-1}"#,
            r#"{"brightness":"x"}"#,
            r#"{"color_temp":"hot"}"#,
            r#"{"state":"ON","transition":-1}"#,
            r#"{"linkquality":3}"#,
            r#"{"transition":2}"#,
            "[]",
        ] {
            assert_eq!(set(bad), None, "{bad}");
        }
        let off = DeviceState::default();
        let light = DeviceKind::Light;
        // Brightness on an off light switches it on; 0 switches off and keeps the level.
        let s = off
            .apply(light, &set(r#"{"brightness":100}"#).unwrap())
            .unwrap();
        assert!(s.on && s.brightness == 100);
        let s = s
            .apply(light, &set(r#"{"brightness":0}"#).unwrap())
            .unwrap();
        assert!(!s.on && s.brightness == 100);
        let s = s
            .apply(light, &set(r#"{"state":"TOGGLE"}"#).unwrap())
            .unwrap();
        assert!(s.on);
        assert_eq!(
            s.to_json(light),
            r#"{"brightness":100,"color_mode":"color_temp","color_temp":370,"state":"ON"}"#
        );
        assert_eq!(s.to_json(DeviceKind::Switch), r#"{"state":"ON"}"#);
        // A switch has no brightness converter: a brightness-only command changes nothing.
        assert_eq!(
            off.apply(DeviceKind::Switch, &set(r#"{"brightness":9}"#).unwrap()),
            None
        );
        // The retained state reads back.
        assert_eq!(off.parse(s.to_json(light).as_bytes()), Some(s));
        assert_eq!(off.parse(br#"{"state":"ON"}"#).map(|s| s.on), Some(true));
        assert_eq!(off.parse(br#"{"brightness":3}"#), None);
    }

    #[test]
    fn journal_keeps_the_window_and_state_across_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("actuator-lamp.jsonl");
        let on = DeviceState {
            on: true,
            ..DeviceState::default()
        };
        {
            let (mut j, mut w, s) = Journal::open(&path).unwrap();
            assert_eq!(s, None);
            for id in ["a", "b"] {
                w.first_time(id);
                j.append(Some(id), on, &w);
            }
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"id":"c","sta"#).unwrap();
        drop(f);
        let (_, w, s) = Journal::open(&path).unwrap();
        assert_eq!(w.ids(), ["a", "b"]);
        assert_eq!(s, Some(on));
        let (_, w, _) = Journal::open(&path).unwrap();
        assert_eq!(w.ids(), ["a", "b"], "compaction keeps the window");
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
