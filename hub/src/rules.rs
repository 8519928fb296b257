//! Rules: a TOML file that maps validated events to actuator commands.
//!
//! ```toml
//! [[rule]]
//! name = "porch light when someone is at the door"
//! [rule.when]
//! device = "door-cam"      # optional; `*` wildcards allowed ("cam-*"); any device if absent
//! event = "detection"      # optional; same syntax
//! class = "person"         # optional; same syntax
//! min_score = 0.8          # optional, default 0
//! [rule.then]
//! actuator = "porch_light" # command goes to <actuator_base>/porch_light/set
//! payload = { state = "ON" }
//! cooldown_secs = 10       # optional: do not fire again within this window
//! ```
//!
//! Rules are compiled once at load time (topic and JSON payload pre-rendered), so
//! matching an event allocates nothing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hearth_proto::mqtt::Event;
use serde::Deserialize;
use toml::Spanned;

/// Largest rendered command payload, in bytes.
pub const MAX_COMMAND_BYTES: usize = 1024;
/// Most rules one file may hold.
pub const MAX_RULES: usize = 1000;

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
    rule: Vec<RuleToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    name: Spanned<String>,
    #[serde(default = "yes")]
    enabled: bool,
    when: WhenToml,
    then: ThenToml,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhenToml {
    device: Option<Spanned<String>>,
    event: Option<Spanned<String>>,
    class: Option<Spanned<String>>,
    min_score: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThenToml {
    actuator: Spanned<String>,
    payload: Spanned<toml::Value>,
    cooldown_secs: Option<Spanned<f64>>,
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

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule's name from the file.
    pub name: String,
    /// Device (topic level) pattern.
    pub device: Pattern,
    /// Event name (last topic level) pattern.
    pub event: Pattern,
    /// Class pattern.
    pub class: Pattern,
    /// Lowest score that fires.
    pub min_score: f32,
    /// Actuator name.
    pub actuator: String,
    /// `<base>/<actuator>/set`.
    pub topic: String,
    /// JSON command payload.
    pub payload: Vec<u8>,
    /// Minimum time between two firings.
    pub cooldown: Duration,
    /// Milliseconds since the rule set's epoch of the last firing, plus one (0 = never).
    last_fired: AtomicU64,
}

impl Rule {
    /// Whether the event satisfies the rule's trigger (ignores the cooldown).
    pub fn matches(&self, device: &str, event_name: &str, ev: &Event) -> bool {
        ev.score >= self.min_score
            && self.class.matches(&ev.class)
            && self.device.matches(device)
            && self.event.matches(event_name)
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
        // One router task fires rules; a lost race means someone else just fired it.
        self.last_fired
            .compare_exchange(last, stamp, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The loaded rules.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    epoch: Instant,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

impl RuleSet {
    /// No rules.
    pub fn empty() -> RuleSet {
        RuleSet {
            rules: Vec::new(),
            epoch: Instant::now(),
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
        let mut rules: Vec<Rule> = Vec::with_capacity(file.rule.len());
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
            if rules.iter().any(|x| x.name == name) {
                return Err(invalid(r.name.span(), "duplicate rule name".into()));
            }
            let pattern = |field: &Option<Spanned<String>>,
                           what: &str|
             -> Result<Pattern, RulesError> {
                let Some(f) = field else {
                    return Ok(Pattern::Any);
                };
                let s = f.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= 64
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "*_-.:@+ ".contains(c));
                if ok {
                    Ok(Pattern::compile(s))
                } else {
                    Err(invalid(
                        f.span(),
                        format!("when.{what} `{s}` must be 1-64 characters of [A-Za-z0-9_-.:@+ ] or `*`"),
                    ))
                }
            };
            let device = pattern(&r.when.device, "device")?;
            let event = pattern(&r.when.event, "event")?;
            let class = pattern(&r.when.class, "class")?;
            let min_score = match &r.when.min_score {
                None => 0.0,
                Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref() as f32,
                Some(s) => {
                    return Err(invalid(
                        s.span(),
                        format!("when.min_score {} must be within 0..=1", s.get_ref()),
                    ))
                }
            };
            let actuator = r.then.actuator.get_ref().clone();
            if let Err(m) = check_actuator(&actuator) {
                return Err(invalid(r.then.actuator.span(), m));
            }
            let payload = render_payload(r.then.payload.get_ref())
                .map_err(|m| invalid(r.then.payload.span(), m))?;
            let cooldown = match &r.then.cooldown_secs {
                None => Duration::ZERO,
                Some(c) if c.get_ref().is_finite() && (0.0..=86_400.0).contains(c.get_ref()) => {
                    Duration::from_secs_f64(*c.get_ref())
                }
                Some(c) => {
                    return Err(invalid(
                        c.span(),
                        format!(
                            "then.cooldown_secs {} must be within 0..=86400",
                            c.get_ref()
                        ),
                    ))
                }
            };
            if !r.enabled {
                continue;
            }
            rules.push(Rule {
                topic: format!("{actuator_base}/{actuator}/set"),
                name,
                device,
                event,
                class,
                min_score,
                actuator,
                payload,
                cooldown,
                last_fired: AtomicU64::new(0),
            });
        }
        Ok(RuleSet {
            rules,
            epoch: Instant::now(),
        })
    }

    /// The enabled rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Number of enabled rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no enabled rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Calls `fire` for every rule the event triggers at `now` that is outside its
    /// cooldown (claiming the firing). Returns how many rules matched, fired or not.
    pub fn dispatch<'a>(
        &'a self,
        device: &str,
        event_name: &str,
        ev: &Event,
        now: Instant,
        mut fire: impl FnMut(&'a Rule),
    ) -> usize {
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX - 1);
        let mut matched = 0;
        for r in &self.rules {
            if r.matches(device, event_name, ev) {
                matched += 1;
                if r.try_fire(now_ms) {
                    fire(r);
                }
            }
        }
        matched
    }
}

fn check_actuator(a: &str) -> Result<(), String> {
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
            "then.actuator `{a}` is not a usable actuator name (no wildcards, empty levels, \
             trailing `/set` or `bridge/` topics)"
        ))
    } else {
        Ok(())
    }
}

/// Checks a command payload (a TOML table) and renders it as JSON.
fn render_payload(v: &toml::Value) -> Result<Vec<u8>, String> {
    let toml::Value::Table(t) = v else {
        return Err("then.payload must be a table, e.g. { state = \"ON\" }".into());
    };
    if t.is_empty() {
        return Err("then.payload is empty".into());
    }
    if let Some(s) = t.get("state") {
        match s.as_str() {
            Some("ON" | "OFF" | "TOGGLE") => {}
            _ => return Err("then.payload.state must be \"ON\", \"OFF\" or \"TOGGLE\"".into()),
        }
    }
    fn plain(v: &toml::Value) -> bool {
        match v {
            toml::Value::Datetime(_) => false,
            toml::Value::Array(a) => a.iter().all(plain),
            toml::Value::Table(t) => t.values().all(plain),
            _ => true,
        }
    }
    if !plain(v) {
        return Err("then.payload cannot contain TOML dates (use strings)".into());
    }
    let json = serde_json::to_vec(v).map_err(|e| format!("then.payload: {e}"))?;
    if json.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "then.payload renders to {} bytes; at most {MAX_COMMAND_BYTES}",
            json.len()
        ));
    }
    Ok(json)
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

    fn ev(class: &str, score: f32) -> Event {
        Event {
            class: class.into(),
            score,
            model: "door-cam@1".into(),
            ts: "2026-01-01T00:00:00Z".into(),
            id: None,
        }
    }

    #[test]
    fn compiles_the_documented_example() {
        let rs = RuleSet::parse(PORCH, "rules.toml", "zigbee2mqtt").unwrap();
        assert_eq!(rs.len(), 1);
        let r = &rs.rules()[0];
        assert_eq!(r.topic, "zigbee2mqtt/porch_light/set");
        assert_eq!(r.payload, br#"{"state":"ON"}"#);
        assert_eq!(r.cooldown, Duration::from_secs(10));
        assert!(r.matches("door-cam", "detection", &ev("person", 0.8)));
        assert!(!r.matches("door-cam", "detection", &ev("person", 0.79)));
        assert!(!r.matches("door-cam", "detection", &ev("cat", 0.99)));
        assert!(!r.matches("garden-cam", "detection", &ev("person", 0.99)));
    }

    #[test]
    fn cooldown_suppresses_refiring() {
        let rs = RuleSet::parse(PORCH, "r", "z2m").unwrap();
        let t0 = Instant::now();
        let mut fired = 0;
        let e = ev("person", 0.9);
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
    fn globs() {
        assert!(glob(b"cam-*", b"cam-1"));
        assert!(glob(b"*-cam", b"door-cam"));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"cam-*", b"door"));
        assert_eq!(Pattern::compile("*"), Pattern::Any);
        let text = "[[rule]]\nname='any cam'\n[rule.when]\ndevice='*cam'\n[rule.then]\nactuator='l'\npayload={state='TOGGLE'}\n";
        let rs = RuleSet::parse(text, "r", "z").unwrap();
        assert!(rs.rules()[0].matches("door-cam", "x", &ev("cat", 0.0)));
        assert!(!rs.rules()[0].matches("plug", "x", &ev("cat", 0.0)));
    }

    #[test]
    fn unknown_field_names_rule_and_line() {
        let text = PORCH.replace("class = \"person\"", "clas = \"person\"");
        let e = RuleSet::parse(&text, "rules.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("rules.toml: rule #1 (\"porch light when someone is at the door\")"),
            "{e}"
        );
        assert!(e.contains("unknown field `clas`"), "{e}");
        assert!(e.contains("line 7"), "{e}");
    }

    #[test]
    fn semantic_errors_name_rule_and_line() {
        let text = format!("{PORCH}\n[[rule]]\nname = \"second\"\n[rule.when]\nclass = \"person\"\nmin_score = 1.5\n[rule.then]\nactuator = \"x\"\npayload = {{ state = \"ON\" }}\n");
        let e = RuleSet::parse(&text, "rules.toml", "z")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rules.toml:18: rule \"second\": when.min_score 1.5 must be within 0..=1"
        );

        let bad_state = PORCH.replace("state = \"ON\"", "state = \"on\"");
        let e = RuleSet::parse(&bad_state, "r.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "r.toml:11: rule \"porch light when someone is at the door\": then.payload.state"
            ),
            "{e}"
        );

        let wild = PORCH.replace("\"porch_light\"", "\"lights/#\"");
        let e = RuleSet::parse(&wild, "r.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":10:") && e.contains("then.actuator"), "{e}");

        let dup = format!("{PORCH}{PORCH}");
        let e = RuleSet::parse(&dup, "r.toml", "z").unwrap_err().to_string();
        assert!(
            e.contains(":15:") && e.contains("duplicate rule name"),
            "{e}"
        );
    }

    #[test]
    fn missing_section_and_syntax_errors() {
        let text = "[[rule]]\nname = \"no then\"\n[rule.when]\nclass = \"person\"\n";
        let e = RuleSet::parse(text, "r.toml", "z").unwrap_err().to_string();
        assert!(e.contains("missing field `then`"), "{e}");
        assert!(e.contains("rule #1 (\"no then\")"), "{e}");
        let e = RuleSet::parse("[[rule]\nname=1\n", "r.toml", "z")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let rs = RuleSet::parse(
            include_str!("../rules.example.toml"),
            "example",
            "zigbee2mqtt",
        )
        .unwrap();
        assert_eq!(rs.len(), 2);
        assert_eq!(rs.rules()[1].topic, "zigbee2mqtt/kitchen_fan/set");
        assert!(rs.rules()[1].matches("kitchen-plug", "appliance", &ev("microwave", 0.95)));
    }

    #[test]
    fn disabled_rules_are_skipped_and_empty_file_is_fine() {
        let text = PORCH.replace("[rule.when]", "enabled = false\n[rule.when]");
        assert!(RuleSet::parse(&text, "r", "z").unwrap().is_empty());
        assert!(RuleSet::parse("", "r", "z").unwrap().is_empty());
    }
}
