//! Command delivery: every actuator command goes through an outbox that survives a
//! restart of the hub (and of the embedded broker inside it), is held while its actuator is
//! offline, and leaves the outbox only once the broker has acknowledged it (QoS 1 PubAck).
//!
//! - **Ids.** Each command carries `"hearth_id":"<hub start, hex ms>-<n>"`, added to the
//!   rule's JSON object. Hearth's virtual actuator keeps an idempotency window of these ids,
//!   so a command delivered twice (re-sent after a crash, redelivered by the broker) is
//!   applied once. Zigbee2MQTT ignores keys no converter claims (it logs "No converter
//!   available for 'hearth_id'"); `command_ids = false` leaves payloads exactly as the rule
//!   wrote them for homes that prefer a quiet Z2M log, at the price of that deduplication.
//! - **Availability.** The hub subscribes to `<actuator_base>/<actuator>/availability` for
//!   every actuator the rules name. Both forms Zigbee2MQTT publishes are understood: plain
//!   `online`/`offline` (Hearth's actuator, Z2M's legacy form) and `{"state":"online"}`.
//!   An actuator that has reported availability once is *tracked* (remembered in the
//!   outbox file): its commands are held while it is offline, and after a hub restart it
//!   counts as offline until it says `online` again — the embedded broker forgets retained
//!   messages and sessions when its process dies, so the actuator may not have resubscribed
//!   yet. Actuators that never report availability get their commands at once.
//! - **Bounds.** At most `max_held_per_actuator` commands wait per actuator (the oldest is
//!   dropped beyond it); a command older than `hold_expiry_secs` is dropped instead of
//!   being replayed hours later. Counted: held, delivered late, expired, dropped over cap.
//! - **Persistence.** The outbox is a journal of JSON lines (`add`, `done`, `seen`)
//!   appended with one `write` per change — in the kernel's page cache at once, so a
//!   SIGKILL loses nothing — and compacted by writing a fresh file and renaming it over
//!   the old one (atomic). Without `state_file` the outbox lives in memory only.
//! - **A broker that lost its state.** When the command connection comes back and the
//!   broker answers without the old session (a broker SIGKILLed before it saved anything,
//!   or one without persistence), what it held is gone: commands it had acknowledged in the
//!   last [`REDELIVER_ACKED_MS`] before the outage may never have reached their actuator,
//!   and an actuator's subscription may not exist yet. So those commands go into the outbox
//!   again (same ids: actuators apply them once), and every tracked actuator not heard from
//!   since the outage began counts as offline until it says `online` again.
//! - **Sending.** One task owns the outbox and a dedicated MQTT connection
//!   (`<client_id>-cmd`, persistent session by default): it sends at most
//!   [`MAX_IN_FLIGHT`] unacknowledged commands, maps rumqttc's packet ids back to command
//!   ids, and re-sends what the broker had not acknowledged when it answers a reconnect
//!   without the old session.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_edge::{stopped, Connection};
use rumqttc::{AsyncClient, Event as MqttEvent, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

/// Most unacknowledged commands on the command connection (below its client's inflight
/// limit, [`CLIENT_INFLIGHT`]). At 64, a broker slow to acknowledge (a busy machine: a few ms)
/// capped delivery near 64 per round trip, below 20,000 commands/s, and the outbox grew.
pub const MAX_IN_FLIGHT: usize = 512;
/// rumqttc's inflight limit of the command connection.
pub const CLIENT_INFLIGHT: u16 = 1024;
/// Default per-actuator bound of held commands.
pub const DEFAULT_MAX_HELD: usize = 100;
/// Default age after which a held command is dropped rather than delivered.
pub const DEFAULT_HOLD_EXPIRY_SECS: u64 = 600;
/// The JSON key carrying a command's id.
pub const ID_FIELD: &str = "hearth_id";
/// Capacity of the channel from the router to the delivery task.
const CHANNEL: usize = 1024;
/// How often held commands are checked for expiry.
const TICK: Duration = Duration::from_secs(1);

/// `[delivery]` in the hub's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Persistent MQTT sessions (`clean_session = false`) for the hub's clients, so a broker
    /// that keeps sessions (Mosquitto) queues what they miss while they are away.
    pub persistent_session: bool,
    /// Hold commands while their actuator reports itself offline.
    pub hold_offline: bool,
    /// Most commands held per actuator; the oldest is dropped beyond it.
    pub max_held_per_actuator: usize,
    /// Held commands older than this are dropped, not delivered.
    pub hold_expiry_secs: u64,
    /// Add `"hearth_id"` to every command (deduplicated by Hearth's actuator).
    pub command_ids: bool,
    /// Outbox journal; the outbox is in memory only (lost on restart) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            persistent_session: true,
            hold_offline: true,
            max_held_per_actuator: DEFAULT_MAX_HELD,
            hold_expiry_secs: DEFAULT_HOLD_EXPIRY_SECS,
            command_ids: true,
            state_file: None,
        }
    }
}

impl DeliveryConfig {
    /// Checks the bounds; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100_000).contains(&self.max_held_per_actuator) {
            return Err("delivery.max_held_per_actuator must be within 1..=100000".into());
        }
        if !(1..=7 * 86_400).contains(&self.hold_expiry_secs) {
            return Err("delivery.hold_expiry_secs must be within 1..=604800 (7 days)".into());
        }
        if self
            .state_file
            .as_ref()
            .is_some_and(|p| p.file_name().is_none())
        {
            return Err("delivery.state_file must name a file".into());
        }
        Ok(())
    }
}

/// One actuator command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Unique id (also inside the payload when ids are on).
    pub id: String,
    /// Actuator name (as in the rule).
    pub actuator: String,
    /// `<base>/<actuator>/set`.
    pub topic: String,
    /// JSON payload as published.
    pub payload: String,
    /// When the rule fired, ms since the Unix epoch.
    pub at_ms: u64,
    /// When the event that caused it was received (for the event → command latency
    /// histogram); not persisted.
    #[serde(skip)]
    pub received: Option<std::time::Instant>,
}

/// The rule's JSON object with `"hearth_id":"<id>"` added (rules render non-empty objects).
pub fn with_id(payload: &[u8], id: &str) -> String {
    let text = String::from_utf8_lossy(payload);
    match text.trim_end().strip_suffix('}') {
        Some(head) if text.trim_start().starts_with('{') => {
            let sep = if head.trim_end().ends_with('{') {
                ""
            } else {
                ","
            };
            format!("{head}{sep}\"{ID_FIELD}\":\"{id}\"}}")
        }
        _ => text.into_owned(),
    }
}

/// Parses an availability payload: `online`/`offline` or `{"state":"online"}`.
pub fn parse_availability(payload: &[u8]) -> Option<bool> {
    #[derive(Deserialize)]
    struct Json {
        state: String,
    }
    let word = match payload {
        b"online" | b"offline" => payload.to_vec(),
        _ => serde_json::from_slice::<Json>(payload)
            .ok()?
            .state
            .into_bytes(),
    };
    match word.as_slice() {
        b"online" => Some(true),
        b"offline" => Some(false),
        _ => None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A journal line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Add(Command),
    /// Dropped (over the cap) or expired: never sent again.
    Done(String),
    /// Acknowledged by the broker at `at_ms`.
    Acked {
        id: String,
        at_ms: u64,
    },
    Seen(String),
}

/// Commands the broker acknowledged this long before the last journal entry are sent again
/// after a restart. A PubAck from the *embedded* broker is not durable: the broker dies with
/// the hub, so a command acknowledged just before a SIGKILL may never have reached its
/// actuator. Re-sending is safe: actuators drop repeated command ids (idempotency window).
pub const REDELIVER_ACKED_MS: u64 = 2_000;

/// The journal is compacted once it holds this many lines beyond the live state: at
/// 10,000 commands/s (two lines each) about once a second, a file of a few MB at most. (It
/// was 1,000: twenty compactions a second, each a file write and two fsyncs on the
/// delivery task.)
pub const COMPACT_LINES: usize = 20_000;

/// Most recently acknowledged commands kept for a re-send after a broker lost its state.
const RECENT_ACKED: usize = 1024;

#[derive(Debug)]
struct Entry {
    cmd: Command,
    sent: bool,
    held: bool,
}

/// The outbox: commands not yet acknowledged by the broker, in firing order, and the
/// availability of the actuators that report it. Synchronous; owned by one task.
#[derive(Debug)]
pub struct Outbox {
    entries: VecDeque<Entry>,
    /// Tracked actuators and whether they are online now.
    online: HashMap<String, bool>,
    hold: bool,
    cap: usize,
    expiry_ms: u64,
    metrics: Arc<Metrics>,
    journal: Option<(PathBuf, File)>,
    journal_lines: usize,
    /// Journal lines not yet written (only while [`Outbox::defer_journal`] is on).
    pending: Vec<u8>,
    defer: bool,
    /// Commands not yet sent, per actuator (for the cap without a scan of the outbox).
    waiting_per: HashMap<String, usize>,
    /// Commands not yet sent, in all.
    unsent: usize,
    /// When each tracked actuator's availability was last heard, ms since the epoch.
    heard_ms: HashMap<String, u64>,
    /// Commands acknowledged in the last moments, with the time of their PubAck.
    recent_acked: VecDeque<(Command, u64)>,
}

fn io_err(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("outbox {}: {e}", path.display()))
}

impl Outbox {
    /// An outbox in memory.
    pub fn in_memory(cfg: &DeliveryConfig, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            entries: VecDeque::new(),
            online: HashMap::new(),
            hold: cfg.hold_offline,
            cap: cfg.max_held_per_actuator,
            expiry_ms: cfg.hold_expiry_secs.saturating_mul(1000),
            metrics,
            journal: None,
            journal_lines: 0,
            pending: Vec::new(),
            defer: false,
            waiting_per: HashMap::new(),
            unsent: 0,
            heard_ms: HashMap::new(),
            recent_acked: VecDeque::new(),
        }
    }

    /// Opens the outbox of `cfg.state_file` (in memory without one): replays the journal
    /// (tracked actuators start offline; every command not acknowledged is to be sent
    /// again) and compacts it.
    pub fn open(cfg: &DeliveryConfig, metrics: Arc<Metrics>) -> std::io::Result<Outbox> {
        let mut o = Outbox::in_memory(cfg, metrics);
        let Some(path) = cfg.state_file.clone() else {
            return Ok(o);
        };
        match File::open(&path) {
            Ok(f) => {
                let mut acked: HashMap<String, u64> = HashMap::new();
                let mut last_ms = 0;
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(|e| io_err(&path, e))?;
                    // A torn last line (killed mid-write) is skipped.
                    match serde_json::from_str::<Op>(&line) {
                        Ok(Op::Add(cmd)) => {
                            last_ms = last_ms.max(cmd.at_ms);
                            o.entries.push_back(Entry {
                                cmd,
                                sent: false,
                                held: true,
                            })
                        }
                        Ok(Op::Done(id)) => o.entries.retain(|e| e.cmd.id != id),
                        Ok(Op::Acked { id, at_ms }) => {
                            last_ms = last_ms.max(at_ms);
                            acked.insert(id, at_ms);
                        }
                        Ok(Op::Seen(a)) => {
                            o.online.insert(a, false);
                        }
                        Err(_) => {
                            tracing::warn!(file = %path.display(), "skipped a damaged outbox line")
                        }
                    }
                }
                // Acknowledged long enough before the end: delivered. The last moments' acks
                // may have died with an embedded broker: those go out again.
                o.entries.retain(|e| {
                    acked
                        .get(&e.cmd.id)
                        .is_none_or(|&at| at + REDELIVER_ACKED_MS >= last_ms)
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path, e)),
        }
        o.recount();
        o.compact(path)?;
        if !o.entries.is_empty() {
            tracing::info!(
                commands = o.entries.len(),
                "outbox: undelivered commands from before the restart"
            );
        }
        o.update_gauge();
        Ok(o)
    }

    /// Rewrites the journal with only the live state (temporary file, fsync, rename).
    fn compact(&mut self, path: PathBuf) -> std::io::Result<()> {
        let mut text = String::new();
        let mut lines = 0;
        let mut tracked: Vec<&String> = self.online.keys().collect();
        tracked.sort();
        let ops = tracked
            .into_iter()
            .map(|a| Op::Seen(a.clone()))
            .chain(self.entries.iter().map(|e| Op::Add(e.cmd.clone())));
        for op in ops {
            text.push_str(&serde_json::to_string(&op).expect("journal line serialises"));
            text.push('\n');
            lines += 1;
        }
        hearth_edge::fsutil::write_atomic(&path, text.as_bytes(), hearth_edge::fsutil::PRIVATE)
            .map_err(|e| io_err(&path, e))?;
        // The fresh file holds the live state: lines gathered before it are in it.
        self.pending.clear();
        let f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        self.journal = Some((path, f));
        self.journal_lines = lines;
        Ok(())
    }

    fn log(&mut self, op: &Op) {
        if self.journal.is_none() {
            return;
        }
        serde_json::to_writer(&mut self.pending, op).expect("journal line serialises");
        self.pending.push(b'\n');
        self.journal_lines += 1;
        if !self.defer {
            self.flush_journal();
        }
    }

    /// With `on`, journal lines are gathered and written by [`Outbox::flush_journal`] (one
    /// `write` for many changes); the delivery task flushes before every publish and after
    /// every message it handles. Off (the default): every change is written at once.
    pub fn defer_journal(&mut self, on: bool) {
        self.defer = on;
        if !on {
            self.flush_journal();
        }
    }

    /// Writes the gathered journal lines (one `write`: in the kernel's page cache at once, so
    /// a SIGKILL after it loses nothing), and compacts the journal once it has grown to
    /// [`COMPACT_LINES`] beyond the live state.
    pub fn flush_journal(&mut self) {
        let Some((path, f)) = &mut self.journal else {
            self.pending.clear();
            return;
        };
        if !self.pending.is_empty() {
            if let Err(e) = f.write_all(&self.pending) {
                tracing::error!(file = %path.display(), "cannot write the outbox journal: {e}");
            }
            self.pending.clear();
        }
        if self.journal_lines > 2 * self.entries.len() + self.online.len() + COMPACT_LINES {
            let path = path.clone();
            if let Err(e) = self.compact(path) {
                tracing::error!("cannot compact the outbox journal: {e}");
            }
        }
    }

    fn update_gauge(&self) {
        self.metrics
            .commands_waiting
            .store(self.unsent as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the commands not yet sent again (after a change to many entries).
    fn recount(&mut self) {
        self.waiting_per.clear();
        self.unsent = 0;
        for e in self.entries.iter().filter(|e| !e.sent) {
            *self.waiting_per.entry(e.cmd.actuator.clone()).or_insert(0) += 1;
            self.unsent += 1;
        }
        self.update_gauge();
    }

    /// One more command of `actuator` not yet sent.
    fn count_in(&mut self, actuator: &str) {
        match self.waiting_per.get_mut(actuator) {
            Some(n) => *n += 1,
            None => {
                self.waiting_per.insert(actuator.to_string(), 1);
            }
        }
        self.unsent += 1;
    }

    /// One command of `actuator` fewer not yet sent (sent, acknowledged or dropped).
    fn count_out(&mut self, actuator: &str) {
        if let Some(n) = self.waiting_per.get_mut(actuator) {
            *n = n.saturating_sub(1);
        }
        self.unsent = self.unsent.saturating_sub(1);
    }

    /// Whether commands for `actuator` may be sent now.
    pub fn releasable(&self, actuator: &str) -> bool {
        !self.hold || self.online.get(actuator).copied().unwrap_or(true)
    }

    /// Commands waiting or in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the outbox is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Ids of the commands not yet sent, in order.
    pub fn waiting(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| !e.sent)
            .map(|e| e.cmd.id.clone())
            .collect()
    }

    /// Records `cmd` (journal first). Held if its actuator is offline; beyond the
    /// per-actuator bound the oldest waiting command of that actuator is dropped.
    pub fn submit(&mut self, cmd: Command) {
        self.log(&Op::Add(cmd.clone()));
        let held = !self.releasable(&cmd.actuator);
        if held {
            Metrics::inc(&self.metrics.commands_held);
            tracing::debug!(hearth_id = %cmd.id, actuator = %cmd.actuator, "held: actuator offline");
        }
        let waiting = self.waiting_per.get(&cmd.actuator).copied().unwrap_or(0);
        if waiting >= self.cap {
            if let Some(i) = self
                .entries
                .iter()
                .position(|e| !e.sent && e.cmd.actuator == cmd.actuator)
            {
                let old = self.entries.remove(i).expect("index in range");
                self.count_out(&old.cmd.actuator);
                Metrics::inc(&self.metrics.commands_dropped_over_cap);
                tracing::warn!(actuator = %old.cmd.actuator, hearth_id = %old.cmd.id, cap = self.cap, "outbox full for this actuator: oldest command dropped");
                self.log(&Op::Done(old.cmd.id));
            }
        }
        self.count_in(&cmd.actuator);
        self.entries.push_back(Entry {
            cmd,
            sent: false,
            held,
        });
        self.update_gauge();
    }

    /// Records an actuator's availability (it is tracked from now on).
    pub fn set_availability(&mut self, actuator: &str, online: bool) {
        self.set_availability_at(actuator, online, now_ms());
    }

    fn set_availability_at(&mut self, actuator: &str, online: bool, at_ms: u64) {
        if let Some(t) = self.heard_ms.get_mut(actuator) {
            *t = at_ms;
        } else {
            self.heard_ms.insert(actuator.to_string(), at_ms);
        }
        match self.online.insert(actuator.to_string(), online) {
            None => self.log(&Op::Seen(actuator.to_string())),
            Some(was) if was != online => {}
            Some(_) => return,
        }
        tracing::info!(
            actuator,
            online,
            "actuator availability{}",
            if online { "" } else { ": holding its commands" }
        );
        if !online {
            for e in self
                .entries
                .iter_mut()
                .filter(|e| !e.sent && e.cmd.actuator == actuator)
            {
                if !e.held {
                    e.held = true;
                    Metrics::inc(&self.metrics.commands_held);
                }
            }
        }
    }

    /// The broker answered a reconnect without our session: it lost what it held (see the
    /// module notes). `last_ok_ms` is when the connection last worked. Returns how many
    /// acknowledged commands go out again.
    pub fn broker_lost_session(&mut self, last_ok_ms: u64) -> usize {
        let stale: Vec<String> = self
            .online
            .iter()
            .filter(|(a, on)| **on && self.heard_ms.get(*a).is_none_or(|t| *t <= last_ok_ms))
            .map(|(a, _)| a.clone())
            .collect();
        for a in stale {
            tracing::info!(actuator = %a, "the broker lost its state: holding commands until the actuator is back");
            self.set_availability_at(&a, false, last_ok_ms);
        }
        let again: Vec<Command> = self
            .recent_acked
            .drain(..)
            .filter(|(_, at)| at + REDELIVER_ACKED_MS >= last_ok_ms)
            .map(|(c, _)| c)
            .collect();
        let n = again.len();
        // Before anything newer, in firing order.
        for cmd in again.into_iter().rev() {
            tracing::info!(hearth_id = %cmd.id, "re-sending a command the broker may have lost");
            self.log(&Op::Add(cmd.clone()));
            let held = !self.releasable(&cmd.actuator);
            self.entries.push_front(Entry {
                cmd,
                sent: false,
                held,
            });
        }
        self.recount();
        n
    }

    /// Drops waiting commands older than the expiry at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        let expiry = self.expiry_ms;
        let old: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !e.sent && now_ms.saturating_sub(e.cmd.at_ms) > expiry)
            .map(|e| e.cmd.id.clone())
            .collect();
        if old.is_empty() {
            return;
        }
        self.entries
            .retain(|e| e.sent || now_ms.saturating_sub(e.cmd.at_ms) <= expiry);
        for id in old {
            Metrics::inc(&self.metrics.commands_expired);
            tracing::warn!(hearth_id = %id, "held command expired");
            self.log(&Op::Done(id));
        }
        self.recount();
    }

    /// The next command to send (marked in flight), in firing order, skipping actuators
    /// that are offline and dropping expired commands on the way.
    pub fn next_ready(&mut self, now_ms: u64) -> Option<Command> {
        // The oldest waiting command is the first not sent (firing order): a full pass only
        // when it has expired (a pass per command made a backlog quadratic).
        if self
            .entries
            .iter()
            .find(|e| !e.sent)
            .is_some_and(|e| now_ms.saturating_sub(e.cmd.at_ms) > self.expiry_ms)
        {
            self.expire(now_ms);
        }
        let i = self
            .entries
            .iter()
            .position(|e| !e.sent && self.releasable(&e.cmd.actuator))?;
        let e = &mut self.entries[i];
        e.sent = true;
        let cmd = e.cmd.clone();
        self.count_out(&cmd.actuator);
        self.update_gauge();
        Some(cmd)
    }

    /// Puts an in-flight command back (the client refused it, or the broker lost the session).
    pub fn unsend(&mut self, id: &str) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.cmd.id == id) {
            if e.sent {
                e.sent = false;
                let a = e.cmd.actuator.clone();
                self.count_in(&a);
            }
        }
        self.update_gauge();
    }

    /// Every in-flight command is to be sent again.
    pub fn unsend_all(&mut self) {
        for e in &mut self.entries {
            e.sent = false;
        }
        self.recount();
    }

    /// The broker acknowledged `id`: it leaves the outbox (the journal keeps the time, see
    /// [`REDELIVER_ACKED_MS`]).
    pub fn acked(&mut self, id: &str) {
        self.acked_at(id, now_ms());
    }

    fn acked_at(&mut self, id: &str, at_ms: u64) {
        let Some(i) = self.entries.iter().position(|e| e.cmd.id == id) else {
            return;
        };
        let e = self.entries.remove(i).expect("index in range");
        if !e.sent {
            self.count_out(&e.cmd.actuator);
            self.update_gauge();
        }
        while self.recent_acked.len() >= RECENT_ACKED
            || self
                .recent_acked
                .front()
                .is_some_and(|(_, t)| t + REDELIVER_ACKED_MS < at_ms)
        {
            self.recent_acked.pop_front();
        }
        self.recent_acked.push_back((e.cmd.clone(), at_ms));
        Metrics::inc(&self.metrics.commands_acked);
        if let Some(t) = e.cmd.received {
            self.metrics.event_to_command.observe(t.elapsed());
        }
        if e.held {
            Metrics::inc(&self.metrics.commands_delivered_late);
        }
        tracing::debug!(hearth_id = %id, actuator = %e.cmd.actuator, late = e.held, "command acknowledged by the broker");
        self.log(&Op::Acked {
            id: id.to_string(),
            at_ms,
        });
    }
}

/// What the router hands to the delivery task.
#[derive(Debug)]
pub(crate) enum Msg {
    Command(Command),
    Availability(String, bool),
}

/// The router's side: makes command ids and queues commands for the delivery task.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    tx: mpsc::Sender<Msg>,
    ids: bool,
    prefix: String,
    seq: Arc<std::sync::atomic::AtomicU64>,
}

impl Sender {
    /// Queues a command for `actuator` (waits while the delivery task is busy); `received`
    /// is when the event that caused it arrived (latency is measured to its PubAck).
    pub(crate) async fn command_at(
        &self,
        actuator: &str,
        topic: &str,
        payload: &[u8],
        received: Option<std::time::Instant>,
    ) -> bool {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        let payload = if self.ids {
            with_id(payload, &id)
        } else {
            String::from_utf8_lossy(payload).into_owned()
        };
        let cmd = Command {
            id,
            actuator: actuator.to_string(),
            topic: topic.to_string(),
            payload,
            at_ms: now_ms(),
            received,
        };
        self.tx.send(Msg::Command(cmd)).await.is_ok()
    }

    /// Passes on an actuator's availability.
    pub(crate) async fn availability(&self, actuator: &str, online: bool) {
        let _ = self
            .tx
            .send(Msg::Availability(actuator.to_string(), online))
            .await;
    }
}

/// The delivery task's state besides the outbox: command ids awaiting a packet id, and
/// packet ids awaiting their PubAck.
#[derive(Debug, Default)]
struct InFlight {
    unassigned: VecDeque<String>,
    by_pkid: HashMap<u16, String>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.unassigned.len() + self.by_pkid.len()
    }
}

/// Starts the delivery task on `conn`/`client`; the returned sender is the router's.
/// `ready` fires at the first ConnAck.
pub(crate) fn spawn(
    outbox: Outbox,
    cfg: &DeliveryConfig,
    conn: Connection,
    client: AsyncClient,
    shutdown: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) -> (Sender, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(CHANNEL);
    let sender = Sender {
        tx,
        ids: cfg.command_ids,
        prefix: format!("{:x}", now_ms()),
        seq: Arc::default(),
    };
    let task = tokio::spawn(run(outbox, conn, client, rx, shutdown, ready));
    (sender, task)
}

fn pump(outbox: &mut Outbox, flight: &mut InFlight, client: &AsyncClient, up: bool) {
    // Journal first: nothing is published before its `add` line is written.
    outbox.flush_journal();
    if !up {
        return;
    }
    while flight.len() < MAX_IN_FLIGHT {
        let Some(cmd) = outbox.next_ready(now_ms()) else {
            return;
        };
        match client.try_publish(cmd.topic.as_str(), QoS::AtLeastOnce, false, cmd.payload) {
            Ok(()) => {
                Metrics::inc(&outbox.metrics.commands_published);
                flight.unassigned.push_back(cmd.id);
            }
            Err(e) => {
                tracing::debug!("command not queued now: {e}");
                outbox.unsend(&cmd.id);
                return;
            }
        }
    }
}

/// Most further messages taken from the router's channel with one.
const DRAIN: usize = 255;

fn receive(outbox: &mut Outbox, msg: Msg) {
    match msg {
        Msg::Command(cmd) => {
            tracing::debug!(hearth_id = %cmd.id, actuator = %cmd.actuator, "command queued");
            outbox.submit(cmd);
        }
        Msg::Availability(a, on) => outbox.set_availability(&a, on),
    }
}

async fn run(
    mut outbox: Outbox,
    mut conn: Connection,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Msg>,
    mut shutdown: watch::Receiver<bool>,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut flight = InFlight::default();
    outbox.defer_journal(true);
    // When the connection last worked (a packet from the broker).
    let mut last_ok_ms = now_ms();
    let status = conn.status();
    let mut tick = tokio::time::interval(TICK);
    let mut router_gone = false;
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown), if !router_gone => router_gone = true,
            msg = rx.recv(), if !router_gone => match msg {
                Some(msg) => {
                    // What else is queued goes in with it: one journal write for all.
                    receive(&mut outbox, msg);
                    for _ in 0..DRAIN {
                        match rx.try_recv() {
                            Ok(msg) => receive(&mut outbox, msg),
                            Err(_) => break,
                        }
                    }
                }
                None => router_gone = true,
            },
            ev = conn.poll() => match ev {
                None => break,
                Some(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    if !ack.session_present {
                        // rumqttc dropped what it had not sent or seen acknowledged.
                        flight = InFlight::default();
                        outbox.unsend_all();
                        if ready.is_none() {
                            let n = outbox.broker_lost_session(last_ok_ms);
                            tracing::warn!(resent = n, "the broker lost the hub's session (restarted without its state?)");
                        }
                    }
                    last_ok_ms = now_ms();
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Some(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                    if !flight.by_pkid.contains_key(&pkid) {
                        if let Some(id) = flight.unassigned.pop_front() {
                            flight.by_pkid.insert(pkid, id);
                        }
                    }
                }
                Some(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                    last_ok_ms = now_ms();
                    if let Some(id) = flight.by_pkid.remove(&ack.pkid) {
                        outbox.acked(&id);
                    }
                }
                Some(MqttEvent::Incoming(_)) => last_ok_ms = now_ms(),
                Some(MqttEvent::Outgoing(Outgoing::Disconnect)) => break,
                Some(_) => {}
            },
            _ = tick.tick() => outbox.expire(now_ms()),
        }
        if router_gone && flight.len() == 0 {
            // Nothing more will come and nothing is in flight: disconnect (what waits
            // stays in the outbox file for the next start).
            conn.disconnect(&client, Duration::from_millis(500)).await;
            break;
        }
        pump(&mut outbox, &mut flight, &client, status.is_up());
    }
    outbox.defer_journal(false);
    let waiting = outbox.waiting().len();
    if waiting > 0 {
        tracing::info!(
            commands = waiting,
            "delivery stopped with commands waiting in the outbox"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> DeliveryConfig {
        DeliveryConfig {
            max_held_per_actuator: 3,
            hold_expiry_secs: 10,
            state_file: Some(dir.join("outbox.jsonl")),
            ..DeliveryConfig::default()
        }
    }

    fn cmd(id: &str, actuator: &str, at_ms: u64) -> Command {
        Command {
            id: id.into(),
            actuator: actuator.into(),
            topic: format!("z2m/{actuator}/set"),
            payload: with_id(br#"{"state":"ON"}"#, id),
            at_ms,
            received: None,
        }
    }

    fn drain(o: &mut Outbox, now: u64) -> Vec<String> {
        std::iter::from_fn(|| o.next_ready(now))
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn deferred_journal_lines_are_written_before_their_command_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&cfg(dir.path()), m.clone()).unwrap();
        o.defer_journal(true);
        for id in ["a1", "a2", "a3"] {
            o.submit(cmd(id, "plug", now_ms()));
        }
        // Gathered, not written yet: one write for the three. (Read the file as a restart
        // would, without compacting it under the open outbox.)
        let path = dir.path().join("outbox.jsonl");
        let replay = |path: &Path| -> Vec<String> {
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .filter_map(|l| match serde_json::from_str::<Op>(l) {
                    Ok(Op::Add(c)) => Some(c.id),
                    _ => None,
                })
                .collect()
        };
        assert!(replay(&path).is_empty());
        // Publishing writes the journal first: a SIGKILL right after the publish still
        // finds every published command in the file.
        let (client, _el) = AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 16);
        let mut flight = InFlight::default();
        pump(&mut o, &mut flight, &client, true);
        assert_eq!(flight.len(), 3, "published");
        assert_eq!(replay(&path), ["a1", "a2", "a3"]);
    }

    #[test]
    fn a_backlog_costs_linear_time() {
        // 100,000 commands waiting (1,000 actuators at their bound of 100), then sent and
        // acknowledged one by one: with a pass over the outbox per command (the counts, the
        // gauge, the expiry) this took minutes; now well under a second.
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::in_memory(&DeliveryConfig::default(), m.clone());
        let t0 = std::time::Instant::now();
        let now = now_ms();
        for i in 0..100_000 {
            o.submit(cmd(&format!("b{i}"), &format!("a{}", i % 1000), now));
        }
        assert_eq!(
            m.commands_waiting
                .load(std::sync::atomic::Ordering::Relaxed),
            100_000
        );
        let mut sent = 0;
        while let Some(c) = o.next_ready(now) {
            o.acked(&c.id);
            sent += 1;
        }
        assert_eq!(sent, 100_000);
        assert!(o.is_empty());
        assert_eq!(
            m.commands_waiting
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(15), "{took:?}");
    }

    #[test]
    fn the_journal_is_compacted_once_it_outgrows_the_live_state() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&cfg(dir.path()), m).unwrap();
        o.defer_journal(true);
        let path = dir.path().join("outbox.jsonl");
        let mut largest = 0;
        for i in 0..(COMPACT_LINES + 100) {
            let id = format!("c{i}");
            o.submit(cmd(&id, "plug", now_ms()));
            o.next_ready(now_ms()).unwrap();
            o.acked(&id);
            o.flush_journal();
            largest = largest.max(std::fs::metadata(&path).unwrap().len());
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < COMPACT_LINES, "compacted: {lines} lines");
        assert!(
            largest < 200 * (COMPACT_LINES as u64 + 10),
            "bounded: {largest} bytes"
        );
    }

    #[test]
    fn ids_and_availability_payloads() {
        assert_eq!(
            with_id(br#"{"state":"ON"}"#, "a-1"),
            r#"{"state":"ON","hearth_id":"a-1"}"#
        );
        assert_eq!(with_id(b"{}", "a-1"), r#"{"hearth_id":"a-1"}"#);
        let v: serde_json::Value =
            serde_json::from_str(&with_id(br#"{"state":"ON","brightness":3}"#, "x")).unwrap();
        assert_eq!(v["hearth_id"], "x");
        assert_eq!(parse_availability(b"online"), Some(true));
        assert_eq!(parse_availability(br#"{"state":"offline"}"#), Some(false));
        assert_eq!(parse_availability(b"ONLINE"), None);
        assert_eq!(parse_availability(br#"{"state":"gone"}"#), None);
    }

    #[test]
    fn held_while_offline_released_in_order_when_online() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&cfg(dir.path()), m.clone()).unwrap();
        // Untracked actuators are not held.
        o.submit(cmd("u1", "plug", 0));
        assert_eq!(drain(&mut o, 0), ["u1"]);
        o.set_availability("lamp", false);
        for id in ["l1", "l2"] {
            o.submit(cmd(id, "lamp", 0));
        }
        o.submit(cmd("u2", "plug", 0));
        assert_eq!(drain(&mut o, 0), ["u2"], "the lamp's commands wait");
        assert_eq!(Metrics::get(&m.commands_held), 2);
        o.set_availability("lamp", true);
        o.submit(cmd("l3", "lamp", 0));
        assert_eq!(drain(&mut o, 0), ["l1", "l2", "l3"]);
        for id in ["u1", "u2", "l1", "l2", "l3"] {
            o.acked(id);
        }
        assert!(o.is_empty());
        assert_eq!(Metrics::get(&m.commands_acked), 5);
        assert_eq!(Metrics::get(&m.commands_delivered_late), 2);

        // Holding off: nothing waits for availability.
        let mut free = Outbox::in_memory(
            &DeliveryConfig {
                hold_offline: false,
                ..DeliveryConfig::default()
            },
            Arc::new(Metrics::new()),
        );
        free.set_availability("lamp", false);
        free.submit(cmd("f1", "lamp", 0));
        assert_eq!(drain(&mut free, 0), ["f1"]);
    }

    #[test]
    fn cap_drops_the_oldest_and_expiry_drops_stale_commands() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&cfg(dir.path()), m.clone()).unwrap();
        o.set_availability("lamp", false);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            o.submit(cmd(id, "lamp", 1000 * i as u64));
        }
        assert_eq!(o.waiting(), ["b", "c", "d"], "cap 3: the oldest went");
        assert_eq!(Metrics::get(&m.commands_dropped_over_cap), 1);
        // At 12.5 s, `b` (1 s) and `c` (2 s) are older than 10 s.
        o.expire(12_500);
        assert_eq!(o.waiting(), ["d"]);
        assert_eq!(Metrics::get(&m.commands_expired), 2);
        o.set_availability("lamp", true);
        // Expiry applies on release too.
        assert!(o.next_ready(13_001).is_none());
        assert_eq!(Metrics::get(&m.commands_expired), 3);
        assert_eq!(Metrics::get(&m.commands_waiting), 0);
    }

    #[test]
    fn a_broker_that_lost_its_state_gets_recent_commands_again_and_actuators_are_held() {
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::in_memory(&DeliveryConfig::default(), m);
        o.set_availability_at("lamp", true, 1_000);
        o.set_availability_at("fan", true, 1_000);
        o.submit(cmd("old", "lamp", 1_000));
        o.submit(cmd("a", "lamp", 9_000));
        o.submit(cmd("b", "fan", 9_500));
        assert_eq!(drain(&mut o, 9_500), ["old", "a", "b"]);
        o.acked_at("old", 1_100);
        o.acked_at("a", 9_100);
        o.acked_at("b", 9_600);
        assert!(o.is_empty());
        // The connection last worked at 10 s; the fan said `online` again (at 12 s) before
        // the hub's command connection came back.
        o.set_availability_at("fan", true, 12_000);
        assert_eq!(o.broker_lost_session(10_000), 2);
        assert_eq!(
            o.waiting(),
            ["a", "b"],
            "`old` was acknowledged long before"
        );
        assert!(!o.releasable("lamp"), "not heard from since the outage");
        assert_eq!(drain(&mut o, 12_000), ["b"]);
        o.set_availability("lamp", true);
        assert_eq!(drain(&mut o, 12_000), ["a"]);
    }

    #[test]
    fn the_outbox_survives_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let now = now_ms();
        {
            let mut o = Outbox::open(&c, Arc::new(Metrics::new())).unwrap();
            o.set_availability("lamp", true);
            for id in ["a", "b", "c"] {
                o.submit(cmd(id, "lamp", now - 5_000));
            }
            o.submit(cmd("d", "fan", now));
            assert_eq!(drain(&mut o, now), ["a", "b", "c", "d"]);
            // `a` was acknowledged long before the end: delivered. `d` just before the hub
            // died: its (embedded) broker may have died with it before delivering.
            o.acked_at("a", now - 4_000);
            o.acked_at("d", now);
            // `b` and `c` are in flight, not acknowledged, when the hub dies.
        }
        let path = c.state_file.clone().unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"add":{"id":"tor"#).unwrap();
        drop(f);
        let m = Arc::new(Metrics::new());
        let mut o = Outbox::open(&c, m.clone()).unwrap();
        assert_eq!(o.waiting(), ["b", "c", "d"]);
        // A tracked actuator counts as offline after a restart until it says online; the
        // untracked fan's command goes out at once.
        assert!(!o.releasable("lamp"));
        assert_eq!(drain(&mut o, now_ms()), ["d"]);
        o.set_availability("lamp", true);
        assert_eq!(drain(&mut o, now_ms()), ["b", "c"]);
        for id in ["b", "c", "d"] {
            o.acked_at(id, now - 10_000);
        }
        assert_eq!(Metrics::get(&m.commands_delivered_late), 3);
        // The torn line is gone after compaction; the journal now holds one `seen` line, the
        // three commands and their acknowledgements, all old enough to count as delivered.
        drop(o);
        let o = Outbox::open(&c, m).unwrap();
        assert!(o.is_empty(), "{:?}", o.waiting());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}
