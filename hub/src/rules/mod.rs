//! Rules: a TOML file of triggers, conditions and actions (reference: `docs/rules.md`).
//!
//! ```toml
//! [[rule]]
//! name = "porch light when someone is at the door"
//! cooldown_secs = 10                # optional: not again within this window
//! debounce_secs = 0                 # optional: fire once the trigger has been quiet this long
//! [rule.when]                       # the trigger; `kind = "event"` by default
//! device = "door-cam"               # patterns: exact, `*` or globs ("cam-*")
//! event = "detection"
//! class = "person"
//! min_score = 0.8
//! type = "new"                      # optional: the event's track life-cycle field
//! sub_label = "person"              # optional: a camera head's verdict (Frigate's sub_label)
//! min_sub_score = 0.7               # optional: the head's lowest probability
//! [[rule.condition]]                # all must hold
//! kind = "time"
//! after = "18:00"
//! before = "06:30"
//! [[rule.action]]
//! kind = "command"
//! actuator = "porch_light"          # -> <actuator_base>/porch_light/set
//! payload = { state = "ON", by = "{{ device }}", event_id = "{{ id }}" }
//! ```
//!
//! The first syntax (`[rule.when]` with device/event/class/min_score and `[rule.then]` with
//! actuator, payload, cooldown_secs) still loads unchanged.
//!
//! Camera events (Frigate's life cycle, `hearth_proto::mqtt::CameraEvent`) are matched on
//! what Frigate users write: `label` (the same as `class`; give one of them), `type`
//! (`new`/`update`/`end`), and the camera's own head verdict `sub_label` (a pattern; a rule
//! naming it never fires for an event without one) with `min_sub_score`.
//!
//! Other triggers: `kind = "state"` (a Zigbee2MQTT-style device's `<base>/<device>` JSON
//! attribute changes, `from`/`to`), `"availability"` (`to = "online"|"offline"`), `"time"`
//! (`at = "HH:MM[:SS]"` local time per `[settings] utc_offset`), `"interval"` (`every_secs`).
//! Conditions: `time` (after/before), `state` (device, attribute, equals, for_secs),
//! `availability` (device, is, for_secs), `score` (min), `sun` (is = "up"|"down", needs
//! `[settings] latitude/longitude`). Actions: `command`, `scene` (several commands),
//! `delay` (secs), `refresh` (model: a federated round through the hub's refresh path).
//!
//! Compilation happens once per load: payloads become [`template::Template`]s, event rules
//! are indexed by (device, event) so an event looks at the rules that can match it only,
//! and matching allocates nothing unless a rule fires.

pub mod engine;
pub mod history;
pub mod sun;
pub mod template;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hearth_proto::mqtt::{Event, InboundEvent, EVENT_TYPES};
use serde::Deserialize;
use toml::Spanned;

use template::{Fields, Template, Value};

/// Largest rendered constant part of a command payload, in bytes.
pub const MAX_COMMAND_BYTES: usize = 1024;
/// Most rules one file may hold.
pub const MAX_RULES: usize = 1000;
/// Most conditions or actions per rule, and commands per scene.
pub const MAX_PER_RULE: usize = 32;
/// Longest delay action, cooldown or debounce, in seconds.
pub const MAX_SECS: f64 = 86_400.0;
/// Most devices whose state and availability the rules engine tracks.
pub const MAX_TRACKED: usize = 1024;

/// Why a rules file was refused. Messages name the file, the rule and the line.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema (toml's message carries line and column).
    #[error("{origin}: {context}{message}")]
    Parse {
        origin: String,
        /// `rule #n ("name"): ` when the error sits inside a rule, else empty.
        context: String,
        message: String,
    },
    /// A rule parses but makes no sense.
    #[error("{origin}:{line}: rule \"{rule}\": {message}")]
    Invalid {
        origin: String,
        rule: String,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesToml {
    #[serde(default)]
    settings: Option<SettingsToml>,
    #[serde(default)]
    rule: Vec<RuleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsToml {
    utc_offset: Option<Spanned<String>>,
    latitude: Option<Spanned<f64>>,
    longitude: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    name: Spanned<String>,
    #[serde(default = "yes")]
    enabled: bool,
    cooldown_secs: Option<Spanned<f64>>,
    debounce_secs: Option<Spanned<f64>>,
    when: WhenToml,
    #[serde(default)]
    condition: Vec<ConditionToml>,
    then: Option<ThenToml>,
    #[serde(default)]
    action: Vec<ActionToml>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenToml {
    kind: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    event: Option<Spanned<String>>,
    class: Option<Spanned<String>>,
    min_score: Option<Spanned<f64>>,
    /// Frigate's name for `class`.
    label: Option<Spanned<String>>,
    #[serde(rename = "type")]
    track: Option<Spanned<String>>,
    sub_label: Option<Spanned<String>>,
    min_sub_score: Option<Spanned<f64>>,
    fields: Option<Spanned<toml::Table>>,
    attribute: Option<Spanned<String>>,
    from: Option<Spanned<toml::Value>>,
    to: Option<Spanned<toml::Value>>,
    at: Option<Spanned<String>>,
    every_secs: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThenToml {
    actuator: Spanned<String>,
    payload: Spanned<toml::Value>,
    cooldown_secs: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionToml {
    kind: Spanned<String>,
    after: Option<Spanned<String>>,
    before: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    attribute: Option<Spanned<String>>,
    equals: Option<Spanned<toml::Value>>,
    is: Option<Spanned<String>>,
    for_secs: Option<Spanned<f64>>,
    min: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionToml {
    kind: Spanned<String>,
    actuator: Option<Spanned<String>>,
    payload: Option<Spanned<toml::Value>>,
    commands: Option<Spanned<Vec<SceneCommandToml>>>,
    secs: Option<Spanned<f64>>,
    model: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SceneCommandToml {
    actuator: String,
    payload: toml::Value,
}

/// A name pattern: exact, `*` (anything) or a glob with `*` wildcards.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// Matches everything.
    Any,
    /// Matches this exact string.
    Exact(String),
    /// `*` matches any run of characters.
    Glob(String),
}

impl Pattern {
    fn compile(s: &str) -> Pattern {
        if s.chars().all(|c| c == '*') {
            Pattern::Any
        } else if s.contains('*') {
            Pattern::Glob(s.to_string())
        } else {
            Pattern::Exact(s.to_string())
        }
    }

    /// Whether `s` matches (no allocation).
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == s,
            Pattern::Glob(g) => glob(g.as_bytes(), s.as_bytes()),
        }
    }
}

/// What starts a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// A valid event on `hearth/<device>/event/<name>` (device, event, class and score are the
    /// rule's [`Rule::device`], [`Rule::event`], [`Rule::class`], [`Rule::min_score`]).
    Event {
        /// Required top-level fields of the event JSON (`type = "new"` is `("type", "new")`).
        fields: Vec<(String, serde_json::Value)>,
    },
    /// An attribute of `<base>/<device>` (JSON state) changes.
    State {
        device: String,
        attribute: String,
        from: Option<serde_json::Value>,
        to: Option<serde_json::Value>,
    },
    /// A device (`hearth/<device>/availability`) or actuator
    /// (`<base>/<device>/availability`) changes availability.
    Availability {
        device: Pattern,
        /// `Some(true)`: going online only; `Some(false)`: offline only.
        online: Option<bool>,
    },
    /// Every day at this local time (seconds after midnight).
    Time { at: u32 },
    /// Every `every`, from the load of the rules.
    Interval { every: Duration },
}

/// A condition that must hold when the trigger fires.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Local time of day within `[after, before)` (seconds after midnight; wraps midnight).
    Time { after: u32, before: u32 },
    /// `<base>/<device>`'s `attribute` equals `equals`, for at least `for_`.
    State {
        device: String,
        attribute: String,
        equals: serde_json::Value,
        for_: Duration,
    },
    /// The device is online (or offline), for at least `for_`.
    Availability {
        device: String,
        online: bool,
        for_: Duration,
    },
    /// The triggering event's score is at least `min` (false for other triggers).
    Score { min: f32 },
    /// The sun is up (or down) at the configured location.
    Sun { up: bool },
}

/// One actuator command of an action.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAction {
    /// Actuator name.
    pub actuator: String,
    /// `<base>/<actuator>/set`.
    pub topic: String,
    /// JSON payload with placeholders.
    pub payload: Template,
}

/// What a rule does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish one command.
    Command(CommandAction),
    /// Publish several commands.
    Scene(Vec<CommandAction>),
    /// Wait before the following actions.
    Delay(Duration),
    /// Ask the coordinator for a federated round of `model`.
    Refresh(String),
}

/// One rendered step of a firing.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Publish `payload` on `topic` (QoS 1, through the outbox).
    Command {
        actuator: String,
        topic: String,
        payload: String,
    },
    /// Wait.
    Delay(Duration),
    /// Start a federated round.
    Refresh(String),
}

/// A firing: the rule and its rendered steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Rule name.
    pub rule: String,
    /// What triggered it (`event hearth/door-cam/event/detection`, `time 07:00:00`, …).
    pub trigger: String,
    /// Rendered actions.
    pub steps: Vec<Step>,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule's name from the file.
    pub name: String,
    /// Line of its `name` in the file.
    pub line: usize,
    /// What starts it.
    pub trigger: Trigger,
    /// Device (topic level) pattern of an event trigger (`Any` for other triggers).
    pub device: Pattern,
    /// Event name (last topic level) pattern of an event trigger.
    pub event: Pattern,
    /// Class pattern of an event trigger.
    pub class: Pattern,
    /// Lowest score that fires an event trigger.
    pub min_score: f32,
    /// The camera head's verdict an event trigger requires (`sub_label`; `None`: any event,
    /// with or without one).
    pub sub_label: Option<Pattern>,
    /// Lowest head probability (`sub_score`) that fires; only with [`Rule::sub_label`].
    pub min_sub_score: f32,
    /// All must hold.
    pub conditions: Vec<Condition>,
    /// What it does.
    pub actions: Vec<Action>,
    /// Minimum time between two firings.
    pub cooldown: Duration,
    /// Fire only once the trigger has been quiet this long (with the last trigger's values).
    pub debounce: Duration,
    /// Milliseconds since the rule set's epoch of the last firing, plus one (0 = never).
    last_fired: AtomicU64,
    /// Time trigger: day number of the last firing, plus one; interval: next due (ms since epoch).
    timer: AtomicU64,
    /// Firings (shared with the previous load of the same rule name).
    pub(crate) fired: Arc<AtomicU64>,
}

/// `[settings]` of a rules file.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Settings {
    /// Local time = UTC + this many seconds.
    pub utc_offset_secs: i32,
    /// Latitude and longitude in degrees, for sun conditions.
    pub location: Option<(f64, f64)>,
}

impl Settings {
    /// Local seconds after midnight at `unix_ms`.
    pub fn time_of_day(&self, unix_ms: u64) -> u32 {
        (((unix_ms / 1000) as i64 + i64::from(self.utc_offset_secs)).rem_euclid(86_400)) as u32
    }

    /// Local day number at `unix_ms`.
    pub fn day(&self, unix_ms: u64) -> u64 {
        (((unix_ms / 1000) as i64 + i64::from(self.utc_offset_secs)).div_euclid(86_400)) as u64
    }
}

/// What the engine knows about devices' state (`<base>/<device>` JSON) and availability, with
/// the time each value was first seen (for `for_secs`).
#[derive(Debug, Default)]
pub struct States {
    inner: RwLock<HashMap<String, DeviceState>>,
}

#[derive(Debug, Default, Clone)]
struct DeviceState {
    attrs: HashMap<String, (serde_json::Value, u64)>,
    online: Option<(bool, u64)>,
}

/// One attribute that changed: name, old value, new value.
pub type Change = (String, Option<serde_json::Value>, serde_json::Value);

impl States {
    /// Records a state document; returns the attributes whose value changed.
    pub fn set_state(
        &self,
        device: &str,
        doc: &serde_json::Map<String, serde_json::Value>,
        now_ms: u64,
    ) -> Vec<Change> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(device) && map.len() >= MAX_TRACKED {
            return Vec::new();
        }
        let d = map.entry(device.to_string()).or_default();
        let mut changes = Vec::new();
        for (k, v) in doc {
            match d.attrs.get(k) {
                Some((old, _)) if old == v => {}
                old => {
                    changes.push((k.clone(), old.map(|(o, _)| o.clone()), v.clone()));
                    d.attrs.insert(k.clone(), (v.clone(), now_ms));
                }
            }
        }
        changes
    }

    /// Records availability; returns the previous value when it changed.
    pub fn set_availability(
        &self,
        device: &str,
        online: bool,
        now_ms: u64,
    ) -> Option<Option<bool>> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(device) && map.len() >= MAX_TRACKED {
            return None;
        }
        let d = map.entry(device.to_string()).or_default();
        let old = d.online.map(|(o, _)| o);
        if old == Some(online) {
            return None;
        }
        d.online = Some((online, now_ms));
        Some(old)
    }

    /// An attribute's value and since when it holds it (ms since the Unix epoch).
    pub fn attribute(&self, device: &str, attribute: &str) -> Option<(serde_json::Value, u64)> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.get(device)?.attrs.get(attribute).cloned()
    }

    fn attribute_holds(&self, device: &str, attribute: &str, v: &serde_json::Value) -> Option<u64> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match map.get(device)?.attrs.get(attribute) {
            Some((x, since)) if x == v => Some(*since),
            _ => None,
        }
    }

    /// Availability and since when.
    pub fn availability(&self, device: &str) -> Option<(bool, u64)> {
        let map = self.inner.read().unwrap_or_else(|p| p.into_inner());
        map.get(device)?.online
    }
}

/// What conditions are evaluated against.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    /// For cooldowns.
    pub now: Instant,
    /// Wall clock, ms since the Unix epoch.
    pub unix_ms: u64,
    /// Device states.
    pub states: &'a States,
}

/// One event as rules see it (what a trigger matches and placeholders read).
pub struct EventFields<'a> {
    pub device: &'a str,
    pub event: &'a str,
    /// The verdict: a plain event, or a camera event's
    /// ([`hearth_proto::mqtt::CameraEvent::verdict`]).
    pub ev: &'a Event,
    /// A camera event's head verdict: `sub_label` and `sub_score`.
    pub sub: Option<(&'a str, f32)>,
    /// The payload as received (for top-level fields the schema may add).
    pub raw: &'a [u8],
    pub rule: &'a str,
    parsed: std::cell::OnceCell<Option<serde_json::Map<String, serde_json::Value>>>,
}

impl<'a> EventFields<'a> {
    /// The fields of one plain event (no head verdict).
    pub fn new(device: &'a str, event: &'a str, ev: &'a Event, raw: &'a [u8]) -> Self {
        EventFields {
            device,
            event,
            ev,
            sub: None,
            raw,
            rule: "",
            parsed: std::cell::OnceCell::new(),
        }
    }

    /// The fields of an event that passed the guard: `verdict` is `inbound`'s
    /// ([`InboundEvent::verdict`]), and a camera event's head verdict comes along.
    pub fn inbound(
        device: &'a str,
        event: &'a str,
        verdict: &'a Event,
        inbound: &'a InboundEvent,
        raw: &'a [u8],
    ) -> Self {
        let mut f = EventFields::new(device, event, verdict, raw);
        if let InboundEvent::Camera(c) = inbound {
            f.sub = c.sub_label.as_deref().zip(c.sub_score);
        }
        f
    }
}

impl Fields for EventFields<'_> {
    fn field(&self, name: &str) -> Option<Value<'_>> {
        match name {
            "device" => Some(Value::Str(self.device)),
            "event" => Some(Value::Str(self.event)),
            "class" | "label" => Some(Value::Str(&self.ev.class)),
            "score" => Some(Value::Num(f64::from(self.ev.score))),
            "model" => Some(Value::Str(&self.ev.model)),
            "ts" => Some(Value::Str(&self.ev.ts)),
            "id" => self.ev.id.as_deref().map(Value::Str),
            "type" => self.ev.kind.as_deref().map(Value::Str),
            "sub_label" => self.sub.map(|(l, _)| Value::Str(l)),
            "sub_score" => self.sub.map(|(_, s)| Value::Num(f64::from(s))),
            "rule" => Some(Value::Str(self.rule)),
            other => self
                .parsed
                .get_or_init(|| serde_json::from_slice(self.raw).ok())
                .as_ref()?
                .get(other)
                .cloned()
                .map(Value::Json),
        }
    }
}

/// An event's fields with `{{ rule }}` naming the rule that fires.
struct Named<'x, 'y> {
    f: &'x EventFields<'y>,
    rule: &'x str,
}

impl Fields for Named<'_, '_> {
    fn field(&self, name: &str) -> Option<Value<'_>> {
        match name {
            "rule" => Some(Value::Str(self.rule)),
            other => self.f.field(other),
        }
    }
}

/// Placeholder values of a state, availability or timer trigger.
#[derive(Debug, Default)]
pub struct MapFields {
    pairs: Vec<(&'static str, serde_json::Value)>,
    rule: String,
}

impl MapFields {
    /// Fields from pairs.
    pub fn new(pairs: Vec<(&'static str, serde_json::Value)>) -> Self {
        MapFields {
            pairs,
            rule: String::new(),
        }
    }
}

impl Fields for MapFields {
    fn field(&self, name: &str) -> Option<Value<'_>> {
        if name == "rule" {
            return Some(Value::Str(&self.rule));
        }
        self.pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| match v {
                serde_json::Value::String(s) => Value::Str(s),
                serde_json::Value::Number(n) => Value::Num(n.as_f64().unwrap_or(0.0)),
                other => Value::Json(other.clone()),
            })
    }
}

fn json_eq_field(f: &dyn Fields, name: &str, want: &serde_json::Value) -> bool {
    match (f.field(name), want) {
        (Some(Value::Str(s)), serde_json::Value::String(w)) => s == w,
        (Some(Value::Num(n)), serde_json::Value::Number(w)) => {
            w.as_f64().is_some_and(|w| (w - n).abs() < 1e-9)
        }
        (Some(Value::Json(v)), w) => &v == w,
        _ => false,
    }
}

/// A track's `end` (a camera object gone) fires only rules that ask for `type = "end"`: a
/// rule on the class alone would otherwise fire again when the person leaves.
fn end_ok(fields: &[(String, serde_json::Value)], ev: &Event) -> bool {
    ev.kind.as_deref() != Some("end") || fields.iter().any(|(k, _)| k == "type")
}

impl Rule {
    /// Whether a plain event (no head verdict) satisfies the rule's trigger (ignores
    /// conditions and cooldown).
    pub fn matches(&self, device: &str, event_name: &str, ev: &Event) -> bool {
        self.matches_event(&EventFields::new(device, event_name, ev, b""))
    }

    /// Whether the event satisfies the rule's trigger (ignores conditions and cooldown).
    pub fn matches_event(&self, f: &EventFields<'_>) -> bool {
        let Trigger::Event { fields } = &self.trigger else {
            return false;
        };
        f.ev.score >= self.min_score
            && end_ok(fields, f.ev)
            && self.class.matches(&f.ev.class)
            && self.device.matches(f.device)
            && self.event.matches(f.event)
            && self.sub_ok(f.sub).is_ok()
            && fields.iter().all(|(k, v)| json_eq_field(f, k, v))
    }

    /// Whether the head verdict `sub` satisfies `sub_label` / `min_sub_score`; the error
    /// says why not (allocated only then).
    fn sub_ok(&self, sub: Option<(&str, f32)>) -> Result<(), String> {
        let Some(want) = &self.sub_label else {
            return Ok(());
        };
        match sub {
            None => Err(format!(
                "no head verdict (sub_label) on the event; the rule wants `{}`",
                show(want)
            )),
            Some((l, _)) if !want.matches(l) => {
                Err(format!("sub_label `{l}` is not `{}`", show(want)))
            }
            Some((_, s)) if s < self.min_sub_score => Err(format!(
                "sub_score {s} < min_sub_score {}",
                self.min_sub_score
            )),
            Some(_) => Ok(()),
        }
    }

    /// Why the event does not trigger the rule (for `hearth-hub rules test`).
    pub fn explain_event(&self, f: &EventFields<'_>) -> Result<(), String> {
        let Trigger::Event { fields } = &self.trigger else {
            return Err(format!("not an event trigger ({})", self.trigger_kind()));
        };
        if !self.device.matches(f.device) {
            return Err(format!(
                "device `{}` is not `{}`",
                f.device,
                show(&self.device)
            ));
        }
        if !self.event.matches(f.event) {
            return Err(format!(
                "event `{}` is not `{}`",
                f.event,
                show(&self.event)
            ));
        }
        if !self.class.matches(&f.ev.class) {
            return Err(format!(
                "class `{}` is not `{}`",
                f.ev.class,
                show(&self.class)
            ));
        }
        if f.ev.score < self.min_score {
            return Err(format!(
                "score {} < min_score {}",
                f.ev.score, self.min_score
            ));
        }
        self.sub_ok(f.sub)?;
        if !end_ok(fields, f.ev) {
            return Err("a track's `end` fires only rules with type = \"end\"".into());
        }
        for (k, v) in fields {
            if !json_eq_field(f, k, v) {
                return Err(format!("event field `{k}` is not {v}"));
            }
        }
        Ok(())
    }

    /// `event`, `state`, `availability`, `time` or `interval`.
    pub fn trigger_kind(&self) -> &'static str {
        match self.trigger {
            Trigger::Event { .. } => "event",
            Trigger::State { .. } => "state",
            Trigger::Availability { .. } => "availability",
            Trigger::Time { .. } => "time",
            Trigger::Interval { .. } => "interval",
        }
    }

    /// Whether every condition holds; with `explain`, the first that does not says why
    /// (without, the error is an empty string: nothing is allocated).
    pub fn conditions_hold(
        &self,
        env: &Env<'_>,
        settings: &Settings,
        score: Option<f32>,
        explain: bool,
    ) -> Result<(), String> {
        let why = |s: String| if explain { s } else { String::new() };
        for c in &self.conditions {
            match c {
                Condition::Time { after, before } => {
                    let t = settings.time_of_day(env.unix_ms);
                    let inside = if after <= before {
                        (*after..*before).contains(&t)
                    } else {
                        t >= *after || t < *before
                    };
                    if !inside {
                        return Err(why(format!(
                            "time {} is not within {}..{}",
                            hms(t),
                            hms(*after),
                            hms(*before)
                        )));
                    }
                }
                Condition::Score { min } => {
                    if score.is_none_or(|s| s < *min) {
                        return Err(why(format!("score {score:?} below {min}")));
                    }
                }
                Condition::State {
                    device,
                    attribute,
                    equals,
                    for_,
                } => match env.states.attribute_holds(device, attribute, equals) {
                    Some(since) if env.unix_ms.saturating_sub(since) >= for_.as_millis() as u64 => {
                    }
                    Some(_) => {
                        return Err(why(format!(
                            "{device}.{attribute} is {equals} for less than {}s",
                            for_.as_secs_f64()
                        )))
                    }
                    None => {
                        return Err(why(format!(
                            "{device}.{attribute} is not {equals} (now: {})",
                            env.states
                                .attribute(device, attribute)
                                .map(|(v, _)| v.to_string())
                                .unwrap_or_else(|| "unknown".into())
                        )))
                    }
                },
                Condition::Availability {
                    device,
                    online,
                    for_,
                } => match env.states.availability(device) {
                    Some((o, since))
                        if o == *online
                            && env.unix_ms.saturating_sub(since) >= for_.as_millis() as u64 => {}
                    other => {
                        return Err(why(format!(
                            "{device} is not {} for {}s (now: {})",
                            if *online { "online" } else { "offline" },
                            for_.as_secs_f64(),
                            match other {
                                Some((true, _)) => "online",
                                Some((false, _)) => "offline",
                                None => "unknown",
                            }
                        )))
                    }
                },
                Condition::Sun { up } => {
                    let Some((lat, lon)) = settings.location else {
                        return Err(why("no [settings] location".into()));
                    };
                    if sun::is_up(lat, lon, env.unix_ms) != *up {
                        return Err(why(format!(
                            "the sun is not {}",
                            if *up { "up" } else { "down" }
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Renders the rule's actions with `fields`.
    pub fn plan(&self, fields: &dyn Fields, trigger: String) -> Plan {
        let mut steps = Vec::with_capacity(self.actions.len());
        let cmd = |c: &CommandAction| Step::Command {
            actuator: c.actuator.clone(),
            topic: c.topic.clone(),
            payload: c.payload.render(fields),
        };
        for a in &self.actions {
            match a {
                Action::Command(c) => steps.push(cmd(c)),
                Action::Scene(cs) => steps.extend(cs.iter().map(cmd)),
                Action::Delay(d) => steps.push(Step::Delay(*d)),
                Action::Refresh(m) => steps.push(Step::Refresh(m.clone())),
            }
        }
        Plan {
            rule: self.name.clone(),
            trigger,
            steps,
        }
    }

    /// Claims a firing at `now_ms` (ms since the rule set's epoch) unless inside the cooldown.
    fn try_fire(&self, now_ms: u64) -> bool {
        let stamp = now_ms.saturating_add(1);
        let last = self.last_fired.load(Ordering::Acquire);
        if last != 0 && !self.cooldown.is_zero() {
            let since = stamp.saturating_sub(last);
            if u128::from(since) < self.cooldown.as_millis() {
                return false;
            }
        }
        self.last_fired
            .compare_exchange(last, stamp, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Every command action (scenes flattened).
    pub fn commands(&self) -> impl Iterator<Item = &CommandAction> {
        self.actions.iter().flat_map(|a| match a {
            Action::Command(c) => std::slice::from_ref(c),
            Action::Scene(cs) => cs.as_slice(),
            _ => &[],
        })
    }

    /// Firings since the hub started (kept across reloads of the same rule name).
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }
}

/// A pattern as written (`*` for any).
fn show(p: &Pattern) -> &str {
    match p {
        Pattern::Any => "*",
        Pattern::Exact(s) | Pattern::Glob(s) => s,
    }
}

fn hms(t: u32) -> String {
    format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60)
}

/// Event rules by (device, event): exact names hash, patterns are scanned.
#[derive(Debug, Default)]
struct Index {
    both: HashMap<String, HashMap<String, Vec<u32>>>,
    device: HashMap<String, Vec<u32>>,
    event: HashMap<String, Vec<u32>>,
    rest: Vec<u32>,
}

impl Index {
    fn add(&mut self, i: u32, device: &Pattern, event: &Pattern) {
        match (device, event) {
            (Pattern::Exact(d), Pattern::Exact(e)) => self
                .both
                .entry(d.clone())
                .or_default()
                .entry(e.clone())
                .or_default()
                .push(i),
            (Pattern::Exact(d), _) => self.device.entry(d.clone()).or_default().push(i),
            (_, Pattern::Exact(e)) => self.event.entry(e.clone()).or_default().push(i),
            _ => self.rest.push(i),
        }
    }

    /// The candidate rules of an event, in file order (a merge of four sorted lists).
    fn candidates<'a>(&'a self, device: &str, event: &str) -> [&'a [u32]; 4] {
        let both = self
            .both
            .get(device)
            .and_then(|m| m.get(event))
            .map_or(&[][..], Vec::as_slice);
        let d = self.device.get(device).map_or(&[][..], Vec::as_slice);
        let e = self.event.get(event).map_or(&[][..], Vec::as_slice);
        [both, d, e, &self.rest]
    }
}

/// Merges sorted lists without allocating.
fn merged(mut lists: [&[u32]; 4]) -> impl Iterator<Item = u32> + '_ {
    std::iter::from_fn(move || {
        let (k, _) = lists
            .iter()
            .enumerate()
            .filter_map(|(k, l)| l.first().map(|v| (k, *v)))
            .min_by_key(|(_, v)| *v)?;
        let v = lists[k][0];
        lists[k] = &lists[k][1..];
        Some(v)
    })
}

/// The loaded rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    epoch: Instant,
    settings: Settings,
    index: Index,
    /// Indices of state, availability and timer rules.
    state_rules: Vec<u32>,
    availability_rules: Vec<u32>,
    timer_rules: Vec<u32>,
    /// Actuators whose `<base>/<name>/availability` matters (commands, availability rules).
    watched_availability: HashSet<String>,
    /// Devices whose `<base>/<name>` state matters.
    watched_state: HashSet<String>,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

fn secs_field(
    v: &Option<Spanned<f64>>,
    what: &str,
    max: f64,
    invalid: &dyn Fn(std::ops::Range<usize>, String) -> RulesError,
) -> Result<Duration, RulesError> {
    match v {
        None => Ok(Duration::ZERO),
        Some(c) if c.get_ref().is_finite() && (0.0..=max).contains(c.get_ref()) => {
            Ok(Duration::from_secs_f64(*c.get_ref()))
        }
        Some(c) => Err(invalid(
            c.span(),
            format!("{what} {} must be within 0..={max}", c.get_ref()),
        )),
    }
}

/// `HH:MM` or `HH:MM:SS` → seconds after midnight.
fn parse_hms(s: &str) -> Option<u32> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let n: Vec<u32> = parts
        .iter()
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    (h < 24 && m < 60 && sec < 60).then_some(h * 3600 + m * 60 + sec)
}

/// `+HH:MM` / `-HH:MM` / `Z` → seconds.
fn parse_offset(s: &str) -> Option<i32> {
    if s == "Z" || s == "UTC" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let t = parse_hms(rest)?;
    (t <= 14 * 3600 && t % 60 == 0).then_some(sign * t as i32)
}

fn scalar(v: &toml::Value) -> Option<serde_json::Value> {
    match v {
        toml::Value::String(_)
        | toml::Value::Integer(_)
        | toml::Value::Float(_)
        | toml::Value::Boolean(_) => serde_json::to_value(v).ok(),
        _ => None,
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "*_-.:@+ ".contains(c))
}
/// Iterative `*` glob match with single-star backtracking: O(|p|·|s|) worst case.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Which fields a trigger or condition of `kind` may use; the first other present one is an error.
fn only(
    kind: &str,
    present: &[(&str, Option<std::ops::Range<usize>>)],
    allowed: &[&str],
    section: &str,
    invalid: &dyn Fn(std::ops::Range<usize>, String) -> RulesError,
) -> Result<(), RulesError> {
    for (name, span) in present {
        if let Some(span) = span {
            if !allowed.contains(name) {
                return Err(invalid(
                    span.clone(),
                    format!("{section}.{name} does not apply to kind = \"{kind}\""),
                ));
            }
        }
    }
    Ok(())
}

fn span_of<T>(v: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
    v.as_ref().map(|s| s.span())
}

fn compile_command(
    actuator: &str,
    payload: &toml::Value,
    what: &str,
    actuator_base: &str,
) -> Result<CommandAction, String> {
    check_actuator(actuator, what)?;
    let toml::Value::Table(t) = payload else {
        return Err(format!(
            "{what}.payload must be a table, e.g. {{ state = \"ON\" }}"
        ));
    };
    if t.is_empty() {
        return Err(format!("{what}.payload is empty"));
    }
    if let Some(s) = t.get("state") {
        let templated = s.as_str().is_some_and(|s| s.contains("{{"));
        if !templated && !matches!(s.as_str(), Some("ON" | "OFF" | "TOGGLE")) {
            return Err(format!(
                "{what}.payload.state must be \"ON\", \"OFF\" or \"TOGGLE\""
            ));
        }
    }
    let payload = Template::compile(payload).map_err(|e| format!("{what}.payload: {e}"))?;
    if payload.literal_len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "{what}.payload renders to {} bytes; at most {MAX_COMMAND_BYTES}",
            payload.literal_len()
        ));
    }
    Ok(CommandAction {
        topic: format!("{actuator_base}/{actuator}/set"),
        actuator: actuator.to_string(),
        payload,
    })
}

impl RuleSet {
    /// No rules.
    pub fn empty() -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            epoch: Instant::now(),
            settings: Settings::default(),
            index: Index::default(),
            state_rules: Vec::new(),
            availability_rules: Vec::new(),
            timer_rules: Vec::new(),
            watched_availability: HashSet::new(),
            watched_state: HashSet::new(),
        }
    }

    /// Reads and compiles a rules file.
    pub fn load(path: &Path, actuator_base: &str) -> Result<RuleSet, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RuleSet::parse(&text, &path.display().to_string(), actuator_base)
    }

    /// Compiles rules from TOML text; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str, actuator_base: &str) -> Result<RuleSet, RulesError> {
        let file: RulesToml = toml::from_str(text).map_err(|e| RulesError::Parse {
            origin: origin.to_string(),
            context: e
                .span()
                .and_then(|s| rule_context(text, s.start))
                .unwrap_or_default(),
            message: e.message().trim_end().to_string() + &location(text, e.span()),
        })?;
        if file.rule.len() > MAX_RULES {
            return Err(RulesError::Parse {
                origin: origin.to_string(),
                context: String::new(),
                message: format!("{} rules; at most {MAX_RULES} allowed", file.rule.len()),
            });
        }
        let mut set = RuleSet::empty();
        if let Some(s) = &file.settings {
            let bad = |span: std::ops::Range<usize>, message: String| RulesError::Parse {
                origin: origin.to_string(),
                context: String::new(),
                message: format!("{message} (line {})", line_of(text, span.start)),
            };
            if let Some(o) = &s.utc_offset {
                set.settings.utc_offset_secs = parse_offset(o.get_ref()).ok_or_else(|| {
                    bad(
                        o.span(),
                        format!(
                            "settings.utc_offset `{}` must be like \"+01:00\" or \"-05:30\"",
                            o.get_ref()
                        ),
                    )
                })?;
            }
            match (&s.latitude, &s.longitude) {
                (None, None) => {}
                (Some(la), Some(lo)) => {
                    if !(-90.0..=90.0).contains(la.get_ref())
                        || !(-180.0..=180.0).contains(lo.get_ref())
                    {
                        return Err(bad(
                            la.span(),
                            "settings.latitude must be within -90..=90 and longitude within -180..=180"
                                .into(),
                        ));
                    }
                    set.settings.location = Some((*la.get_ref(), *lo.get_ref()));
                }
                (Some(x), None) | (None, Some(x)) => {
                    return Err(bad(
                        x.span(),
                        "settings.latitude and settings.longitude go together".into(),
                    ))
                }
            }
        }
        let mut names: HashSet<String> = HashSet::new();
        for r in file.rule {
            let name = r.name.get_ref().trim().to_string();
            let invalid = |span: std::ops::Range<usize>, message: String| RulesError::Invalid {
                origin: origin.to_string(),
                rule: if name.is_empty() {
                    "<unnamed>".into()
                } else {
                    name.clone()
                },
                line: line_of(text, span.start),
                message,
            };
            if name.is_empty() || name.len() > 200 {
                return Err(invalid(
                    r.name.span(),
                    "name must be 1-200 characters".into(),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(r.name.span(), "duplicate rule name".into()));
            }
            let w = &r.when;
            let pattern =
                |field: &Option<Spanned<String>>, what: &str| -> Result<Pattern, RulesError> {
                    let Some(f) = field else {
                        return Ok(Pattern::Any);
                    };
                    if name_ok(f.get_ref()) {
                        Ok(Pattern::compile(f.get_ref()))
                    } else {
                        Err(invalid(
                            f.span(),
                            format!(
                                "{what} `{}` must be 1-64 characters of [A-Za-z0-9_-.:@+ ] or `*`",
                                f.get_ref()
                            ),
                        ))
                    }
                };
            let exact = |field: &Option<Spanned<String>>,
                         what: &str,
                         at: std::ops::Range<usize>|
             -> Result<String, RulesError> {
                match pattern(field, what)? {
                    Pattern::Exact(s) => Ok(s),
                    _ if field.is_none() => Err(invalid(at, format!("{what} is required"))),
                    _ => Err(invalid(
                        span_of(field).unwrap_or(at),
                        format!("{what} must be an exact device name here (no `*`)"),
                    )),
                }
            };
            let kind = w.kind.as_ref().map_or("event", |k| k.get_ref().as_str());
            let kind_span = w.kind.as_ref().map_or(r.name.span(), |k| k.span());
            let present = [
                ("device", span_of(&w.device)),
                ("event", span_of(&w.event)),
                ("class", span_of(&w.class)),
                ("label", span_of(&w.label)),
                ("min_score", span_of(&w.min_score)),
                ("type", span_of(&w.track)),
                ("sub_label", span_of(&w.sub_label)),
                ("min_sub_score", span_of(&w.min_sub_score)),
                ("fields", span_of(&w.fields)),
                ("attribute", span_of(&w.attribute)),
                ("from", span_of(&w.from)),
                ("to", span_of(&w.to)),
                ("at", span_of(&w.at)),
                ("every_secs", span_of(&w.every_secs)),
            ];
            let (mut device, mut event, mut class, mut min_score) =
                (Pattern::Any, Pattern::Any, Pattern::Any, 0.0f32);
            let (mut sub_label, mut min_sub_score) = (None, 0.0f32);
            let probability = |v: &Option<Spanned<f64>>, what: &str| match v {
                None => Ok(0.0),
                Some(s) if (0.0..=1.0).contains(s.get_ref()) => Ok(*s.get_ref() as f32),
                Some(s) => Err(invalid(
                    s.span(),
                    format!("when.{what} {} must be within 0..=1", s.get_ref()),
                )),
            };
            let trigger = match kind {
                "event" => {
                    only(
                        kind,
                        &present,
                        &[
                            "device",
                            "event",
                            "class",
                            "label",
                            "min_score",
                            "type",
                            "sub_label",
                            "min_sub_score",
                            "fields",
                        ],
                        "when",
                        &invalid,
                    )?;
                    device = pattern(&w.device, "when.device")?;
                    event = pattern(&w.event, "when.event")?;
                    class = match (&w.class, &w.label) {
                        (Some(_), Some(l)) => {
                            return Err(invalid(
                                l.span(),
                                "when.label is Frigate's name for when.class: give one of them"
                                    .into(),
                            ))
                        }
                        (_, Some(_)) => pattern(&w.label, "when.label")?,
                        _ => pattern(&w.class, "when.class")?,
                    };
                    min_score = probability(&w.min_score, "min_score")?;
                    // A head probability without a label: any verdict at that probability.
                    if w.sub_label.is_some() || w.min_sub_score.is_some() {
                        sub_label = Some(pattern(&w.sub_label, "when.sub_label")?);
                    }
                    min_sub_score = probability(&w.min_sub_score, "min_sub_score")?;
                    let mut fields = Vec::new();
                    if let Some(t) = &w.track {
                        if !EVENT_TYPES.contains(&t.get_ref().as_str()) {
                            return Err(invalid(
                                t.span(),
                                format!(
                                    "when.type `{}` must be one of {}",
                                    t.get_ref(),
                                    EVENT_TYPES.join(", ")
                                ),
                            ));
                        }
                        fields.push(("type".to_string(), serde_json::json!(t.get_ref())));
                    }
                    if let Some(fs) = &w.fields {
                        for (k, v) in fs.get_ref() {
                            let Some(v) = scalar(v) else {
                                return Err(invalid(
                                    fs.span(),
                                    format!("when.fields.{k} must be a string, number or boolean"),
                                ));
                            };
                            fields.push((k.clone(), v));
                        }
                    }
                    Trigger::Event { fields }
                }
                "state" => {
                    only(
                        kind,
                        &present,
                        &["device", "attribute", "from", "to"],
                        "when",
                        &invalid,
                    )?;
                    let device = exact(&w.device, "when.device", kind_span.clone())?;
                    let sc = |v: &Option<Spanned<toml::Value>>, what: &str| match v {
                        None => Ok(None),
                        Some(x) => scalar(x.get_ref()).map(Some).ok_or_else(|| {
                            invalid(
                                x.span(),
                                format!("when.{what} must be a string, number or boolean"),
                            )
                        }),
                    };
                    Trigger::State {
                        device,
                        attribute: w
                            .attribute
                            .as_ref()
                            .map_or("state".to_string(), |a| a.get_ref().clone()),
                        from: sc(&w.from, "from")?,
                        to: sc(&w.to, "to")?,
                    }
                }
                "availability" => {
                    only(kind, &present, &["device", "to"], "when", &invalid)?;
                    let online = match &w.to {
                        None => None,
                        Some(t) => match t.get_ref().as_str() {
                            Some("online") => Some(true),
                            Some("offline") => Some(false),
                            _ => {
                                return Err(invalid(
                                    t.span(),
                                    "when.to must be \"online\" or \"offline\"".into(),
                                ))
                            }
                        },
                    };
                    Trigger::Availability {
                        device: pattern(&w.device, "when.device")?,
                        online,
                    }
                }
                "time" => {
                    only(kind, &present, &["at"], "when", &invalid)?;
                    let Some(at) = &w.at else {
                        return Err(invalid(kind_span, "when.at (\"HH:MM\") is required".into()));
                    };
                    Trigger::Time {
                        at: parse_hms(at.get_ref()).ok_or_else(|| {
                            invalid(
                                at.span(),
                                format!(
                                    "when.at `{}` must be \"HH:MM\" or \"HH:MM:SS\"",
                                    at.get_ref()
                                ),
                            )
                        })?,
                    }
                }
                "interval" => {
                    only(kind, &present, &["every_secs"], "when", &invalid)?;
                    match &w.every_secs {
                        Some(e)
                            if e.get_ref().is_finite()
                                && (1.0..=MAX_SECS).contains(e.get_ref()) =>
                        {
                            Trigger::Interval {
                                every: Duration::from_secs_f64(*e.get_ref()),
                            }
                        }
                        Some(e) => {
                            return Err(invalid(
                                e.span(),
                                format!(
                                    "when.every_secs {} must be within 1..={MAX_SECS}",
                                    e.get_ref()
                                ),
                            ))
                        }
                        None => {
                            return Err(invalid(kind_span, "when.every_secs is required".into()))
                        }
                    }
                }
                other => {
                    return Err(invalid(
                        kind_span,
                        format!(
                        "when.kind `{other}` must be event, state, availability, time or interval"
                    ),
                    ))
                }
            };

            // Conditions.
            if r.condition.len() > MAX_PER_RULE {
                return Err(invalid(
                    r.name.span(),
                    format!("at most {MAX_PER_RULE} conditions"),
                ));
            }
            let mut conditions = Vec::with_capacity(r.condition.len());
            for c in &r.condition {
                let kind = c.kind.get_ref().as_str();
                let present = [
                    ("after", span_of(&c.after)),
                    ("before", span_of(&c.before)),
                    ("device", span_of(&c.device)),
                    ("attribute", span_of(&c.attribute)),
                    ("equals", span_of(&c.equals)),
                    ("is", span_of(&c.is)),
                    ("for_secs", span_of(&c.for_secs)),
                    ("min", span_of(&c.min)),
                ];
                let for_ = secs_field(&c.for_secs, "condition.for_secs", MAX_SECS, &invalid)?;
                conditions.push(match kind {
                    "time" => {
                        only(kind, &present, &["after", "before"], "condition", &invalid)?;
                        let t = |v: &Option<Spanned<String>>, what: &str, default: u32| match v {
                            None => Ok(default),
                            Some(s) => parse_hms(s.get_ref()).ok_or_else(|| {
                                invalid(s.span(), format!("condition.{what} `{}` must be \"HH:MM\" or \"HH:MM:SS\"", s.get_ref()))
                            }),
                        };
                        if c.after.is_none() && c.before.is_none() {
                            return Err(invalid(c.kind.span(), "a time condition needs after and/or before".into()));
                        }
                        Condition::Time {
                            after: t(&c.after, "after", 0)?,
                            before: t(&c.before, "before", 86_400)?,
                        }
                    }
                    "state" => {
                        only(kind, &present, &["device", "attribute", "equals", "for_secs"], "condition", &invalid)?;
                        let device = exact(&c.device, "condition.device", c.kind.span())?;
                        let Some(eq) = &c.equals else {
                            return Err(invalid(c.kind.span(), "condition.equals is required".into()));
                        };
                        Condition::State {
                            device,
                            attribute: c.attribute.as_ref().map_or("state".into(), |a| a.get_ref().clone()),
                            equals: scalar(eq.get_ref()).ok_or_else(|| {
                                invalid(eq.span(), "condition.equals must be a string, number or boolean".into())
                            })?,
                            for_,
                        }
                    }
                    "availability" => {
                        only(kind, &present, &["device", "is", "for_secs"], "condition", &invalid)?;
                        let device = exact(&c.device, "condition.device", c.kind.span())?;
                        let online = match c.is.as_ref().map(|s| s.get_ref().as_str()) {
                            None | Some("online") => true,
                            Some("offline") => false,
                            Some(_) => {
                                return Err(invalid(
                                    span_of(&c.is).unwrap_or(c.kind.span()),
                                    "condition.is must be \"online\" or \"offline\"".into(),
                                ))
                            }
                        };
                        Condition::Availability { device, online, for_ }
                    }
                    "score" => {
                        only(kind, &present, &["min"], "condition", &invalid)?;
                        match &c.min {
                            Some(m) if (0.0..=1.0).contains(m.get_ref()) => Condition::Score {
                                min: *m.get_ref() as f32,
                            },
                            Some(m) => {
                                return Err(invalid(m.span(), format!("condition.min {} must be within 0..=1", m.get_ref())))
                            }
                            None => return Err(invalid(c.kind.span(), "condition.min is required".into())),
                        }
                    }
                    "sun" => {
                        only(kind, &present, &["is"], "condition", &invalid)?;
                        if set.settings.location.is_none() {
                            return Err(invalid(
                                c.kind.span(),
                                "a sun condition needs [settings] latitude and longitude".into(),
                            ));
                        }
                        let up = match c.is.as_ref().map(|s| s.get_ref().as_str()) {
                            Some("up") => true,
                            Some("down") => false,
                            _ => {
                                return Err(invalid(
                                    span_of(&c.is).unwrap_or(c.kind.span()),
                                    "condition.is must be \"up\" or \"down\"".into(),
                                ))
                            }
                        };
                        Condition::Sun { up }
                    }
                    other => {
                        return Err(invalid(
                            c.kind.span(),
                            format!("condition.kind `{other}` must be time, state, availability, score or sun"),
                        ))
                    }
                });
            }

            // Actions.
            let mut actions = Vec::new();
            let mut cooldown = secs_field(&r.cooldown_secs, "cooldown_secs", MAX_SECS, &invalid)?;
            if let Some(t) = &r.then {
                let c = compile_command(
                    t.actuator.get_ref(),
                    t.payload.get_ref(),
                    "then",
                    actuator_base,
                )
                .map_err(|m| {
                    let span = if m.starts_with("then.actuator") {
                        t.actuator.span()
                    } else {
                        t.payload.span()
                    };
                    invalid(span, m)
                })?;
                actions.push(Action::Command(c));
                if t.cooldown_secs.is_some() {
                    if r.cooldown_secs.is_some() {
                        return Err(invalid(
                            span_of(&t.cooldown_secs).unwrap_or(r.name.span()),
                            "cooldown_secs is given twice (rule and then)".into(),
                        ));
                    }
                    cooldown =
                        secs_field(&t.cooldown_secs, "then.cooldown_secs", MAX_SECS, &invalid)?;
                }
            }
            if r.action.len() > MAX_PER_RULE {
                return Err(invalid(
                    r.name.span(),
                    format!("at most {MAX_PER_RULE} actions"),
                ));
            }
            for a in &r.action {
                let kind = a.kind.get_ref().as_str();
                let present = [
                    ("actuator", span_of(&a.actuator)),
                    ("payload", span_of(&a.payload)),
                    ("commands", span_of(&a.commands)),
                    ("secs", span_of(&a.secs)),
                    ("model", span_of(&a.model)),
                ];
                actions.push(match kind {
                    "command" => {
                        only(kind, &present, &["actuator", "payload"], "action", &invalid)?;
                        let (Some(act), Some(p)) = (&a.actuator, &a.payload) else {
                            return Err(invalid(
                                a.kind.span(),
                                "a command needs actuator and payload".into(),
                            ));
                        };
                        Action::Command(
                            compile_command(act.get_ref(), p.get_ref(), "action", actuator_base)
                                .map_err(|m| {
                                    invalid(
                                        if m.starts_with("action.actuator") {
                                            act.span()
                                        } else {
                                            p.span()
                                        },
                                        m,
                                    )
                                })?,
                        )
                    }
                    "scene" => {
                        only(kind, &present, &["commands"], "action", &invalid)?;
                        let Some(cs) = &a.commands else {
                            return Err(invalid(
                                a.kind.span(),
                                "a scene needs commands = [{ actuator, payload }, …]".into(),
                            ));
                        };
                        if cs.get_ref().is_empty() || cs.get_ref().len() > MAX_PER_RULE {
                            return Err(invalid(
                                cs.span(),
                                format!("a scene has 1..={MAX_PER_RULE} commands"),
                            ));
                        }
                        let mut out = Vec::new();
                        for c in cs.get_ref() {
                            out.push(
                                compile_command(
                                    &c.actuator,
                                    &c.payload,
                                    "action.commands",
                                    actuator_base,
                                )
                                .map_err(|m| invalid(cs.span(), m))?,
                            );
                        }
                        Action::Scene(out)
                    }
                    "delay" => {
                        only(kind, &present, &["secs"], "action", &invalid)?;
                        if a.secs.is_none() {
                            return Err(invalid(a.kind.span(), "a delay needs secs".into()));
                        }
                        Action::Delay(secs_field(&a.secs, "action.secs", MAX_SECS, &invalid)?)
                    }
                    "refresh" => {
                        only(kind, &present, &["model"], "action", &invalid)?;
                        match &a.model {
                            Some(m) if hearth_proto::mqtt::valid_name(m.get_ref()) => {
                                Action::Refresh(m.get_ref().clone())
                            }
                            Some(m) => {
                                return Err(invalid(
                                    m.span(),
                                    format!(
                                        "action.model `{}` is not a valid model name",
                                        m.get_ref()
                                    ),
                                ))
                            }
                            None => {
                                return Err(invalid(a.kind.span(), "a refresh needs model".into()))
                            }
                        }
                    }
                    other => {
                        return Err(invalid(
                            a.kind.span(),
                            format!(
                                "action.kind `{other}` must be command, scene, delay or refresh"
                            ),
                        ))
                    }
                });
            }
            if actions.is_empty() {
                return Err(invalid(
                    r.name.span(),
                    "no action: give [rule.then] or [[rule.action]]".into(),
                ));
            }
            let debounce = secs_field(&r.debounce_secs, "debounce_secs", MAX_SECS, &invalid)?;
            if !r.enabled {
                continue;
            }
            set.rules.push(Rule {
                name,
                line: line_of(text, r.name.span().start),
                trigger,
                device,
                event,
                class,
                min_score,
                sub_label,
                min_sub_score,
                conditions,
                actions,
                cooldown,
                debounce,
                last_fired: AtomicU64::new(0),
                timer: AtomicU64::new(0),
                fired: Arc::default(),
            });
        }
        set.build();
        Ok(set)
    }

    fn build(&mut self) {
        for (i, r) in self.rules.iter().enumerate() {
            let i = i as u32;
            match &r.trigger {
                Trigger::Event { .. } => self.index.add(i, &r.device, &r.event),
                Trigger::State { device, .. } => {
                    self.state_rules.push(i);
                    self.watched_state.insert(device.clone());
                }
                Trigger::Availability { device, .. } => {
                    self.availability_rules.push(i);
                    if let Pattern::Exact(d) = device {
                        self.watched_availability.insert(d.clone());
                    }
                }
                Trigger::Time { .. } | Trigger::Interval { .. } => self.timer_rules.push(i),
            }
            for c in r.commands() {
                self.watched_availability.insert(c.actuator.clone());
            }
            for c in &r.conditions {
                match c {
                    Condition::State { device, .. } => {
                        self.watched_state.insert(device.clone());
                    }
                    Condition::Availability { device, .. } => {
                        self.watched_availability.insert(device.clone());
                    }
                    _ => {}
                }
            }
        }
    }

    /// The enabled rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The file's `[settings]`.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Number of enabled rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no enabled rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Names whose `<base>/<name>/availability` the hub follows: every actuator a command
    /// goes to, and exact devices of availability triggers and conditions.
    pub fn watched_availability(&self) -> impl Iterator<Item = &str> {
        self.watched_availability.iter().map(String::as_str)
    }

    /// Whether `<base>/<name>/availability` matters.
    pub fn watches_availability(&self, name: &str) -> bool {
        self.watched_availability.contains(name)
    }

    /// Devices whose `<base>/<name>` state document the rules read.
    pub fn watched_state(&self) -> impl Iterator<Item = &str> {
        self.watched_state.iter().map(String::as_str)
    }

    /// Whether `<base>/<name>` state matters.
    pub fn watches_state(&self, name: &str) -> bool {
        self.watched_state.contains(name)
    }

    fn since_epoch_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Claims a firing of `rule` at `now` unless inside its cooldown (for debounced rules,
    /// whose firing is decided when the debounce ends).
    pub fn claim(&self, rule: &Rule, now: Instant) -> bool {
        rule.try_fire(self.since_epoch_ms(now))
    }

    /// Calls `fire` for every rule the event `f` triggers whose conditions hold at `env`:
    /// with the rendered plan, after claiming the cooldown unless the rule is debounced (the
    /// caller then claims when the debounce ends). Returns (matched, fired): rules whose
    /// trigger and conditions held, and of them how many were not suppressed by a cooldown.
    pub fn on_event<'a>(
        &'a self,
        f: EventFields<'_>,
        env: &Env<'_>,
        mut fire: impl FnMut(&'a Rule, Plan),
    ) -> (usize, usize) {
        let now_ms = self.since_epoch_ms(env.now);
        let (device, event_name) = (f.device, f.event);
        let (mut matched, mut fired) = (0, 0);
        for i in merged(self.index.candidates(device, event_name)) {
            let r = &self.rules[i as usize];
            if !r.matches_event(&f)
                || r.conditions_hold(env, &self.settings, Some(f.ev.score), false)
                    .is_err()
            {
                continue;
            }
            matched += 1;
            if !r.debounce.is_zero() || r.try_fire(now_ms) {
                fired += 1;
                let named = Named {
                    f: &f,
                    rule: &r.name,
                };
                let plan = r.plan(&named, format!("event hearth/{device}/event/{event_name}"));
                fire(r, plan);
            }
        }
        (matched, fired)
    }

    /// Compatibility form of [`RuleSet::on_event`] without conditions' state: calls `fire`
    /// for every event rule the event triggers that is outside its cooldown. Returns how
    /// many rules matched.
    pub fn dispatch<'a>(
        &'a self,
        device: &str,
        event_name: &str,
        ev: &Event,
        now: Instant,
        mut fire: impl FnMut(&'a Rule),
    ) -> usize {
        let states = States::default();
        let env = Env {
            now,
            unix_ms: crate::delivery::now_ms(),
            states: &states,
        };
        let f = EventFields::new(device, event_name, ev, b"");
        self.on_event(f, &env, |r, _| fire(r)).0
    }

    /// A state document arrived for `device`: records it in `env.states` and fires the
    /// state rules whose attribute changed as they want.
    pub fn on_state<'a>(
        &'a self,
        device: &str,
        doc: &serde_json::Map<String, serde_json::Value>,
        env: &Env<'_>,
        mut fire: impl FnMut(&'a Rule, Plan),
    ) {
        let changes = env.states.set_state(device, doc, env.unix_ms);
        if changes.is_empty() {
            return;
        }
        let now_ms = self.since_epoch_ms(env.now);
        for &i in &self.state_rules {
            let r = &self.rules[i as usize];
            let Trigger::State {
                device: d,
                attribute,
                from,
                to,
            } = &r.trigger
            else {
                continue;
            };
            if d != device {
                continue;
            }
            for (attr, old, new) in &changes {
                if attr != attribute
                    || to.as_ref().is_some_and(|t| t != new)
                    || from.as_ref().is_some_and(|f| old.as_ref() != Some(f))
                    || r.conditions_hold(env, &self.settings, None, false).is_err()
                {
                    continue;
                }
                if r.debounce.is_zero() && !r.try_fire(now_ms) {
                    continue;
                }
                let mut f = MapFields::new(vec![
                    ("device", serde_json::json!(device)),
                    ("attribute", serde_json::json!(attr)),
                    ("value", new.clone()),
                    ("from", old.clone().unwrap_or(serde_json::Value::Null)),
                ]);
                f.rule = r.name.clone();
                let plan = r.plan(&f, format!("state {device}.{attr} = {new}"));
                fire(r, plan);
            }
        }
    }

    /// `device` reported availability: records it and fires the availability rules.
    pub fn on_availability<'a>(
        &'a self,
        device: &str,
        online: bool,
        env: &Env<'_>,
        mut fire: impl FnMut(&'a Rule, Plan),
    ) {
        if env
            .states
            .set_availability(device, online, env.unix_ms)
            .is_none()
        {
            return;
        }
        let now_ms = self.since_epoch_ms(env.now);
        let word = if online { "online" } else { "offline" };
        for &i in &self.availability_rules {
            let r = &self.rules[i as usize];
            let Trigger::Availability {
                device: d,
                online: want,
            } = &r.trigger
            else {
                continue;
            };
            if !d.matches(device)
                || want.is_some_and(|w| w != online)
                || r.conditions_hold(env, &self.settings, None, false).is_err()
                || (r.debounce.is_zero() && !r.try_fire(now_ms))
            {
                continue;
            }
            let mut f = MapFields::new(vec![
                ("device", serde_json::json!(device)),
                ("availability", serde_json::json!(word)),
                ("value", serde_json::json!(word)),
            ]);
            f.rule = r.name.clone();
            let plan = r.plan(&f, format!("availability {device} {word}"));
            fire(r, plan);
        }
    }

    /// Fires the time and interval rules that are due at `env` (call every few hundred ms).
    pub fn on_tick<'a>(&'a self, env: &Env<'_>, mut fire: impl FnMut(&'a Rule, Plan)) {
        let now_ms = self.since_epoch_ms(env.now);
        for &i in &self.timer_rules {
            let r = &self.rules[i as usize];
            let trigger = match &r.trigger {
                Trigger::Time { at } => {
                    let tod = self.settings.time_of_day(env.unix_ms);
                    let day = self.settings.day(env.unix_ms) + 1;
                    // Due from `at` for a minute (a hub started later that day does not
                    // fire a morning rule at noon).
                    if tod < *at || tod >= at + 60 || r.timer.load(Ordering::Acquire) == day {
                        continue;
                    }
                    r.timer.store(day, Ordering::Release);
                    format!("time {}", hms(*at))
                }
                Trigger::Interval { every } => {
                    let due = r.timer.load(Ordering::Acquire);
                    let every_ms = every.as_millis() as u64;
                    if due == 0 {
                        r.timer.store(now_ms + every_ms, Ordering::Release);
                        continue;
                    }
                    if now_ms < due {
                        continue;
                    }
                    r.timer.store(now_ms + every_ms, Ordering::Release);
                    format!("interval {}s", every.as_secs_f64())
                }
                _ => continue,
            };
            if r.conditions_hold(env, &self.settings, None, false).is_err()
                || (r.debounce.is_zero() && !r.try_fire(now_ms))
            {
                continue;
            }
            let mut f = MapFields::new(Vec::new());
            f.rule = r.name.clone();
            let plan = r.plan(&f, trigger);
            fire(r, plan);
        }
    }

    /// Takes over the cooldown and timer state, epoch and counters of the rules of `old`
    /// with the same name (a reload does not re-fire a rule inside its cooldown).
    pub(crate) fn inherit(&mut self, old: &RuleSet) {
        self.epoch = old.epoch;
        let by_name: HashMap<&str, &Rule> =
            old.rules.iter().map(|r| (r.name.as_str(), r)).collect();
        for r in &mut self.rules {
            if let Some(o) = by_name.get(r.name.as_str()) {
                r.last_fired = AtomicU64::new(o.last_fired.load(Ordering::Acquire));
                if o.trigger == r.trigger {
                    r.timer = AtomicU64::new(o.timer.load(Ordering::Acquire));
                }
                r.fired = o.fired.clone();
            }
        }
    }
}

fn check_actuator(a: &str, what: &str) -> Result<(), String> {
    // Zigbee2MQTT friendly names may contain spaces and `/`; refuse only what breaks topics.
    if a.is_empty()
        || a.len() > 128
        || a.contains(['+', '#'])
        || a.chars().any(char::is_control)
        || a.split('/').any(|l| l.trim().is_empty())
        || a.ends_with("/set")
        || a == "set"
        || a.starts_with("bridge/")
    {
        Err(format!(
            "{what}.actuator `{a}` is not a usable actuator name (no wildcards, empty levels, \
             trailing `/set` or `bridge/` topics)"
        ))
    } else {
        Ok(())
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => format!(" (line {})", line_of(text, s.start)),
        None => String::new(),
    }
}

/// `rule #n ("name"): ` for the `[[rule]]` block containing `offset`, if any.
fn rule_context(text: &str, offset: usize) -> Option<String> {
    let upto_line = line_of(text, offset);
    let mut index = 0;
    let mut name: Option<String> = None;
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with("[[")
            && l.trim_start_matches('[').trim_start().starts_with("rule")
            && l.trim_end_matches(']').trim_end().ends_with("rule")
        {
            if i + 1 > upto_line {
                break;
            }
            index += 1;
            name = None;
            inside = true;
        } else if l.starts_with('[') && !l.starts_with("[rule.") {
            if i + 1 > upto_line {
                break;
            }
            inside = false;
        } else if inside && name.is_none() {
            if let Some(rest) = l.strip_prefix("name") {
                if let Some(v) = rest.trim_start().strip_prefix('=') {
                    let v = v.trim();
                    name = Some(v.trim_matches(|c| c == '"' || c == '\'').to_string());
                }
            }
        }
    }
    if !inside {
        return None;
    }
    Some(match name {
        Some(n) => format!("rule #{index} (\"{n}\"): "),
        None => format!("rule #{index}: "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_proto::mqtt::{parse_event, CameraEvent, TrackPhase};

    const PORCH: &str = r#"
[[rule]]
name = "porch light when someone is at the door"
[rule.when]
device = "door-cam"
event = "detection"
class = "person"
min_score = 0.8
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
cooldown_secs = 10
"#;

    /// The one test event builder: [`ev`] is a plain verdict (id `ev-1`, a new track),
    /// [`cam`] a camera track event; `.kind(..)` sets the life cycle, `.sub(..)` the camera
    /// head's verdict. [`Ev::fire`] sends it through the hub's guard and the rules as the
    /// router does.
    #[derive(Debug, Clone)]
    pub(super) struct Ev {
        class: String,
        score: f32,
        kind: &'static str,
        camera: bool,
        sub: Option<(&'static str, f32)>,
    }

    /// A plain verdict (`class`, `score`) of a new track.
    pub(super) fn ev(class: &str, score: f32) -> Ev {
        Ev {
            class: class.into(),
            score,
            kind: "new",
            camera: false,
            sub: None,
        }
    }

    /// A camera's `new` track event (Frigate's `label`, `score`), without a head verdict.
    fn cam(label: &str, score: f32) -> Ev {
        Ev {
            camera: true,
            ..ev(label, score)
        }
    }

    impl Ev {
        fn kind(mut self, kind: &'static str) -> Ev {
            self.kind = kind;
            self
        }

        /// The camera head's verdict (`sub_label`, `sub_score`): a camera event.
        fn sub(mut self, label: &'static str, p: f32) -> Ev {
            self.camera = true;
            self.sub = Some((label, p));
            self
        }

        /// The payload `device` would publish.
        fn payload(&self, device: &str) -> Vec<u8> {
            if !self.camera {
                return self.verdict().to_json();
            }
            let phase = match self.kind {
                "new" => TrackPhase::New,
                "update" => TrackPhase::Update,
                _ => TrackPhase::End,
            };
            CameraEvent {
                phase,
                id: "ev-1".into(),
                camera: device.into(),
                label: self.class.clone(),
                score: self.score,
                top_score: self.score,
                bbox: [0.25, 0.25, 0.75, 0.75],
                start_time: 1_800_000_000.0,
                end_time: (phase == TrackPhase::End).then_some(1_800_000_005.0),
                model: "blazeface@1".into(),
                sub_label: self.sub.map(|(l, _)| l.to_string()),
                sub_score: self.sub.map(|(_, p)| p),
            }
            .to_json()
        }

        /// The verdict of a plain event (what [`Rule::matches`] takes).
        pub(super) fn verdict(&self) -> Event {
            Event {
                class: self.class.clone(),
                score: self.score,
                model: "door-cam@1".into(),
                ts: "2026-01-01T00:00:00Z".into(),
                id: Some("ev-1".into()),
                kind: Some(self.kind.into()),
            }
        }

        /// The plans `rs` fires for it on `hearth/<device>/event/<name>`.
        fn fire(&self, rs: &RuleSet, device: &str, name: &str, env: &Env<'_>) -> Vec<Plan> {
            let raw = self.payload(device);
            let inbound = parse_event(device, &raw).expect("the guard passes test events");
            let verdict = inbound.verdict().expect("a verdict");
            let mut out = Vec::new();
            let f = EventFields::inbound(device, name, &verdict, &inbound, &raw);
            rs.on_event(f, env, |_, p| out.push(p));
            out
        }

        /// Why rule `i` of `rs` does or does not fire (as `hearth-hub rules test` says).
        fn explain(&self, rs: &RuleSet, i: usize, device: &str) -> Result<(), String> {
            let raw = self.payload(device);
            let inbound = parse_event(device, &raw).unwrap();
            let verdict = inbound.verdict().unwrap();
            rs.rules()[i].explain_event(&EventFields::inbound(
                device,
                "detection",
                &verdict,
                &inbound,
                &raw,
            ))
        }
    }

    /// One rule's TOML: `[[rule]]` named `name`, the `when` lines, then `rest`
    /// (conditions, actions); without an action in `rest`, `[rule.then]` turns `a` on.
    fn rule(name: &str, when: &str, rest: &str) -> String {
        let mut t = format!("[[rule]]\nname='{name}'\n[rule.when]\n");
        for part in [when, rest] {
            if !part.is_empty() {
                t += part;
                t += "\n";
            }
        }
        if !rest.contains("[rule.then]") && !rest.contains("[[rule.action]]") {
            t += "[rule.then]\nactuator='a'\npayload={state='ON'}\n";
        }
        t
    }

    fn env(states: &States, unix_ms: u64) -> Env<'_> {
        Env {
            now: Instant::now(),
            unix_ms,
            states,
        }
    }

    fn cmd(p: &Plan, i: usize) -> (&str, serde_json::Value) {
        match &p.steps[i] {
            Step::Command { topic, payload, .. } => (
                topic.as_str(),
                serde_json::from_str(payload).expect(payload),
            ),
            s => panic!("step {i} is {s:?}"),
        }
    }

    #[test]
    fn the_first_syntax_still_compiles_and_fires() {
        let rs = RuleSet::parse(PORCH, "rules.toml", "zigbee2mqtt").unwrap();
        assert_eq!(rs.len(), 1);
        let r = &rs.rules()[0];
        assert_eq!(r.cooldown, Duration::from_secs(10));
        assert_eq!(r.line, 3);
        let matches = |device: &str, e: Ev| r.matches(device, "detection", &e.verdict());
        assert!(matches("door-cam", ev("person", 0.8)));
        assert!(!matches("door-cam", ev("person", 0.79)));
        assert!(!matches("door-cam", ev("cat", 0.99)));
        assert!(!matches("garden-cam", ev("person", 0.99)));
        let st = States::default();
        let plans = ev("person", 0.9).fire(&rs, "door-cam", "detection", &env(&st, 0));
        assert_eq!(plans.len(), 1);
        assert_eq!(
            plans[0].steps,
            [Step::Command {
                actuator: "porch_light".into(),
                topic: "zigbee2mqtt/porch_light/set".into(),
                payload: r#"{"state":"ON"}"#.into()
            }]
        );
    }

    #[test]
    fn cooldown_suppresses_refiring() {
        let rs = RuleSet::parse(PORCH, "r", "z2m").unwrap();
        let t0 = Instant::now();
        let mut fired = 0;
        let e = ev("person", 0.9).verdict();
        assert_eq!(
            rs.dispatch("door-cam", "detection", &e, t0, |_| fired += 1),
            1
        );
        rs.dispatch(
            "door-cam",
            "detection",
            &e,
            t0 + Duration::from_secs(9),
            |_| fired += 1,
        );
        assert_eq!(fired, 1);
        rs.dispatch(
            "door-cam",
            "detection",
            &e,
            t0 + Duration::from_secs(11),
            |_| fired += 1,
        );
        assert_eq!(fired, 2);
    }

    #[test]
    fn globs_and_the_index_keep_file_order() {
        assert!(glob(b"cam-*", b"cam-1"));
        assert!(glob(b"*-cam", b"door-cam"));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"cam-*", b"door"));
        assert_eq!(Pattern::compile("*"), Pattern::Any);
        // Four rules in four index buckets, interleaved in the file.
        let mut text = String::new();
        for (i, (d, e)) in [
            ("*", "*"),
            ("cam", "*"),
            ("cam", "det"),
            ("*", "det"),
            ("c*", "det"),
            ("other", "det"),
        ]
        .iter()
        .enumerate()
        {
            text += &rule(&format!("r{i}"), &format!("device='{d}'\nevent='{e}'"), "");
        }
        let rs = RuleSet::parse(&text, "r", "z").unwrap();
        let st = States::default();
        let names: Vec<String> = ev("x", 0.5)
            .fire(&rs, "cam", "det", &env(&st, 0))
            .into_iter()
            .map(|p| p.rule)
            .collect();
        assert_eq!(names, ["r0", "r1", "r2", "r3", "r4"]);
    }

    #[test]
    fn event_fields_track_type_and_templates() {
        let text = r#"
[[rule]]
name = "track starts"
[rule.when]
device = "door-cam"
type = "new"
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = { state = "ON", id = "{{ id }}", score = "{{ score }}", text = "{{ class }} at {{ device }} by \"{{ rule }}\"" }
"#;
        let rs = RuleSet::parse(text, "r", "z2m").unwrap();
        let st = States::default();
        let e = ev("person", 0.93);
        let plans = e.fire(&rs, "door-cam", "detection", &env(&st, 0));
        let (topic, v) = cmd(&plans[0], 0);
        assert_eq!(topic, "z2m/porch_light/set");
        assert_eq!(v["id"], "ev-1");
        assert_eq!(v["score"], serde_json::json!(0.93));
        assert_eq!(v["text"], "person at door-cam by \"track starts\"");
        let end = e.kind("end");
        assert!(end
            .fire(&rs, "door-cam", "detection", &env(&st, 0))
            .is_empty());
    }

    #[test]
    fn a_track_end_fires_only_rules_that_ask_for_it() {
        let text = r#"
[[rule]]
name = "face"
[rule.when]
class = "face"
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = { state = "ON" }

[[rule]]
name = "gone"
[rule.when]
type = "end"
[[rule.action]]
kind = "command"
actuator = "porch_light"
payload = { state = "OFF" }
"#;
        let rs = RuleSet::parse(text, "r", "z2m").unwrap();
        let st = States::default();
        for e in [ev("face", 0.9), cam("face", 0.9)] {
            let on = e.fire(&rs, "cam", "detection", &env(&st, 0));
            assert_eq!(on.len(), 1);
            assert_eq!(cmd(&on[0], 0).1["state"], "ON");
            let off = e.kind("end").fire(&rs, "cam", "detection", &env(&st, 0));
            assert_eq!(off.len(), 1, "only the rule that asks for type = end");
            assert_eq!(cmd(&off[0], 0).1["state"], "OFF");
        }
    }

    #[test]
    fn camera_events_match_on_label_type_and_the_heads_sub_label() {
        let text = [
            rule(
                "stranger",
                "device='door-cam'\nlabel='face'\nsub_label='none'",
                "[[rule.action]]\nkind='command'\nactuator='porch_light'\n\
                 payload={state='ON', brightness=254, seen='{{ sub_label }}', p='{{ sub_score }}', what='{{ label }}'}",
            ),
            rule(
                "resident",
                "device='door-cam'\nclass='face'\nsub_label='pers*'\nmin_sub_score=0.8",
                "[rule.then]\nactuator='porch_light'\npayload={state='ON', brightness=80}",
            ),
            rule("any verdict", "min_sub_score=0.5\ntype='update'", ""),
            rule("plain", "class='face'\nmin_score=0.5", ""),
        ]
        .concat();
        let rs = RuleSet::parse(&text, "r", "z2m").unwrap();
        let st = States::default();
        let fired = |e: Ev| -> Vec<(String, serde_json::Value)> {
            e.fire(&rs, "door-cam", "detection", &env(&st, 0))
                .iter()
                .map(|p| (p.rule.clone(), cmd(p, 0).1))
                .collect()
        };
        let names = |f: &[(String, serde_json::Value)]| -> Vec<String> {
            f.iter().map(|(r, _)| r.clone()).collect()
        };
        // The head says none: the stranger scene, with its verdict in the payload.
        let f = fired(cam("face", 0.9).sub("none", 0.75));
        assert_eq!(names(&f), ["stranger", "plain"]);
        assert_eq!(
            (&f[0].1["seen"], &f[0].1["p"], &f[0].1["what"]),
            (
                &serde_json::json!("none"),
                &serde_json::json!(0.75),
                &serde_json::json!("face")
            )
        );
        // A confident person: the resident scene; below min_sub_score: neither head rule.
        assert_eq!(
            names(&fired(cam("face", 0.9).sub("person", 0.85))),
            ["resident", "plain"]
        );
        assert_eq!(
            names(&fired(cam("face", 0.9).sub("person", 0.7))),
            ["plain"]
        );
        // No head verdict (a detector-only camera, a plain verdict): only the plain rule.
        assert_eq!(names(&fired(cam("face", 0.9))), ["plain"]);
        assert_eq!(names(&fired(ev("face", 0.9))), ["plain"]);
        // `min_sub_score` alone: any verdict; with `type`.
        assert_eq!(
            names(&fired(cam("face", 0.9).sub("none", 0.6).kind("update"))),
            ["stranger", "any verdict", "plain"]
        );
        // A track's end carries the last verdict, and fires only rules asking for `end`.
        assert!(fired(cam("face", 0.9).sub("none", 0.9).kind("end")).is_empty());

        // `rules test` says why.
        let why = |e: Ev, i: usize| e.explain(&rs, i, "door-cam").unwrap_err();
        assert_eq!(
            why(cam("face", 0.9), 0),
            "no head verdict (sub_label) on the event; the rule wants `none`"
        );
        assert_eq!(
            why(cam("face", 0.9).sub("person", 0.9), 0),
            "sub_label `person` is not `none`"
        );
        assert_eq!(
            why(cam("face", 0.9).sub("person", 0.7), 1),
            "sub_score 0.7 < min_sub_score 0.8"
        );
        assert_eq!(
            why(cam("face", 0.9).sub("none", 0.9).kind("end"), 3),
            "a track's `end` fires only rules with type = \"end\""
        );
        assert!(cam("face", 0.9)
            .sub("person", 0.9)
            .explain(&rs, 1, "door-cam")
            .is_ok());
        let r = &rs.rules()[1];
        assert_eq!(
            (r.class.clone(), r.sub_label.clone(), r.min_sub_score),
            (
                Pattern::Exact("face".into()),
                Some(Pattern::Glob("pers*".into())),
                0.8
            )
        );
    }

    #[test]
    fn conditions_time_state_for_availability_score_sun() {
        let text = r#"
[settings]
utc_offset = "+02:00"
latitude = 51.48
longitude = 0.0

[[rule]]
name = "night"
[rule.when]
class = "person"
[[rule.condition]]
kind = "time"
after = "22:00"
before = "06:00"
[rule.then]
actuator = "a"
payload = { state = "ON" }

[[rule]]
name = "tv on for a minute"
[rule.when]
class = "person"
[[rule.condition]]
kind = "state"
device = "tv"
equals = "ON"
for_secs = 60
[[rule.condition]]
kind = "availability"
device = "lamp"
[[rule.condition]]
kind = "score"
min = 0.9
[rule.then]
actuator = "b"
payload = { state = "ON" }

[[rule]]
name = "dark"
[rule.when]
class = "person"
[[rule.condition]]
kind = "sun"
is = "down"
[rule.then]
actuator = "c"
payload = { state = "ON" }
"#;
        let rs = RuleSet::parse(text, "r", "z").unwrap();
        let st = States::default();
        let e = ev("person", 0.95);
        // 2026-06-21 21:30 UTC = 23:30 local: night, sun down in London.
        let late = 1_782_077_400_000;
        let names = |env: &Env<'_>, e: &Ev| -> Vec<String> {
            e.fire(&rs, "cam", "det", env)
                .into_iter()
                .map(|p| p.rule)
                .collect()
        };
        assert_eq!(names(&env(&st, late), &e), ["night", "dark"]);
        // 12:00 UTC = 14:00 local: neither.
        assert!(names(&env(&st, late - 34_200_000), &e).is_empty());
        // TV on since `late`, lamp online.
        let doc = serde_json::json!({"state": "ON"});
        st.set_state("tv", doc.as_object().unwrap(), late);
        st.set_availability("lamp", true, late);
        assert_eq!(
            names(&env(&st, late + 30_000), &e),
            ["night", "dark"],
            "not for 60 s yet"
        );
        assert_eq!(
            names(&env(&st, late + 60_000), &e),
            ["night", "tv on for a minute", "dark"]
        );
        assert_eq!(
            names(&env(&st, late + 60_000), &ev("person", 0.85)),
            ["night", "dark"],
            "score 0.85 < 0.9"
        );
        st.set_availability("lamp", false, late + 60_000);
        assert_eq!(names(&env(&st, late + 61_000), &e), ["night", "dark"]);
        let r = &rs.rules()[1];
        let why = r
            .conditions_hold(&env(&st, late + 61_000), rs.settings(), Some(0.95), true)
            .unwrap_err();
        assert_eq!(why, "lamp is not online for 0s (now: offline)");
    }

    #[test]
    fn state_availability_time_and_interval_triggers() {
        let text = r#"
[[rule]]
name = "door opened"
[rule.when]
kind = "state"
device = "front door"
attribute = "contact"
from = true
to = false
[rule.then]
actuator = "hall"
payload = { state = "ON", was = "{{ from }}", now = "{{ value }}" }

[[rule]]
name = "camera lost"
[rule.when]
kind = "availability"
device = "door-cam*"
to = "offline"
[rule.then]
actuator = "siren"
payload = { state = "ON", who = "{{ device }}" }

[[rule]]
name = "morning"
[rule.when]
kind = "time"
at = "07:00"
[[rule.action]]
kind = "scene"
commands = [{ actuator = "blinds", payload = { state = "OFF" } }, { actuator = "kettle", payload = { state = "ON" } }]
[[rule.action]]
kind = "delay"
secs = 600
[[rule.action]]
kind = "command"
actuator = "kettle"
payload = { state = "OFF" }
[[rule.action]]
kind = "refresh"
model = "faces"

[[rule]]
name = "every 5 s"
[rule.when]
kind = "interval"
every_secs = 5
[rule.then]
actuator = "pump"
payload = { state = "TOGGLE" }
"#;
        let rs = RuleSet::parse(text, "r", "z").unwrap();
        assert!(rs.watches_state("front door") && rs.watches_availability("siren"));
        let st = States::default();
        let mut got = Vec::new();
        let doc = |v: serde_json::Value| v.as_object().unwrap().clone();
        rs.on_state(
            "front door",
            &doc(serde_json::json!({"contact": true})),
            &env(&st, 0),
            |_, p| got.push(p),
        );
        assert!(got.is_empty(), "first value: no `from`");
        rs.on_state(
            "front door",
            &doc(serde_json::json!({"contact": false, "battery": 90})),
            &env(&st, 1),
            |_, p| got.push(p),
        );
        assert_eq!(got.len(), 1);
        let (_, v) = cmd(&got[0], 0);
        assert_eq!(
            (v["was"].clone(), v["now"].clone()),
            (serde_json::json!(true), serde_json::json!(false))
        );
        rs.on_state(
            "front door",
            &doc(serde_json::json!({"contact": false})),
            &env(&st, 2),
            |_, p| got.push(p),
        );
        assert_eq!(got.len(), 1, "no change, no firing");

        got.clear();
        rs.on_availability("door-cam-1", true, &env(&st, 0), |_, p| got.push(p));
        rs.on_availability("door-cam-1", false, &env(&st, 0), |_, p| got.push(p));
        rs.on_availability("door-cam-1", false, &env(&st, 0), |_, p| got.push(p));
        assert_eq!(got.len(), 1);
        assert_eq!(cmd(&got[0], 0).1["who"], "door-cam-1");

        got.clear();
        let seven = 20 * 86_400_000 + 7 * 3_600_000;
        let tick = |ms: u64, got: &mut Vec<Plan>| {
            rs.on_tick(
                &Env {
                    now: rs.epoch + Duration::from_millis(ms % 100_000),
                    unix_ms: ms,
                    states: &st,
                },
                |_, p| got.push(p),
            )
        };
        tick(seven - 1000, &mut got);
        assert!(got.iter().all(|p| p.rule != "morning"));
        tick(seven + 500, &mut got);
        tick(seven + 1500, &mut got);
        let morning: Vec<&Plan> = got.iter().filter(|p| p.rule == "morning").collect();
        assert_eq!(morning.len(), 1, "once a day");
        let steps = &morning[0].steps;
        assert_eq!(steps.len(), 5);
        assert_eq!(steps[2], Step::Delay(Duration::from_secs(600)));
        assert_eq!(steps[4], Step::Refresh("faces".into()));
        let intervals = got.iter().filter(|p| p.rule == "every 5 s").count();
        assert_eq!(intervals, 0, "the first tick arms the interval");
    }

    #[test]
    fn errors_name_file_rule_and_line() {
        let text = PORCH.replace("class = \"person\"", "clas = \"person\"");
        let e = RuleSet::parse(&text, "rules.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("rules.toml: rule #1 (\"porch light when someone is at the door\")"),
            "{e}"
        );
        assert!(
            e.contains("unknown field `clas`") && e.contains("line 7"),
            "{e}"
        );

        let text = format!("{PORCH}\n[[rule]]\nname = \"second\"\n[rule.when]\nclass = \"person\"\nmin_score = 1.5\n[rule.then]\nactuator = \"x\"\npayload = {{ state = \"ON\" }}\n");
        let e = RuleSet::parse(&text, "rules.toml", "z")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rules.toml:18: rule \"second\": when.min_score 1.5 must be within 0..=1"
        );

        let e = RuleSet::parse(
            &PORCH.replace("state = \"ON\"", "state = \"on\""),
            "r.toml",
            "z",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "r.toml:11: rule \"porch light when someone is at the door\": then.payload.state"
            ),
            "{e}"
        );
        let e = RuleSet::parse(
            &PORCH.replace("\"porch_light\"", "\"lights/#\""),
            "r.toml",
            "z",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(":10:") && e.contains("then.actuator"), "{e}");
        let e = RuleSet::parse(&format!("{PORCH}{PORCH}"), "r.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":15:") && e.contains("duplicate rule name"),
            "{e}"
        );

        let cases = [
            (rule("t", "kind='time'\nat='25:00'", ""), "r:5: rule \"t\": when.at `25:00` must be \"HH:MM\" or \"HH:MM:SS\""),
            (rule("t", "kind='state'\ndevice='tv'\nat='07:00'", ""), "r:6: rule \"t\": when.at does not apply to kind = \"state\""),
            (rule("t", "kind='teleport'", ""), "r:4: rule \"t\": when.kind `teleport` must be event, state, availability, time or interval"),
            (rule("t", "", "[[rule.condition]]\nkind='sun'\nis='up'"), "r:5: rule \"t\": a sun condition needs [settings] latitude and longitude"),
            (rule("t", "", "[[rule.action]]\nkind='command'\nactuator='a'\npayload={x='{{ score'}"), "r:7: rule \"t\": action.payload: `{{ score`: `{{` without `}}`"),
            ("[[rule]]\nname='t'\n[rule.when]\n".into(), "r:2: rule \"t\": no action: give [rule.then] or [[rule.action]]"),
            (rule("t", "type='begin'", ""), "r:4: rule \"t\": when.type `begin` must be one of new, update, end"),
            (rule("t", "class='face'\nlabel='face'", ""), "r:5: rule \"t\": when.label is Frigate's name for when.class: give one of them"),
            (rule("t", "sub_label='a/b'", ""), "r:4: rule \"t\": when.sub_label `a/b` must be 1-64 characters of [A-Za-z0-9_-.:@+ ] or `*`"),
            (rule("t", "sub_label='person'\nmin_sub_score=1.2", ""), "r:5: rule \"t\": when.min_sub_score 1.2 must be within 0..=1"),
            (rule("t", "kind='interval'\nevery_secs=5\nsub_label='x'", ""), "r:6: rule \"t\": when.sub_label does not apply to kind = \"interval\""),
        ];
        for (text, want) in cases {
            assert_eq!(
                RuleSet::parse(&text, "r", "z").unwrap_err().to_string(),
                want
            );
        }
        let e = RuleSet::parse("[[rule]\nname=1\n", "r.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let rs = RuleSet::parse(
            include_str!("../../rules.example.toml"),
            "example",
            "zigbee2mqtt",
        )
        .unwrap();
        assert!(rs.len() >= 2);
        assert!(rs.rules()[1].matches(
            "kitchen-plug",
            "appliance",
            &ev("microwave", 0.95).verdict()
        ));
    }

    #[test]
    fn disabled_rules_are_skipped_and_empty_file_is_fine() {
        let text = PORCH.replace("[rule.when]", "enabled = false\n[rule.when]");
        assert!(RuleSet::parse(&text, "r", "z").unwrap().is_empty());
        assert!(RuleSet::parse("", "r", "z").unwrap().is_empty());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// 60 rules with conditions and templates, routed 200k times; prints ns per event.
    /// `cargo nextest run -p hearth-hub --run-ignored only rules_per_event_cost`
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn rules_per_event_cost() {
        let mut text = String::new();
        for i in 0..60 {
            text += &format!(
                "[[rule]]\nname='r{i}'\n[rule.when]\ndevice='dev-{}'\nevent='detection'\nclass='person'\nmin_score=0.5\n\
                 [[rule.condition]]\nkind='time'\nafter='00:00'\nbefore='23:59:59'\n\
                 [[rule.condition]]\nkind='score'\nmin=0.6\n\
                 [rule.then]\nactuator='act-{i}'\npayload={{state='ON', id='{{{{ id }}}}', score='{{{{ score }}}}', by='{{{{ device }}}}'}}\n",
                i % 20
            );
        }
        text += "[[rule]]\nname='glob'\n[rule.when]\ndevice='cam-*'\n[rule.then]\nactuator='g'\npayload={state='ON'}\n";
        let rs = RuleSet::parse(&text, "bench", "z2m").unwrap();
        let st = States::default();
        let ev = super::tests::ev("person", 0.9).verdict();
        let raw = ev.to_json();
        let n = 200_000u32;
        let t0 = Instant::now();
        let mut fired = 0usize;
        for i in 0..n {
            let device = if i % 2 == 0 { "dev-7" } else { "cam-x" };
            let env = Env {
                now: Instant::now(),
                unix_ms: 1_000_000,
                states: &st,
            };
            let f = EventFields::new(device, "detection", &ev, &raw);
            rs.on_event(f, &env, |_, p| fired += p.steps.len());
        }
        let per = t0.elapsed().as_nanos() / u128::from(n);
        println!("{per} ns per event (half fire 3 rules with templates, half 1 glob rule), {fired} commands");
        let t0 = Instant::now();
        for _ in 0..n {
            let env = Env {
                now: Instant::now(),
                unix_ms: 1_000_000,
                states: &st,
            };
            let f = EventFields::new("nobody", "detection", &ev, &raw);
            rs.on_event(f, &env, |_, p| fired += p.steps.len());
        }
        let per = t0.elapsed().as_nanos() / u128::from(n);
        println!("{per} ns per event that matches no rule");
    }
}
