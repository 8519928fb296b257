//! MQTT topics and JSON payloads, and the schema checks the hub applies.
//!
//! Topic layout (see the brief):
//! - `hearth/<device>/event/<name>`: [`Event`], QoS 1.
//! - `hearth/<device>/meta`: [`DeviceMeta`], retained.
//! - `hearth/<device>/availability`: `online` / `offline`, retained, last will.
//! - `<base>/<actuator>/set`: Zigbee2MQTT-style command, `<base>/<actuator>`: state, retained.
//! - `hearth/federation/refresh`: [`RefreshRequest`] (signed by an admin); `hearth/federation/model/<name>`: [`ModelAnnouncement`], retained.
//!
//! Who may publish what (enforced by Mosquitto's ACLs in production, see `deploy/mosquitto/`):
//! a device only under `hearth/<its name>/…` (an actuator also its own `<base>/<name>` state
//! and availability), only the hub on `<base>/<actuator>/set` and
//! `hearth/federation/model/…`, only admins on `hearth/federation/refresh`. `federation` is
//! therefore not a device name ([`reserved_name`]).

use serde::{Deserialize, Serialize};

/// Largest event payload the hub accepts, in bytes. Anything bigger is dropped:
/// an event is a verdict, never a sample.
pub const MAX_EVENT_BYTES: usize = 512;
/// Longest class name, model tag or timestamp string accepted in an event.
pub const MAX_FIELD_CHARS: usize = 64;

/// Root of every Hearth topic.
pub const ROOT: &str = "hearth";
/// Federation refresh request topic.
pub const REFRESH_TOPIC: &str = "hearth/federation/refresh";

/// An inference verdict published by an agent.
///
/// `deny_unknown_fields` is part of the privacy guard: a payload with any extra
/// field (e.g. a waveform) does not parse and is dropped by the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Predicted class label, e.g. `"person"` or `"microwave"`.
    pub class: String,
    /// Confidence in `[0, 1]`.
    pub score: f32,
    /// Model that produced it, `name@version`.
    pub model: String,
    /// RFC 3339 timestamp.
    pub ts: String,
    /// The event's id on this device (`[A-Za-z0-9_-]`, ≤ 64): a [`Feedback`] naming it labels
    /// the sample behind it, which the device keeps (and never publishes); rules can copy it
    /// into a command with `{{ id }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Optional life-cycle stage of a tracked object, Frigate style: `new`, `update` or `end`
    /// (JSON key `type`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// Life-cycle stages accepted in an event's `type`.
pub const EVENT_TYPES: [&str; 3] = ["new", "update", "end"];

/// Why an event payload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EventError {
    #[error("payload of {0} bytes exceeds the {MAX_EVENT_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("payload is not a valid event: {0}")]
    Schema(String),
    #[error("field `{0}` is empty, too long or has characters outside [A-Za-z0-9 _.:@+-]")]
    BadField(&'static str),
    #[error("score {0} is not a probability")]
    BadScore(f32),
}

fn field_ok(s: &str) -> bool {
    !s.is_empty()
        && s.chars().count() <= MAX_FIELD_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.:@+-".contains(c))
}

impl Event {
    /// Parses and validates an event payload (size, schema, field contents).
    pub fn parse(payload: &[u8]) -> Result<Event, EventError> {
        if payload.len() > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge(payload.len()));
        }
        let ev: Event =
            serde_json::from_slice(payload).map_err(|e| EventError::Schema(e.to_string()))?;
        ev.validate()?;
        Ok(ev)
    }

    /// Checks field contents; called by [`Event::parse`] and before publishing.
    pub fn validate(&self) -> Result<(), EventError> {
        if !(0.0..=1.0).contains(&self.score) || !self.score.is_finite() {
            return Err(EventError::BadScore(self.score));
        }
        for (name, v) in [
            ("class", &self.class),
            ("model", &self.model),
            ("ts", &self.ts),
        ] {
            if !field_ok(v) {
                return Err(EventError::BadField(name));
            }
        }
        if let Some(id) = &self.id {
            if !valid_name(id) {
                return Err(EventError::BadField("id"));
            }
        }
        if self
            .kind
            .as_deref()
            .is_some_and(|v| !EVENT_TYPES.contains(&v))
        {
            return Err(EventError::BadField("type"));
        }
        Ok(())
    }

    /// Serialises to the JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("event serialises")
    }
}

/// A correction of a verdict, published by a user or Home Assistant (an admin login) on
/// `hearth/<device>/feedback`: the sample behind event `event` is of class `label`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// The event's `id`.
    pub event: String,
    /// The right class (one of the device's classes).
    pub label: String,
}

impl Feedback {
    /// Parses and checks a feedback payload (size, schema, field contents).
    pub fn parse(payload: &[u8]) -> Result<Feedback, EventError> {
        if payload.len() > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge(payload.len()));
        }
        let f: Feedback =
            serde_json::from_slice(payload).map_err(|e| EventError::Schema(e.to_string()))?;
        if !valid_name(&f.event) {
            return Err(EventError::BadField("event"));
        }
        if !field_ok(&f.label) {
            return Err(EventError::BadField("label"));
        }
        Ok(f)
    }
}

/// Phase of a camera object track, as in Frigate's `frigate/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackPhase {
    /// The track was confirmed (sent once per track).
    New,
    /// Something changed (score, box, top score); rate-limited by the agent.
    Update,
    /// The object is gone (sent once per track; carries `end_time`).
    End,
}

/// A camera detection event in Frigate's life cycle (`new` → `update`* → `end`), on
/// `hearth/<camera>/event/<name>`. Only a label, scores, a normalised box and times: never
/// pixels. Like [`Event`], unknown fields are refused and the payload is at most
/// [`MAX_EVENT_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraEvent {
    #[serde(rename = "type")]
    pub phase: TrackPhase,
    /// Track id, unique per camera (`[A-Za-z0-9 _.:@+-]`, ≤ 64 chars).
    pub id: String,
    /// Camera (device) name; must be the device of the topic.
    pub camera: String,
    /// Object label, e.g. `"face"`.
    pub label: String,
    /// Score of the latest detection, in `[0, 1]`.
    pub score: f32,
    /// Best score the track has had, in `[0, 1]`.
    pub top_score: f32,
    /// `[xmin, ymin, xmax, ymax]`, normalised to `[0, 1]` of the frame.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// Unix time (seconds) the track started.
    pub start_time: f64,
    /// Unix time (seconds) the track ended: present exactly on `end`.
    pub end_time: Option<f64>,
    /// Model that produced it, `name@version`.
    pub model: String,
    /// The camera's own head (learning on the device) on the track's crop: its class, as
    /// Frigate's `sub_label` (a recognised face's name). Present with `sub_score` or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_label: Option<String>,
    /// The head's probability of `sub_label`, in `[0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_score: Option<f32>,
}

impl CameraEvent {
    /// Checks field contents (what [`parse_event`] applies after the schema).
    pub fn validate(&self) -> Result<(), EventError> {
        for s in [self.score, self.top_score] {
            if !(0.0..=1.0).contains(&s) || !s.is_finite() {
                return Err(EventError::BadScore(s));
            }
        }
        if self.score > self.top_score {
            return Err(EventError::BadScore(self.score));
        }
        if !valid_name(&self.camera) {
            return Err(EventError::BadField("camera"));
        }
        for (name, v) in [
            ("id", &self.id),
            ("label", &self.label),
            ("model", &self.model),
        ] {
            if !field_ok(v) {
                return Err(EventError::BadField(name));
            }
        }
        match (&self.sub_label, self.sub_score) {
            (None, None) => {}
            (Some(l), Some(p)) => {
                if !field_ok(l) {
                    return Err(EventError::BadField("sub_label"));
                }
                if !(0.0..=1.0).contains(&p) || !p.is_finite() {
                    return Err(EventError::BadScore(p));
                }
            }
            _ => return Err(EventError::BadField("sub_label")),
        }
        let b = &self.bbox;
        if !b.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)) || b[0] > b[2] || b[1] > b[3]
        {
            return Err(EventError::BadField("box"));
        }
        if !self.start_time.is_finite() || self.start_time < 0.0 {
            return Err(EventError::BadField("start_time"));
        }
        match (self.phase, self.end_time) {
            (TrackPhase::End, Some(t)) if t.is_finite() && t >= self.start_time => Ok(()),
            (TrackPhase::New | TrackPhase::Update, None) => Ok(()),
            _ => Err(EventError::BadField("end_time")),
        }
    }

    /// Serialises to the JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("camera event serialises")
    }

    /// The verdict rules match on: class = label, score = score, ts = start time.
    pub fn verdict(&self) -> Event {
        Event {
            class: self.label.clone(),
            score: self.score,
            model: self.model.clone(),
            ts: format!("{:.3}", self.start_time),
            id: Some(self.id.clone()),
            kind: Some(
                match self.phase {
                    TrackPhase::New => "new",
                    TrackPhase::Update => "update",
                    TrackPhase::End => "end",
                }
                .to_string(),
            ),
        }
    }
}

/// An event payload that passed the guard: a plain verdict or a camera track event.
#[derive(Debug, Clone, PartialEq)]
pub enum InboundEvent {
    Verdict(Event),
    Camera(CameraEvent),
}

impl InboundEvent {
    /// The verdict the rules see. A camera track's `end` is one too (with `type` = `end`),
    /// but it fires only rules that ask for `type = "end"` (the hub's rules engine).
    pub fn verdict(&self) -> Option<Event> {
        match self {
            InboundEvent::Verdict(e) => Some(e.clone()),
            InboundEvent::Camera(c) => Some(c.verdict()),
        }
    }
}

/// The hub's privacy guard for `hearth/<device>/event/<name>`: size first, then a payload
/// with a `camera` field must be a [`CameraEvent`] whose `camera` is `device`, any other an
/// [`Event`] (whose optional `type` is new/update/end); both refuse unknown fields.
pub fn parse_event(device: &str, payload: &[u8]) -> Result<InboundEvent, EventError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(EventError::TooLarge(payload.len()));
    }
    #[derive(Deserialize)]
    struct Probe {
        camera: Option<serde::de::IgnoredAny>,
    }
    let probe: Probe =
        serde_json::from_slice(payload).map_err(|e| EventError::Schema(e.to_string()))?;
    // A verdict may carry a `type` (new/update/end) too; a camera event names its camera.
    if probe.camera.is_none() {
        return Event::parse(payload).map(InboundEvent::Verdict);
    }
    let ev: CameraEvent =
        serde_json::from_slice(payload).map_err(|e| EventError::Schema(e.to_string()))?;
    ev.validate()?;
    if ev.camera != device {
        return Err(EventError::BadField("camera"));
    }
    Ok(InboundEvent::Camera(ev))
}

/// Retained device description at `hearth/<device>/meta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceMeta {
    pub device: String,
    /// `"agent"` or `"actuator"`.
    pub kind: String,
    /// Model the agent runs, `name@version` (empty for actuators).
    #[serde(default)]
    pub model: String,
    /// Class labels the agent can emit.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Event names it publishes (`hearth/<device>/event/<name>`), for Home Assistant
    /// discovery before its first event; absent from older agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    pub sw_version: String,
}

/// Body of a refresh request on [`REFRESH_TOPIC`].
///
/// The hub accepts only requests an admin signed (its default, `[mqtt_auth] refresh =
/// "signed"`): `mac` is the hex HMAC-SHA256, under the hub's refresh key, of
/// `hearth-refresh-v1\n<model>\n<ts>\n<nonce>`; `ts` (Unix milliseconds) must be recent and
/// `nonce` unseen, so a request seen on the broker cannot be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshRequest {
    pub model: String,
    /// Unix time of signing, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// Random, unique per request (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Hex HMAC-SHA256 over the model, `ts` and `nonce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl RefreshRequest {
    /// An unsigned request for `model`.
    pub fn unsigned(model: impl Into<String>) -> RefreshRequest {
        RefreshRequest {
            model: model.into(),
            ts: None,
            nonce: None,
            mac: None,
        }
    }

    /// The bytes the `mac` covers.
    pub fn signed_text(model: &str, ts: u64, nonce: &str) -> String {
        format!("hearth-refresh-v1\n{model}\n{ts}\n{nonce}")
    }
}

/// Retained announcement at `hearth/federation/model/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAnnouncement {
    pub model: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
}

/// `hearth/<device>/event/<name>`
pub fn event_topic(device: &str, name: &str) -> String {
    format!("{ROOT}/{device}/event/{name}")
}
/// `hearth/<device>/feedback`: [`Feedback`] for the device (written by admins).
pub fn feedback_topic(device: &str) -> String {
    format!("{ROOT}/{device}/feedback")
}
/// `hearth/<device>/meta`
pub fn meta_topic(device: &str) -> String {
    format!("{ROOT}/{device}/meta")
}
/// `hearth/<device>/availability`
pub fn availability_topic(device: &str) -> String {
    format!("{ROOT}/{device}/availability")
}
/// `hearth/federation/model/<name>`
pub fn model_topic(model: &str) -> String {
    format!("{ROOT}/federation/model/{model}")
}

/// Splits `hearth/<device>/event/<name>` into `(device, name)`.
pub fn parse_event_topic(topic: &str) -> Option<(&str, &str)> {
    let mut it = topic.split('/');
    match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some(ROOT), Some(dev), Some("event"), Some(name), None)
            if !dev.is_empty() && !name.is_empty() =>
        {
            Some((dev, name))
        }
        _ => None,
    }
}

/// Names no device may take: `federation` (its topics would be `hearth/federation/…`) and
/// the hub's own MQTT user.
pub fn reserved_name(s: &str) -> bool {
    s == "federation" || s == "hearth-hub"
}

/// A device or actuator name usable as one MQTT topic level and as a Home
/// Assistant object id.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Event {
        Event {
            class: "person".into(),
            score: 0.93,
            model: "door-cam@7".into(),
            ts: "2026-11-24T18:00:00.000Z".into(),
            id: None,
            kind: None,
        }
    }

    #[test]
    fn ids_and_feedback() {
        let mut e = ev();
        e.id = Some("a1b2c3d4e5f60718".into());
        assert_eq!(Event::parse(&e.to_json()).unwrap(), e);
        assert!(!String::from_utf8(ev().to_json()).unwrap().contains("id"));
        e.id = Some("a/b".into());
        assert_eq!(Event::parse(&e.to_json()), Err(EventError::BadField("id")));
        let f = Feedback::parse(br#"{"event":"a1b2","label":"microwave"}"#).unwrap();
        assert_eq!((f.event.as_str(), f.label.as_str()), ("a1b2", "microwave"));
        for bad in [
            &br#"{"event":"a1b2","label":"x","samples":[1,2]}"#[..],
            br#"{"event":"a/b","label":"x"}"#,
            br#"{"event":"a1","label":""}"#,
            br#"{"label":"x"}"#,
        ] {
            assert!(
                Feedback::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn round_trip() {
        let e = ev();
        assert_eq!(Event::parse(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn optional_id_and_track_type() {
        let raw =
            br#"{"id":"t-1","type":"new","class":"person","score":0.9,"model":"m@1","ts":"t"}"#;
        let e = Event::parse(raw).unwrap();
        assert_eq!(e.id.as_deref(), Some("t-1"));
        assert_eq!(e.kind.as_deref(), Some("new"));
        assert_eq!(Event::parse(&e.to_json()).unwrap(), e);
        assert!(!String::from_utf8(ev().to_json()).unwrap().contains("type"));
        let bad = br#"{"type":"gone","class":"person","score":0.9,"model":"m@1","ts":"t"}"#;
        assert_eq!(Event::parse(bad), Err(EventError::BadField("type")));
        let bad = br#"{"id":"a\"b","class":"person","score":0.9,"model":"m@1","ts":"t"}"#;
        assert_eq!(Event::parse(bad), Err(EventError::BadField("id")));
    }

    #[test]
    fn refuses_extra_fields_and_raw_data() {
        let raw = br#"{"class":"person","score":0.9,"model":"m@1","ts":"t","samples":[0.1,0.2]}"#;
        assert!(matches!(Event::parse(raw), Err(EventError::Schema(_))));
    }

    #[test]
    fn refuses_big_payloads_and_bad_fields() {
        let mut e = ev();
        e.class = "x".repeat(600);
        assert!(matches!(
            Event::parse(&e.to_json()),
            Err(EventError::TooLarge(_))
        ));
        let mut e = ev();
        e.class = "a,b,c,d".into();
        assert_eq!(
            Event::parse(&e.to_json()),
            Err(EventError::BadField("class"))
        );
        let mut e = ev();
        e.score = 1.5;
        assert_eq!(Event::parse(&e.to_json()), Err(EventError::BadScore(1.5)));
    }

    fn cam(phase: TrackPhase) -> CameraEvent {
        CameraEvent {
            phase,
            id: "1764546000123-1".into(),
            camera: "door-cam".into(),
            label: "face".into(),
            score: 0.91,
            top_score: 0.93,
            bbox: [0.31, 0.2, 0.52, 0.48],
            start_time: 1764546000.123,
            end_time: (phase == TrackPhase::End).then_some(1764546012.5),
            model: "blazeface@1".into(),
            sub_label: None,
            sub_score: None,
        }
    }

    #[test]
    fn a_head_verdict_rides_as_sub_label_and_is_checked() {
        let mut e = cam(TrackPhase::New);
        e.sub_label = Some("person".into());
        e.sub_score = Some(0.87);
        let json = e.to_json();
        assert!(json.len() < MAX_EVENT_BYTES / 2, "{}", json.len());
        assert_eq!(
            parse_event("door-cam", &json).unwrap(),
            InboundEvent::Camera(e.clone())
        );
        let mut half = e.clone();
        half.sub_score = None;
        assert_eq!(
            parse_event("door-cam", &half.to_json()),
            Err(EventError::BadField("sub_label"))
        );
        let mut bad = e.clone();
        bad.sub_score = Some(1.5);
        assert!(matches!(
            parse_event("door-cam", &bad.to_json()),
            Err(EventError::BadScore(_))
        ));
        let mut bad = e;
        bad.sub_label = Some("a/b".into());
        assert_eq!(
            parse_event("door-cam", &bad.to_json()),
            Err(EventError::BadField("sub_label"))
        );
    }

    #[test]
    fn camera_events_pass_the_guard_and_stay_small() {
        for p in [TrackPhase::New, TrackPhase::Update, TrackPhase::End] {
            let e = cam(p);
            let json = e.to_json();
            assert!(json.len() < MAX_EVENT_BYTES / 2, "{}", json.len());
            assert_eq!(
                parse_event("door-cam", &json).unwrap(),
                InboundEvent::Camera(e.clone())
            );
        }
        let end = InboundEvent::Camera(cam(TrackPhase::End))
            .verdict()
            .unwrap();
        assert_eq!(end.kind.as_deref(), Some("end"));
        assert_eq!(
            InboundEvent::Camera(cam(TrackPhase::New))
                .verdict()
                .unwrap()
                .class,
            "face"
        );
        // Plain verdicts still parse.
        let v = ev();
        assert_eq!(
            parse_event("x", &v.to_json()).unwrap(),
            InboundEvent::Verdict(v)
        );
    }

    #[test]
    fn camera_events_are_checked() {
        let json = |e: &CameraEvent| e.to_json();
        // Another camera's name.
        assert_eq!(
            parse_event("porch-cam", &json(&cam(TrackPhase::New))),
            Err(EventError::BadField("camera"))
        );
        // Pixels smuggled in an extra field.
        let mut v: serde_json::Value =
            serde_json::from_slice(&json(&cam(TrackPhase::New))).unwrap();
        v["pixels"] = serde_json::json!([1, 2, 3]);
        assert!(matches!(
            parse_event("door-cam", &serde_json::to_vec(&v).unwrap()),
            Err(EventError::Schema(_))
        ));
        // Too large.
        let mut e = cam(TrackPhase::New);
        e.label = "x".repeat(600);
        assert!(matches!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::TooLarge(_))
        ));
        let mut e = cam(TrackPhase::New);
        e.bbox = [0.5, 0.2, 0.4, 0.3];
        assert_eq!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::BadField("box"))
        );
        let mut e = cam(TrackPhase::New);
        e.bbox[2] = 1.7;
        assert_eq!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::BadField("box"))
        );
        let mut e = cam(TrackPhase::Update);
        e.top_score = 0.5;
        assert!(matches!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::BadScore(_))
        ));
        let mut e = cam(TrackPhase::End);
        e.end_time = None;
        assert_eq!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::BadField("end_time"))
        );
        let mut e = cam(TrackPhase::New);
        e.end_time = Some(1764546001.0);
        assert_eq!(
            parse_event("door-cam", &json(&e)),
            Err(EventError::BadField("end_time"))
        );
        let bad_type = br#"{"type":"start","id":"1","camera":"door-cam","label":"face","score":0.9,"top_score":0.9,"box":[0,0,1,1],"start_time":1,"end_time":null,"model":"m@1"}"#;
        assert!(matches!(
            parse_event("door-cam", bad_type),
            Err(EventError::Schema(_))
        ));
    }

    #[test]
    fn topics() {
        assert_eq!(
            parse_event_topic("hearth/cam1/event/detection"),
            Some(("cam1", "detection"))
        );
        assert_eq!(parse_event_topic("hearth/cam1/meta"), None);
        assert_eq!(parse_event_topic("hearth/cam1/event/a/b"), None);
        assert!(valid_name("kitchen-plug_2"));
        assert!(!valid_name("a/b"));
    }
}
