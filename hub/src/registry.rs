//! Device registry: what the hub knows about each device, kept across restarts.
//!
//! Fed by
//! - Hearth agents: retained `hearth/<d>/meta` ([`DeviceMeta`]), `hearth/<d>/availability`
//!   (last will) and their valid events (count, time, class and score of the last one);
//! - Zigbee2MQTT (`crate::zigbee`): `<base>/bridge/devices` (the bridge's device list:
//!   kind, model, vendor; a device missing from a new list was removed), `<base>/bridge/state`
//!   and each device's `<base>/<friendly_name>` state and `/availability` (JSON or plain).
//!
//! Devices are keyed by [`Source`] and name, so a Zigbee2MQTT friendly name may equal an
//! agent's name. With a state directory the table is a sled database
//! (`<state_dir>/registry`): changes mark a device dirty and [`Registry::flush`] (every
//! [`FLUSH_INTERVAL`] from the hub, and at shutdown) writes the dirty ones, so a burst of
//! events costs one write per device per interval, not one per event. A SIGKILL loses at most
//! that interval's counters; meta, availability and removals are flushed the same way.
//!
//! Bounded: at most [`MAX_DEVICES`] devices (and as many tombstones), every text field at most
//! [`MAX_FIELD`] bytes, [`MAX_CLASSES`] classes, [`MAX_EVENT_NAMES`] event names and
//! [`MAX_STATE_BYTES`] of a device's last state.
//!
//! Removal ([`Registry::remove`], `hearth-hub devices remove`) leaves a *tombstone*: the
//! broker still holds the device's retained `meta`/state, which would bring it straight back
//! at the next subscription; retained messages for a tombstoned device are ignored until it
//! publishes live again (a message without the retain flag), which clears the tombstone.

use crate::delivery::now_ms;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use hearth_proto::mqtt::DeviceMeta;
use serde::{Deserialize, Serialize};

/// Most devices the registry tracks; beyond it new names are ignored (a home has a handful).
pub const MAX_DEVICES: usize = 1024;
/// Longest stored text field, in bytes (longer values are cut at a character boundary).
pub const MAX_FIELD: usize = 128;
/// Most class labels kept per device.
pub const MAX_CLASSES: usize = 64;
/// Most event names kept per device.
pub const MAX_EVENT_NAMES: usize = 8;
/// Longest stored last state (a Zigbee2MQTT device's JSON), in bytes.
pub const MAX_STATE_BYTES: usize = 512;
/// How often the hub writes dirty devices to the database.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Key of the Zigbee2MQTT bridge's state in the database's `meta` tree.
const BRIDGE_KEY: &str = "zigbee2mqtt_bridge";

/// Errors of the registry database.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device registry {path}: {source}")]
    Db {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("device registry {0}: the database is in use by a running hub")]
    Locked(String),
}

/// Availability from `hearth/<device>/availability` or a Zigbee2MQTT availability topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Nothing received yet.
    #[default]
    Unknown,
    /// `online`.
    Online,
    /// `offline` (the device's last will, or a clean shutdown).
    Offline,
}

impl Availability {
    /// Parses an availability payload: `online`/`offline` (Hearth's form; Zigbee2MQTT's
    /// JSON form `{"state":"online"}` goes through [`crate::delivery::parse_availability`]).
    pub fn parse(payload: &[u8]) -> Option<Availability> {
        match payload {
            b"online" => Some(Availability::Online),
            b"offline" => Some(Availability::Offline),
            _ => None,
        }
    }

    /// From a parsed online flag.
    pub fn from_online(online: bool) -> Availability {
        if online {
            Availability::Online
        } else {
            Availability::Offline
        }
    }

    /// `online`, `offline` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Unknown => "unknown",
            Availability::Online => "online",
            Availability::Offline => "offline",
        }
    }
}

/// Where a device is known from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A Hearth agent (`hearth/<name>/…`).
    #[default]
    Hearth,
    /// A Zigbee2MQTT device (or one that speaks like it, such as Hearth's virtual switch).
    Zigbee2mqtt,
}

impl Source {
    fn index(self) -> usize {
        self as usize
    }

    /// `hearth` or `zigbee2mqtt`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hearth => "hearth",
            Source::Zigbee2mqtt => "zigbee2mqtt",
        }
    }
}

/// One device as seen by the hub.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceInfo {
    /// Device name (the topic level; a Zigbee2MQTT friendly name).
    pub name: String,
    /// Where it is known from.
    pub source: Source,
    /// `agent`, `actuator`; for Zigbee2MQTT the bridge's `type` (`Router`, `EndDevice`), or
    /// empty when known only from its topics.
    pub kind: String,
    /// Hearth: the model in use, `name@version`; Zigbee2MQTT: the device model.
    pub model: String,
    /// Zigbee2MQTT: the vendor.
    pub vendor: String,
    /// Software version (Hearth) or firmware (Zigbee2MQTT).
    pub sw_version: String,
    /// Class labels the agent can emit.
    pub classes: Vec<String>,
    /// Event names seen or announced (`hearth/<d>/event/<name>`).
    pub event_names: Vec<String>,
    /// Retained description, if the device published one.
    pub meta: Option<DeviceMeta>,
    /// Last availability.
    pub availability: Availability,
    /// Valid events (Hearth) or state messages (Zigbee2MQTT) received.
    pub events: u64,
    /// Wall-clock time of the last event or state, ms since the Unix epoch.
    pub last_event_unix_ms: Option<u64>,
    /// The last event (`<name>: <class> <score>`) or the last state JSON (cut to
    /// [`MAX_STATE_BYTES`]).
    pub last_event: Option<String>,
    /// Zigbee2MQTT: listed in the bridge's `bridge/devices`.
    pub in_bridge: bool,
}

impl DeviceInfo {
    /// The model's version from `name@version` (Hearth agents), else the whole model field.
    pub fn model_version(&self) -> &str {
        self.model
            .rsplit_once('@')
            .map(|(_, v)| v)
            .unwrap_or(&self.model)
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

type Key = (Source, String);
/// A device serialised for the database.
type Json = Vec<u8>;

fn db_key(source: Source, name: &str) -> Vec<u8> {
    format!("{}/{name}", source.as_str()).into_bytes()
}

#[derive(Debug, Default)]
struct Table {
    /// Per [`Source::index`], by name.
    devices: [HashMap<String, DeviceInfo>; 2],
    /// Removed devices whose retained messages are ignored until they publish live.
    tombstones: HashMap<Key, DeviceInfo>,
    /// Changed since the last flush, per source.
    dirty: [HashSet<String>; 2],
    bridge: Availability,
    bridge_dirty: bool,
}

/// Thread-safe device table, persisted in sled when opened on a state directory.
#[derive(Debug, Default)]
pub struct Registry {
    table: RwLock<Table>,
    db: Option<(PathBuf, sled::Tree, sled::Tree, sled::Tree)>,
}

impl Registry {
    /// An empty registry in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens (creating it) the registry database in `state_dir` and loads it.
    pub fn open(state_dir: &Path) -> Result<Registry, RegistryError> {
        let path = state_dir.join("registry");
        let shown = path.display().to_string();
        let db_err = |source: sled::Error| match &source {
            // sled reports a held lock as an `Other` I/O error with this text.
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                RegistryError::Locked(shown.clone())
            }
            _ => RegistryError::Db {
                path: shown.clone(),
                source,
            },
        };
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(2 << 20) // sled's default is 1 GiB; the registry is small
            .flush_every_ms(Some(FLUSH_INTERVAL.as_millis() as u64))
            .open()
            .map_err(db_err)?;
        let devices = db.open_tree("devices").map_err(db_err)?;
        let removed = db.open_tree("removed").map_err(db_err)?;
        let meta = db.open_tree("meta").map_err(db_err)?;
        let mut t = Table::default();
        let load = |tree: &sled::Tree| {
            let mut out = Vec::new();
            for kv in tree.iter() {
                let (_, v) = kv.map_err(db_err)?;
                match serde_json::from_slice::<DeviceInfo>(&v) {
                    Ok(d) if out.len() < MAX_DEVICES => out.push(d),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(file = %shown, "skipped an unreadable device: {e}"),
                }
            }
            Ok::<Vec<DeviceInfo>, RegistryError>(out)
        };
        for d in load(&devices)? {
            t.devices[d.source.index()].insert(d.name.clone(), d);
        }
        for d in load(&removed)? {
            t.tombstones.insert((d.source, d.name.clone()), d);
        }
        if let Some(v) = meta.get(BRIDGE_KEY).map_err(db_err)? {
            t.bridge = serde_json::from_slice(&v).unwrap_or_default();
        }
        tracing::info!(
            devices = t.devices.iter().map(HashMap::len).sum::<usize>(),
            removed = t.tombstones.len(),
            path = %shown,
            "device registry loaded"
        );
        Ok(Registry {
            table: RwLock::new(t),
            db: Some((path, devices, removed, meta)),
        })
    }

    /// Opens the registry of `state_dir`, or one in memory without it.
    pub fn open_or_memory(state_dir: Option<&Path>) -> Result<Registry, RegistryError> {
        match state_dir {
            Some(d) => Registry::open(d),
            None => Ok(Registry::new()),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the device (created when new and there is room); `retained` messages
    /// of a tombstoned device are ignored, live ones clear its tombstone. Returns false when
    /// nothing was applied.
    fn with(
        &self,
        source: Source,
        name: &str,
        retained: bool,
        f: impl FnOnce(&mut DeviceInfo),
    ) -> bool {
        let mut t = self.write();
        let t = &mut *t;
        let map = &mut t.devices[source.index()];
        // Allocation-free for the common case (a known device's event).
        if let Some(d) = map.get_mut(name) {
            f(d);
            let dirty = &mut t.dirty[source.index()];
            if !dirty.contains(name) {
                dirty.insert(name.to_string());
            }
            return true;
        }
        let key = (source, name.to_string());
        if t.tombstones.contains_key(&key) {
            if retained {
                return false;
            }
            t.tombstones.remove(&key);
        }
        if t.devices.iter().map(HashMap::len).sum::<usize>() >= MAX_DEVICES {
            return false;
        }
        let mut d = DeviceInfo {
            name: bounded(name, MAX_FIELD),
            source,
            ..DeviceInfo::default()
        };
        f(&mut d);
        t.dirty[source.index()].insert(d.name.clone());
        t.devices[source.index()].insert(d.name.clone(), d);
        true
    }

    /// Sets (or with `None`, clears) an agent's meta. Returns false when the table is full
    /// (or the device is removed and the message retained).
    pub fn set_meta(&self, device: &str, meta: Option<DeviceMeta>) -> bool {
        self.set_meta_from(device, meta, false)
    }

    /// [`Registry::set_meta`] with the message's retain flag.
    pub fn set_meta_from(&self, device: &str, meta: Option<DeviceMeta>, retained: bool) -> bool {
        self.with(Source::Hearth, device, retained, |d| {
            if let Some(m) = &meta {
                d.kind = bounded(&m.kind, MAX_FIELD);
                d.model = bounded(&m.model, MAX_FIELD);
                d.sw_version = bounded(&m.sw_version, MAX_FIELD);
                d.classes = m
                    .classes
                    .iter()
                    .take(MAX_CLASSES)
                    .map(|c| bounded(c, MAX_FIELD))
                    .collect();
                for e in &m.events {
                    add_event_name(d, e);
                }
            }
            d.meta = meta.map(|m| DeviceMeta {
                classes: m.classes.into_iter().take(MAX_CLASSES).collect(),
                events: m.events.into_iter().take(MAX_EVENT_NAMES).collect(),
                ..m
            });
        })
    }

    /// Records an agent's availability. Returns false when the table is full.
    pub fn set_availability(&self, device: &str, a: Availability) -> bool {
        self.set_availability_from(Source::Hearth, device, a, false)
    }

    /// Records availability with its source and the message's retain flag.
    pub fn set_availability_from(
        &self,
        source: Source,
        device: &str,
        a: Availability,
        retained: bool,
    ) -> bool {
        self.with(source, device, retained, |d| d.availability = a)
    }

    /// Records one valid event of `device` (allocates only the first time a device is
    /// seen, or a new event name).
    pub fn record_event(&self, device: &str) {
        self.record_event_detail(device, None);
    }

    /// Records one valid event with its name, class and score; true when the event name
    /// is new for the device.
    pub fn record_event_detail(&self, device: &str, detail: Option<(&str, &str, f32)>) -> bool {
        let t = now_ms();
        let mut new_name = false;
        self.with(Source::Hearth, device, false, |d| {
            d.events += 1;
            d.last_event_unix_ms = Some(t);
            if let Some((name, class, score)) = detail {
                new_name = add_event_name(d, name);
                let mut s = d.last_event.take().unwrap_or_default();
                s.clear();
                let _ = write!(s, "{name}: {class} {score:.2}");
                d.last_event = Some(bounded(&s, MAX_FIELD));
            }
        });
        new_name
    }

    /// Records a Zigbee2MQTT device's state message (`<base>/<friendly_name>`).
    pub fn record_state(&self, device: &str, state: &[u8], retained: bool) -> bool {
        let t = now_ms();
        let text = String::from_utf8_lossy(state);
        self.with(Source::Zigbee2mqtt, device, retained, |d| {
            d.events += 1;
            d.last_event_unix_ms = Some(t);
            d.last_event = Some(bounded(&text, MAX_STATE_BYTES));
        })
    }

    /// Applies the bridge's device list: adds or updates each device (kind, model,
    /// vendor, firmware) and removes Zigbee2MQTT devices listed before but missing now.
    /// Returns the removed devices.
    pub fn set_bridge_devices(&self, list: &[BridgeDevice]) -> Vec<DeviceInfo> {
        let names: HashSet<&str> = list.iter().map(|b| b.friendly_name.as_str()).collect();
        let gone: Vec<String> = self.read().devices[Source::Zigbee2mqtt.index()]
            .values()
            .filter(|d| d.in_bridge && !names.contains(d.name.as_str()))
            .map(|d| d.name.clone())
            .collect();
        for b in list {
            self.with(Source::Zigbee2mqtt, &b.friendly_name, false, |d| {
                d.in_bridge = true;
                d.kind = bounded(&b.kind, MAX_FIELD);
                d.model = bounded(&b.model, MAX_FIELD);
                d.vendor = bounded(&b.vendor, MAX_FIELD);
                d.sw_version = bounded(&b.sw_version, MAX_FIELD);
            });
        }
        gone.iter()
            .filter_map(|n| self.remove(Source::Zigbee2mqtt, n))
            .collect()
    }

    /// Records the Zigbee2MQTT bridge's state.
    pub fn set_bridge(&self, a: Availability) {
        let mut t = self.write();
        if t.bridge != a {
            t.bridge = a;
            t.bridge_dirty = true;
        }
    }

    /// The Zigbee2MQTT bridge's last state.
    pub fn bridge(&self) -> Availability {
        self.read().bridge
    }

    /// Removes a device and leaves its tombstone; returns what was known of it.
    pub fn remove(&self, source: Source, name: &str) -> Option<DeviceInfo> {
        let mut t = self.write();
        let key = (source, name.to_string());
        let d = t.devices[source.index()].remove(name)?;
        if t.tombstones.len() >= MAX_DEVICES {
            // The oldest tombstone makes room (its device may come back from a retained
            // message; nothing else is lost).
            if let Some(k) = t.tombstones.keys().next().cloned() {
                t.tombstones.remove(&k);
                t.dirty[k.0.index()].insert(k.1);
            }
        }
        t.tombstones.insert(key, d.clone());
        t.dirty[source.index()].insert(name.to_string());
        Some(d)
    }

    /// Removes `id`: `name` (an agent first, else a Zigbee2MQTT device) or
    /// `<source>/<name>` (`hearth/cam`, `zigbee2mqtt/lamp`).
    pub fn remove_id(&self, id: &str) -> Option<DeviceInfo> {
        for (source, prefix) in [
            (Source::Hearth, "hearth/"),
            (Source::Zigbee2mqtt, "zigbee2mqtt/"),
        ] {
            if let Some(n) = id.strip_prefix(prefix) {
                if let Some(d) = self.remove(source, n) {
                    return Some(d);
                }
            }
        }
        self.remove(Source::Hearth, id)
            .or_else(|| self.remove(Source::Zigbee2mqtt, id))
    }

    /// Removed devices whose tombstone is kept.
    pub fn removed(&self) -> Vec<DeviceInfo> {
        let mut v: Vec<DeviceInfo> = self.read().tombstones.values().cloned().collect();
        v.sort_by(|a, b| (a.source, &a.name).cmp(&(b.source, &b.name)));
        v
    }

    /// Writes every changed device (and tombstone) to the database; a no-op in memory.
    pub fn flush(&self) {
        let Some((path, devices, removed, meta)) = &self.db else {
            self.write().dirty = Default::default();
            return;
        };
        let (writes, bridge) = {
            let mut t = self.write();
            let keys: Vec<Key> = [Source::Hearth, Source::Zigbee2mqtt]
                .into_iter()
                .flat_map(|s| {
                    std::mem::take(&mut t.dirty[s.index()])
                        .into_iter()
                        .map(move |n| (s, n))
                })
                .collect();
            let writes: Vec<(Key, Option<Json>, Option<Json>)> = keys
                .into_iter()
                .map(|k| {
                    let live = t.devices[k.0.index()]
                        .get(&k.1)
                        .map(|d| serde_json::to_vec(d).expect("json"));
                    let dead = t
                        .tombstones
                        .get(&k)
                        .map(|d| serde_json::to_vec(d).expect("json"));
                    (k, live, dead)
                })
                .collect();
            let bridge = std::mem::take(&mut t.bridge_dirty).then_some(t.bridge);
            (writes, bridge)
        };
        let mut result = Ok(());
        for ((source, name), live, dead) in writes {
            let key = db_key(source, &name);
            let r1 = match live {
                Some(v) => devices.insert(&key, v).map(|_| ()),
                None => devices.remove(&key).map(|_| ()),
            };
            let r2 = match dead {
                Some(v) => removed.insert(&key, v).map(|_| ()),
                None => removed.remove(&key).map(|_| ()),
            };
            result = result.and(r1).and(r2);
        }
        if let Some(b) = bridge {
            result = result.and(
                meta.insert(BRIDGE_KEY, serde_json::to_vec(&b).expect("json"))
                    .map(|_| ()),
            );
        }
        if let Err(e) = result {
            tracing::error!(path = %path.display(), "cannot write the device registry: {e}");
        }
    }

    /// [`Registry::flush`], then waits until the database is on disk.
    pub fn flush_sync(&self) {
        self.flush();
        if let Some((path, devices, _, _)) = &self.db {
            if let Err(e) = devices.flush() {
                tracing::error!(path = %path.display(), "cannot flush the device registry: {e}");
            }
        }
    }

    /// One Hearth device.
    pub fn get(&self, device: &str) -> Option<DeviceInfo> {
        self.get_from(Source::Hearth, device)
    }

    /// One device of `source`.
    pub fn get_from(&self, source: Source, device: &str) -> Option<DeviceInfo> {
        self.read().devices[source.index()].get(device).cloned()
    }

    /// All devices, sorted by source and name.
    pub fn snapshot(&self) -> Vec<DeviceInfo> {
        let mut v: Vec<DeviceInfo> = self
            .read()
            .devices
            .iter()
            .flat_map(|m| m.values().cloned())
            .collect();
        v.sort_by(|a, b| (a.source, &a.name).cmp(&(b.source, &b.name)));
        v
    }

    /// Number of known devices.
    pub fn len(&self) -> usize {
        self.read().devices.iter().map(HashMap::len).sum()
    }

    /// Whether no device is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends Prometheus gauges: devices by availability.
    pub fn render_prometheus(&self, out: &mut String) {
        let (mut on, mut off, mut unk) = (0u64, 0u64, 0u64);
        for d in self.read().devices.iter().flat_map(HashMap::values) {
            match d.availability {
                Availability::Online => on += 1,
                Availability::Offline => off += 1,
                Availability::Unknown => unk += 1,
            }
        }
        out.push_str("# HELP hearth_hub_devices Known devices by availability.\n");
        out.push_str("# TYPE hearth_hub_devices gauge\n");
        for (label, n) in [("online", on), ("offline", off), ("unknown", unk)] {
            let _ = writeln!(out, "hearth_hub_devices{{availability=\"{label}\"}} {n}");
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if self.db.is_some() {
            self.flush_sync();
        }
    }
}

fn add_event_name(d: &mut DeviceInfo, name: &str) -> bool {
    if d.event_names.len() < MAX_EVENT_NAMES && !d.event_names.iter().any(|e| e == name) {
        d.event_names.push(bounded(name, MAX_FIELD));
        return true;
    }
    false
}

/// One entry of Zigbee2MQTT's `bridge/devices`, reduced to what the registry keeps.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BridgeDevice {
    pub friendly_name: String,
    /// `Router`, `EndDevice` (the coordinator is skipped).
    pub kind: String,
    pub model: String,
    pub vendor: String,
    pub sw_version: String,
}

/// A table of devices for the terminal: name, source, kind, model (version), online,
/// events, last event.
pub fn table(devices: &[DeviceInfo], now_ms: u64) -> String {
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            let model = match d.source {
                Source::Hearth if !d.model.is_empty() => d.model.clone(),
                _ if !d.vendor.is_empty() => format!("{} {}", d.vendor, d.model),
                _ => d.model.clone(),
            };
            let last = match (d.last_event_unix_ms, &d.last_event) {
                (Some(t), Some(e)) => format!("{} ago  {}", ago(now_ms.saturating_sub(t)), e),
                (Some(t), None) => format!("{} ago", ago(now_ms.saturating_sub(t))),
                _ => "-".into(),
            };
            [
                d.name.clone(),
                d.source.as_str().to_string(),
                dash(&d.kind),
                dash(&model),
                d.availability.as_str().to_string(),
                d.events.to_string(),
                last,
            ]
        })
        .collect();
    let head = [
        "NAME",
        "SOURCE",
        "KIND",
        "MODEL",
        "ONLINE",
        "EVENTS",
        "LAST EVENT",
    ];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<0$}  ", w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&head);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn ago(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(device: &str) -> DeviceMeta {
        DeviceMeta {
            device: device.into(),
            kind: "agent".into(),
            model: "faces@1".into(),
            classes: vec!["none".into(), "person".into()],
            events: vec!["detection".into()],
            sw_version: "0.1.0".into(),
        }
    }

    #[test]
    fn tracks_meta_availability_and_events() {
        let r = Registry::new();
        assert!(r.is_empty());
        r.set_availability("cam", Availability::Online);
        r.record_event("cam");
        r.record_event_detail("cam", Some(("detection", "person", 0.931)));
        let meta = meta("cam");
        r.set_meta("cam", Some(meta.clone()));
        r.set_availability("plug", Availability::Offline);
        let s = r.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "cam");
        assert_eq!(s[0].events, 2);
        assert_eq!(s[0].meta.as_ref(), Some(&meta));
        assert_eq!(s[0].model_version(), "1");
        assert_eq!(s[0].last_event.as_deref(), Some("detection: person 0.93"));
        assert_eq!(s[0].event_names, ["detection"]);
        assert_eq!(s[1].availability, Availability::Offline);
        r.set_meta("cam", None);
        assert_eq!(r.get("cam").unwrap().meta, None);
        let mut t = String::new();
        r.render_prometheus(&mut t);
        assert!(
            t.contains("hearth_hub_devices{availability=\"online\"} 1"),
            "{t}"
        );
        assert_eq!(Availability::parse(b"online"), Some(Availability::Online));
        assert_eq!(Availability::parse(b"ONLINE"), None);
    }

    #[test]
    fn persists_across_reopen_and_keeps_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Registry::open(dir.path()).unwrap();
            r.set_meta_from("cam", Some(meta("cam")), true);
            r.set_availability("cam", Availability::Online);
            r.record_event_detail("cam", Some(("detection", "person", 0.9)));
            r.record_state("lamp", br#"{"state":"ON"}"#, false);
            r.set_bridge(Availability::Online);
            r.set_meta("gone", Some(meta("gone")));
            assert!(r.remove_id("gone").is_some());
            assert!(
                matches!(Registry::open(dir.path()), Err(RegistryError::Locked(_))),
                "a second opener is refused while the first holds the database"
            );
            r.flush();
        }
        let r = Registry::open(dir.path()).unwrap();
        let cam = r.get("cam").unwrap();
        assert_eq!(
            (cam.kind.as_str(), cam.model.as_str(), cam.events),
            ("agent", "faces@1", 1)
        );
        assert_eq!(cam.availability, Availability::Online);
        let lamp = r.get_from(Source::Zigbee2mqtt, "lamp").unwrap();
        assert_eq!(lamp.last_event.as_deref(), Some(r#"{"state":"ON"}"#));
        assert_eq!(r.bridge(), Availability::Online);
        assert!(r.get("gone").is_none());
        assert_eq!(r.removed().len(), 1);
        // A retained meta does not bring a removed device back; a live one does.
        assert!(!r.set_meta_from("gone", Some(meta("gone")), true));
        assert!(r.get("gone").is_none());
        assert!(r.set_meta_from("gone", Some(meta("gone")), false));
        assert!(r.get("gone").is_some() && r.removed().is_empty());
    }

    #[test]
    fn bounded_fields_devices_and_bridge_removal() {
        let r = Registry::new();
        let long = "é".repeat(400);
        r.record_state("lamp", long.as_bytes(), false);
        let s = r
            .get_from(Source::Zigbee2mqtt, "lamp")
            .unwrap()
            .last_event
            .unwrap();
        assert!(s.len() <= MAX_STATE_BYTES && s.len() >= MAX_STATE_BYTES - 1);
        let mut m = meta("cam");
        m.classes = (0..1000).map(|i| format!("c{i}")).collect();
        m.model = "x".repeat(1000);
        r.set_meta("cam", Some(m));
        let cam = r.get("cam").unwrap();
        assert_eq!(cam.classes.len(), MAX_CLASSES);
        assert_eq!(cam.model.len(), MAX_FIELD);
        for i in 0..MAX_DEVICES + 10 {
            r.set_availability(&format!("d{i}"), Availability::Online);
        }
        assert_eq!(r.len(), MAX_DEVICES);
        let r = Registry::new();
        let dev = |n: &str| BridgeDevice {
            friendly_name: n.into(),
            kind: "Router".into(),
            model: "LED1545G12".into(),
            vendor: "IKEA".into(),
            sw_version: "2.3".into(),
        };
        assert!(r.set_bridge_devices(&[dev("a"), dev("b")]).is_empty());
        r.record_state("c", b"{}", false);
        let gone = r.set_bridge_devices(&[dev("b")]);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].name, "a");
        assert!(
            r.get_from(Source::Zigbee2mqtt, "c").is_some(),
            "not from the bridge"
        );
        let t = table(&r.snapshot(), now_ms());
        assert!(t.starts_with("NAME"), "{t}");
        assert!(t.contains("IKEA LED1545G12"), "{t}");
    }
}
