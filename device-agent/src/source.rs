//! Live sensor sources (the `[source]` table of the agent config) and the pure parts of
//! reading them: a numeric field out of a device's JSON state message (Zigbee2MQTT, Tasmota,
//! Shelly Gen2 conventions), a line of numbers, and the sliding windows (length, hop, optional
//! resampling onto a fixed rate) that become model inputs.
//!
//! Readings stay in the agent: they are windowed, preprocessed and classified here, and only
//! the verdict ([`hearth_proto::mqtt::Event`]) is published (ARCHITECTURE.md, raw-data
//! invariant). A missing or malformed reading is counted and skipped.

use std::collections::VecDeque;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest state message parsed, in bytes (bigger ones are counted as malformed).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest line a command source may print, in bytes (longer ones are malformed).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Where the agent's samples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// Replay the device's own share of the task's train split as if sensed (the default;
    /// `replay_rate_hz`, `replay_limit`).
    #[default]
    Replay,
    /// A numeric field of a device's JSON state topic on an MQTT broker.
    Mqtt(MqttSource),
    /// Lines of numbers from a child process's stdout, or the agent's stdin.
    Command(CommandSource),
}

/// Topic and field layout of a device family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Convention {
    /// `<base>/<device>` (base `zigbee2mqtt`), fields `power`, `current`, `voltage`, …
    #[default]
    Zigbee2mqtt,
    /// Tasmota telemetry `tele/<device>/SENSOR`, field `ENERGY.Power` (also `ENERGY.Current`, …).
    Tasmota,
    /// Shelly Gen2 status `<device>/status/switch:0`, field `apower` (also `current`, `voltage`).
    Shelly,
    /// Shelly Gen2 notifications `<device>/events/rpc`, field `params.switch:0.apower`
    /// (NotifyStatus; other notifications carry no reading and are counted as missing).
    ShellyRpc,
    /// `topic` and `field` given explicitly (an empty field: the payload is the number).
    Custom,
}

/// Windowing shared by every live source.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Windowing {
    /// Samples per window (per channel); default: the task's input length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Samples between the starts of two windows; default: `window` (no overlap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hop: Option<usize>,
    /// Resample the readings (linear interpolation on their arrival times) onto this rate,
    /// in Hz; absent: every reading is one sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_hz: Option<f64>,
}

/// `[source] kind = "mqtt"`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// Broker carrying the device's state (`mqtt://user@host:port`); default: the agent's
    /// own broker, login and CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Password file of `url`'s user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// CA of an `mqtts://` `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The device family's topic and field layout.
    #[serde(default)]
    pub convention: Convention,
    /// The device: Zigbee2MQTT friendly name, Tasmota topic, Shelly id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Zigbee2MQTT base topic.
    #[serde(default = "default_base")]
    pub base: String,
    /// The state topic (required with `custom`, overrides the convention's otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Dotted path of the numeric field (`power`, `ENERGY.Power`, `params.switch:0.apower`);
    /// default per convention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Windows.
    #[serde(default)]
    pub windowing: Windowing,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("url", &self.url.as_deref().map(hearth_edge::url::redact))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("convention", &self.convention)
            .field("device", &self.device)
            .field("base", &self.base)
            .field("topic", &self.topic)
            .field("field", &self.field)
            .field("windowing", &self.windowing)
            .finish()
    }
}

fn default_base() -> String {
    "zigbee2mqtt".into()
}

/// `[source] kind = "command"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSource {
    /// Program whose stdout gives one sample per line (all channels of the task, separated
    /// by commas or spaces); `-` reads the agent's own stdin.
    pub program: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Start the program again when it exits (after a back-off); otherwise the source ends.
    #[serde(default = "yes")]
    pub restart: bool,
    /// Windows.
    #[serde(default)]
    pub windowing: Windowing,
}

fn yes() -> bool {
    true
}

impl MqttSource {
    /// The state topic the source subscribes to.
    pub fn topic(&self) -> Result<String, String> {
        if let Some(t) = &self.topic {
            return Ok(t.clone());
        }
        let dev = self
            .device
            .as_deref()
            .ok_or("source.device (or source.topic) is required")?;
        Ok(match self.convention {
            Convention::Zigbee2mqtt => format!("{}/{dev}", self.base),
            Convention::Tasmota => format!("tele/{dev}/SENSOR"),
            Convention::Shelly => format!("{dev}/status/switch:0"),
            Convention::ShellyRpc => format!("{dev}/events/rpc"),
            Convention::Custom => return Err("source.topic is required with custom".into()),
        })
    }

    /// The field path read from each message.
    pub fn field(&self) -> String {
        self.field.clone().unwrap_or_else(|| {
            match self.convention {
                Convention::Zigbee2mqtt => "power",
                Convention::Tasmota => "ENERGY.Power",
                Convention::Shelly => "apower",
                Convention::ShellyRpc => "params.switch:0.apower",
                Convention::Custom => "",
            }
            .into()
        })
    }
}

impl SourceConfig {
    /// The windowing of a live source (`None` for replay).
    pub fn windowing(&self) -> Option<&Windowing> {
        match self {
            SourceConfig::Replay => None,
            SourceConfig::Mqtt(m) => Some(&m.windowing),
            SourceConfig::Command(c) => Some(&c.windowing),
        }
    }

    /// Checks the source against the task's channels and fixed input length; the message
    /// names the field.
    pub fn validate(&self, channels: usize, task_length: Option<usize>) -> Result<(), String> {
        let Some(w) = self.windowing() else {
            return Ok(());
        };
        match self {
            SourceConfig::Mqtt(m) => {
                if channels != 1 {
                    return Err(format!(
                        "source: an MQTT source reads one field, the task has {channels} channels \
                         (use a command source)"
                    ));
                }
                let topic = m.topic()?;
                if topic.is_empty() || topic.contains(['+', '#']) {
                    return Err(format!("source.topic {topic:?}: one topic, no wildcards"));
                }
                if let Some(u) = &m.url {
                    hearth_edge::MqttUrl::parse(u).map_err(|e| format!("source.url: {e}"))?;
                }
            }
            SourceConfig::Command(c) => {
                if c.program.trim().is_empty() {
                    return Err("source.program must not be empty".into());
                }
            }
            SourceConfig::Replay => {}
        }
        let window = w
            .window
            .or(task_length)
            .ok_or("source.windowing.window is required: the task's input has no fixed length")?;
        if window < 2 {
            return Err(format!(
                "source.windowing.window {window} must be at least 2"
            ));
        }
        if let Some(l) = task_length {
            if window != l {
                return Err(format!(
                    "source.windowing.window {window}: the task takes exactly {l} samples per \
                     channel (add a resample step to the task file to take other lengths)"
                ));
            }
        }
        if w.hop == Some(0) {
            return Err("source.windowing.hop must be at least 1".into());
        }
        if let Some(r) = w.rate_hz {
            if !(r.is_finite() && r > 0.0 && r <= 100_000.0) {
                return Err(format!(
                    "source.windowing.rate_hz {r} must be in (0, 100000]"
                ));
            }
        }
        Ok(())
    }
}

/// Why a message or line gave no reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The field is absent or null (e.g. a status message without the measurement).
    Missing,
    /// Not JSON, not a number, not finite, too large, or the wrong number of channels.
    Malformed(String),
}

/// Reads the number at `path` (dotted; object keys or array indices) of a JSON state
/// message; an empty path takes the whole payload as the number (`12.5` or `"12.5"`).
pub fn read_field(payload: &[u8], path: &str) -> Result<f32, Skip> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Skip::Malformed(format!("{} bytes", payload.len())));
    }
    if path.is_empty() {
        let text = std::str::from_utf8(payload)
            .map_err(|_| Skip::Malformed("not UTF-8".into()))?
            .trim()
            .trim_matches('"');
        if text.is_empty() {
            return Err(Skip::Missing);
        }
        return finite(text.parse::<f64>().ok(), text);
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| Skip::Malformed(format!("not JSON: {e}")))?;
    let mut at = &v;
    for key in path.split('.') {
        let next = match at {
            serde_json::Value::Object(o) => o.get(key),
            serde_json::Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => at = n,
            None => return Err(Skip::Missing),
        }
    }
    match at {
        serde_json::Value::Null => Err(Skip::Missing),
        serde_json::Value::Number(n) => finite(n.as_f64(), &n.to_string()),
        serde_json::Value::String(s) => finite(s.trim().parse::<f64>().ok(), s),
        other => Err(Skip::Malformed(format!(
            "`{path}` is {other}, not a number"
        ))),
    }
}

fn finite(v: Option<f64>, text: &str) -> Result<f32, Skip> {
    match v {
        Some(x) if x.is_finite() && x.abs() <= f32::MAX as f64 => Ok(x as f32),
        _ => Err(Skip::Malformed(format!(
            "{:?} is not a finite number",
            text.chars().take(32).collect::<String>()
        ))),
    }
}

/// Parses one line of `channels` numbers separated by commas and/or white space.
pub fn read_line(line: &str, channels: usize) -> Result<Vec<f32>, Skip> {
    let line = line.trim();
    if line.is_empty() {
        return Err(Skip::Missing);
    }
    let mut out = Vec::with_capacity(channels);
    for tok in line
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
    {
        if out.len() == channels {
            return Err(Skip::Malformed(format!("more than {channels} values")));
        }
        out.push(finite(tok.parse::<f64>().ok(), tok)?);
    }
    if out.len() != channels {
        return Err(Skip::Malformed(format!(
            "{} values, the task has {channels} channels",
            out.len()
        )));
    }
    Ok(out)
}

/// Turns a stream of timed readings (one value per channel) into sliding windows of
/// `window` samples every `hop` samples, optionally resampled onto a fixed rate first.
#[derive(Debug)]
pub struct Windower {
    channels: usize,
    window: usize,
    hop: usize,
    /// Sample period when resampling.
    period: Option<f64>,
    buf: VecDeque<Vec<f32>>,
    /// Samples produced since the last window (or since start).
    since: usize,
    emitted_any: bool,
    /// Resampling: the previous reading and the next grid time.
    last: Option<(f64, Vec<f32>)>,
    next_t: f64,
}

/// One window, channel-major: `window[c][i]`.
pub type Window = Vec<Vec<f32>>;

impl Windower {
    /// A windower for `channels` channels.
    pub fn new(channels: usize, window: usize, hop: usize, rate_hz: Option<f64>) -> Windower {
        Windower {
            channels,
            window: window.max(1),
            hop: hop.max(1),
            period: rate_hz.map(|r| 1.0 / r),
            buf: VecDeque::with_capacity(window),
            since: 0,
            emitted_any: false,
            last: None,
            next_t: 0.0,
        }
    }

    /// Adds a reading taken at `t` seconds (any monotonic origin); returns the windows
    /// completed by it (several when a resampled gap is filled).
    pub fn push(&mut self, t: f64, values: &[f32]) -> Vec<Window> {
        debug_assert_eq!(values.len(), self.channels);
        let mut out = Vec::new();
        let Some(period) = self.period else {
            self.sample(values.to_vec(), &mut out);
            return out;
        };
        match self.last.take() {
            // A silence longer than a window: the series is broken, start over.
            Some((t0, _)) if t - t0 > period * self.window as f64 || t < t0 => {
                self.buf.clear();
                self.since = 0;
                self.emitted_any = false;
                self.next_t = t;
            }
            None => self.next_t = t,
            Some((t0, v0)) => {
                while self.next_t <= t {
                    let f = if t > t0 {
                        ((self.next_t - t0) / (t - t0)).clamp(0.0, 1.0) as f32
                    } else {
                        1.0
                    };
                    let s = v0
                        .iter()
                        .zip(values)
                        .map(|(a, b)| a + (b - a) * f)
                        .collect();
                    self.sample(s, &mut out);
                    self.next_t += period;
                }
                self.last = Some((t, values.to_vec()));
                return out;
            }
        }
        // First reading (or after a reset): it is the grid's first sample.
        self.sample(values.to_vec(), &mut out);
        self.next_t = t + period;
        self.last = Some((t, values.to_vec()));
        out
    }

    fn sample(&mut self, s: Vec<f32>, out: &mut Vec<Window>) {
        if self.buf.len() == self.window {
            self.buf.pop_front();
        }
        self.buf.push_back(s);
        self.since += 1;
        let due = if self.emitted_any {
            self.since >= self.hop
        } else {
            self.buf.len() == self.window
        };
        if due && self.buf.len() == self.window {
            self.since = 0;
            self.emitted_any = true;
            out.push(
                (0..self.channels)
                    .map(|c| self.buf.iter().map(|s| s[c]).collect())
                    .collect(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_three_conventions() {
        let z2m = br#"{"current":0.42,"energy":1.2,"linkquality":120,"power":95.5,"state":"ON","voltage":231}"#;
        assert_eq!(read_field(z2m, "power"), Ok(95.5));
        assert_eq!(read_field(z2m, "current"), Ok(0.42));
        assert_eq!(read_field(z2m, "voltage"), Ok(231.0));
        let tasmota = br#"{"Time":"2026-11-30T23:00:00","ENERGY":{"TotalStartTime":"2026-01-01T00:00:00","Total":3.2,"Power":61,"Voltage":229,"Current":0.27}}"#;
        assert_eq!(read_field(tasmota, "ENERGY.Power"), Ok(61.0));
        assert_eq!(read_field(tasmota, "ENERGY.Current"), Ok(0.27));
        let shelly = br#"{"id":0,"source":"init","output":true,"apower":12.3,"voltage":230.1,"current":0.054,"aenergy":{"total":5.1,"by_minute":[0,0,0]},"temperature":{"tC":40.1}}"#;
        assert_eq!(read_field(shelly, "apower"), Ok(12.3));
        let rpc = br#"{"src":"shellyplus1pm-a8032ab12345","dst":"shellyplus1pm-a8032ab12345/events","method":"NotifyStatus","params":{"ts":1732000000.5,"switch:0":{"id":0,"apower":47.9}}}"#;
        assert_eq!(read_field(rpc, "params.switch:0.apower"), Ok(47.9));
        let other = br#"{"src":"x","method":"NotifyStatus","params":{"ts":1.0,"switch:0":{"id":0,"temperature":{"tC":41}}}}"#;
        assert_eq!(
            read_field(other, "params.switch:0.apower"),
            Err(Skip::Missing)
        );
        assert_eq!(read_field(br#"{"a":[1,2.5]}"#, "a.1"), Ok(2.5));
        assert_eq!(read_field(b" 12.5\n", ""), Ok(12.5));
        assert_eq!(read_field(br#""7""#, ""), Ok(7.0));
        assert_eq!(read_field(br#"{"power":"13.5"}"#, "power"), Ok(13.5));
    }

    #[test]
    fn bad_readings_are_skips_not_panics() {
        assert_eq!(
            read_field(br#"{"power":null}"#, "power"),
            Err(Skip::Missing)
        );
        assert_eq!(
            read_field(br#"{"state":"ON"}"#, "power"),
            Err(Skip::Missing)
        );
        for bad in [
            &b"not json"[..],
            br#"{"power":"abc"}"#,
            br#"{"power":true}"#,
            br#"{"power":{"x":1}}"#,
            br#"{"power":1e999}"#,
            br#"{"power":1e300}"#,
            b"\xff\xfe",
        ] {
            assert!(
                matches!(read_field(bad, "power"), Err(Skip::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(read_field(b"NaN", ""), Err(Skip::Malformed(_))));
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            read_field(&huge, "power"),
            Err(Skip::Malformed(_))
        ));
        assert_eq!(read_line("1, 2 3", 3), Ok(vec![1.0, 2.0, 3.0]));
        assert_eq!(read_line("  ", 1), Err(Skip::Missing));
        assert!(matches!(read_line("1,2", 3), Err(Skip::Malformed(_))));
        assert!(matches!(read_line("1,2,3,4", 3), Err(Skip::Malformed(_))));
        assert!(matches!(read_line("1,x,3", 3), Err(Skip::Malformed(_))));
        assert!(matches!(read_line("inf", 1), Err(Skip::Malformed(_))));
    }

    #[test]
    fn windows_have_length_and_hop() {
        let mut w = Windower::new(1, 4, 2, None);
        let mut got = Vec::new();
        for i in 0..10 {
            got.extend(w.push(i as f64, &[i as f32]));
        }
        let starts: Vec<f32> = got.iter().map(|w| w[0][0]).collect();
        assert_eq!(starts, [0.0, 2.0, 4.0, 6.0]);
        assert!(got.iter().all(|w| w[0].len() == 4));
        assert_eq!(got[1][0], [2.0, 3.0, 4.0, 5.0]);
        // Two channels, no overlap.
        let mut w = Windower::new(2, 3, 3, None);
        let mut got = Vec::new();
        for i in 0..7 {
            got.extend(w.push(0.0, &[i as f32, -(i as f32)]));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], vec![vec![3.0, 4.0, 5.0], vec![-3.0, -4.0, -5.0]]);
    }

    #[test]
    fn resamples_onto_the_rate() {
        // Readings every 0.5 s of a ramp v = t, resampled at 4 Hz: interpolated values on the
        // 0.25 s grid.
        let mut w = Windower::new(1, 8, 8, Some(4.0));
        let mut got = Vec::new();
        for i in 0..8 {
            let t = 0.5 * i as f64;
            got.extend(w.push(10.0 + t, &[t as f32]));
        }
        assert_eq!(got.len(), 1);
        let expect: Vec<f32> = (0..8).map(|i| 0.25 * i as f32).collect();
        for (a, b) in got[0][0].iter().zip(&expect) {
            assert!((a - b).abs() < 1e-5, "{:?}", got[0][0]);
        }
        // A silence longer than a window starts the series again.
        let mut w = Windower::new(1, 4, 4, Some(1.0));
        assert!(w.push(0.0, &[1.0]).is_empty());
        assert!(w.push(1.0, &[1.0]).is_empty());
        assert!(w.push(100.0, &[2.0]).is_empty(), "no window across the gap");
        let got = w.push(103.0, &[5.0]);
        assert_eq!(got, vec![vec![vec![2.0, 3.0, 4.0, 5.0]]]);
    }
}
