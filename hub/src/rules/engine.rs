//! The live rules engine: the current [`RuleSet`] (swapped whole on a reload), the device
//! states rules read, the firing history, and the executor that turns firings into commands,
//! delays and refreshes.
//!
//! - **Reload.** [`Engine::poll`] checks the file's modification time and size (every
//!   `[rules_engine] reload_secs`), and a content hash decides whether to re-parse;
//!   [`Engine::reload`] (SIGHUP) always re-parses. A file that does not compile is logged
//!   with its message (file, line, problem) and counted, and the last good rules stay.
//!   Rules keep their cooldown, timers and counters across a reload by name.
//! - **Firing.** Event rules are evaluated on the router task: an index lookup, the
//!   trigger's checks, conditions; a firing renders its payloads once. Commands go to the
//!   delivery outbox at once; a `delay` hands the remaining steps to a timer task. Debounced
//!   rules fire from a timer task once their trigger has been quiet for `debounce_secs`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::history::{Firing, History};
use super::{Env, EventFields, Plan, Rule, RuleSet, RulesError, States, Step};
use crate::delivery::{self, now_ms};
use crate::metrics::Metrics;

/// Default interval of the rules file check.
pub const DEFAULT_RELOAD_SECS: u64 = 2;
/// How often time and interval triggers are checked.
pub const TICK: Duration = Duration::from_millis(250);

/// `[rules_engine]` in the hub's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesEngineConfig {
    /// Check the rules file for changes this often (seconds); 0 = only on SIGHUP.
    pub reload_secs: u64,
    /// Firing history (a sled directory); temporary (lost at exit) when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<PathBuf>,
    /// Most firings the history keeps (the oldest go first).
    pub history_max: usize,
    /// Most firings of any one rule the history keeps (that rule's oldest go first), so a
    /// busy rule cannot push the others' history out.
    pub history_max_per_rule: usize,
}

impl Default for RulesEngineConfig {
    fn default() -> Self {
        RulesEngineConfig {
            reload_secs: DEFAULT_RELOAD_SECS,
            history: None,
            history_max: super::history::DEFAULT_MAX_ENTRIES,
            history_max_per_rule: super::history::DEFAULT_MAX_PER_RULE,
        }
    }
}

impl RulesEngineConfig {
    /// Checks the bounds; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.reload_secs > 3600 {
            return Err("rules_engine.reload_secs must be within 0..=3600".into());
        }
        if !(1..=10_000_000).contains(&self.history_max) {
            return Err("rules_engine.history_max must be within 1..=10000000".into());
        }
        if !(1..=10_000_000).contains(&self.history_max_per_rule) {
            return Err("rules_engine.history_max_per_rule must be within 1..=10000000".into());
        }
        Ok(())
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// New rules are in force (this many).
    Loaded(usize),
    /// The file did not change.
    Unchanged,
}

#[derive(Debug, Default)]
struct FileSeen {
    stamp: Option<(Option<SystemTime>, u64)>,
    hash: Option<u64>,
}

/// The rules in force and what they read.
#[derive(Debug)]
pub struct Engine {
    current: RwLock<Arc<RuleSet>>,
    /// Device states and availability, for state triggers and conditions.
    pub states: States,
    path: Option<PathBuf>,
    actuator_base: String,
    seen: Mutex<FileSeen>,
    /// Successful reloads.
    pub reloads: AtomicU64,
    /// Reloads refused (the file did not compile; the last good rules stayed).
    pub reload_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Firing history.
    pub history: History,
}

fn hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn stamp(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len()))
}

impl Engine {
    /// An engine with `rules` (loaded from `path`, if any) and `history`.
    pub fn new(
        rules: RuleSet,
        path: Option<PathBuf>,
        actuator_base: &str,
        history: History,
    ) -> Engine {
        let seen = FileSeen {
            stamp: path.as_deref().and_then(stamp),
            hash: path
                .as_deref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| hash(&t)),
        };
        Engine {
            current: RwLock::new(Arc::new(rules)),
            states: States::default(),
            path,
            actuator_base: actuator_base.to_string(),
            seen: Mutex::new(seen),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            history,
        }
    }

    /// The rules in force.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The message of the last refused reload, if the last reload failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the rules file; `force` re-parses even an unchanged file. A file that does
    /// not compile leaves the rules in force, is logged and counted.
    pub fn reload(&self, force: bool) -> Result<Reloaded, RulesError> {
        let Some(path) = &self.path else {
            return Ok(Reloaded::Unchanged);
        };
        let st = stamp(path);
        let result = std::fs::read_to_string(path)
            .map_err(|source| RulesError::Read {
                path: path.display().to_string(),
                source,
            })
            .and_then(|text| {
                let h = hash(&text);
                {
                    let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                    seen.stamp = st;
                    if !force && seen.hash == Some(h) {
                        return Ok(None);
                    }
                    seen.hash = Some(h);
                }
                RuleSet::parse(&text, &path.display().to_string(), &self.actuator_base).map(Some)
            });
        match result {
            Ok(None) => Ok(Reloaded::Unchanged),
            Ok(Some(mut rules)) => {
                let n = rules.len();
                {
                    let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
                    rules.inherit(&cur);
                    *cur = Arc::new(rules);
                }
                self.reloads.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tracing::info!(path = %path.display(), rules = n, "rules reloaded");
                Ok(Reloaded::Loaded(n))
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                tracing::error!(path = %path.display(), error = %e, "rules reload refused; the last good rules stay in force");
                Err(e)
            }
        }
    }

    /// Reloads when the file's modification time or size changed since the last look.
    pub fn poll(&self) -> Option<Result<Reloaded, RulesError>> {
        let path = self.path.as_deref()?;
        let st = stamp(path);
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.stamp == st {
                return None;
            }
        }
        Some(self.reload(false))
    }

    /// Prometheus text: firings per rule, reloads, rules in force, history.
    pub fn render_prometheus(&self, out: &mut String) {
        let rules = self.current();
        out.push_str(
            "# HELP hearth_hub_rules_fired_total Rule firings since the hub started, by rule.\n",
        );
        out.push_str("# TYPE hearth_hub_rules_fired_total counter\n");
        for r in rules.rules() {
            let mut name = String::with_capacity(r.name.len());
            for c in r.name.chars() {
                match c {
                    '\\' => name.push_str("\\\\"),
                    '"' => name.push_str("\\\""),
                    '\n' => name.push_str("\\n"),
                    c => name.push(c),
                }
            }
            let _ = writeln!(
                out,
                "hearth_hub_rules_fired_total{{rule=\"{name}\"}} {}",
                r.fired()
            );
        }
        out.push_str("# HELP hearth_hub_rules_loaded Rules in force.\n# TYPE hearth_hub_rules_loaded gauge\n");
        let _ = writeln!(out, "hearth_hub_rules_loaded {}", rules.len());
        out.push_str("# HELP hearth_hub_rules_reloads_total Rules file reloads, by result (error: the last good rules stayed).\n");
        out.push_str("# TYPE hearth_hub_rules_reloads_total counter\n");
        let _ = writeln!(
            out,
            "hearth_hub_rules_reloads_total{{result=\"ok\"}} {}",
            self.reloads.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "hearth_hub_rules_reloads_total{{result=\"error\"}} {}",
            self.reload_failures.load(Ordering::Relaxed)
        );
        out.push_str("# HELP hearth_hub_rules_history_written_total Firings written to the history.\n# TYPE hearth_hub_rules_history_written_total counter\n");
        let _ = writeln!(
            out,
            "hearth_hub_rules_history_written_total {}",
            self.history.written.load(Ordering::Relaxed)
        );
        out.push_str("# HELP hearth_hub_rules_history_dropped_total Firings not written: the history writer was behind.\n# TYPE hearth_hub_rules_history_dropped_total counter\n");
        let _ = writeln!(
            out,
            "hearth_hub_rules_history_dropped_total {}",
            self.history.dropped.load(Ordering::Relaxed)
        );
    }
}

/// Starts federated rounds for `refresh` actions (the router's refresh path).
pub(crate) type RefreshFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Carries firings out: commands into the outbox, delays on timers, refreshes.
pub(crate) struct Executor {
    pub(crate) engine: Arc<Engine>,
    commands: delivery::Sender,
    refresh: RefreshFn,
    metrics: Arc<Metrics>,
    debounce: Mutex<HashMap<String, u64>>,
    /// The subscriber's client and its filter list (re-sent at every ConnAck), to follow
    /// the topics new rules need after a reload.
    subs: Mutex<Option<Subscriber>>,
}

type Fired<'a> = Vec<(&'a Rule, Plan)>;

/// The subscriber's client and the filters it (re)subscribes at every ConnAck.
type Subscriber = (rumqttc::AsyncClient, Arc<Mutex<Vec<String>>>);

impl Executor {
    pub(crate) fn new(
        engine: Arc<Engine>,
        commands: delivery::Sender,
        refresh: RefreshFn,
        metrics: Arc<Metrics>,
    ) -> Executor {
        Executor {
            engine,
            commands,
            refresh,
            metrics,
            debounce: Mutex::new(HashMap::new()),
            subs: Mutex::new(None),
        }
    }

    pub(crate) fn set_subscriber(
        &self,
        client: rumqttc::AsyncClient,
        filters: Arc<Mutex<Vec<String>>>,
    ) {
        *self.subs.lock().unwrap_or_else(|p| p.into_inner()) = Some((client, filters));
    }

    fn env(&self, now: Instant) -> Env<'_> {
        Env {
            now,
            unix_ms: now_ms(),
            states: &self.engine.states,
        }
    }

    /// Routes one valid event; returns (rules matched, rules fired).
    pub(crate) async fn on_event(
        self: &Arc<Self>,
        event: EventFields<'_>,
        received: Instant,
    ) -> (usize, usize) {
        let rules = self.engine.current();
        let mut fired: Fired<'_> = Vec::new();
        let counts = rules.on_event(event, &self.env(received), |r, p| fired.push((r, p)));
        if !fired.is_empty() {
            self.carry_out(&rules, fired, Some(received)).await;
        }
        counts
    }

    /// A state document of `device` (`<base>/<device>`).
    pub(crate) async fn on_state(self: &Arc<Self>, device: &str, payload: &[u8]) -> bool {
        let Ok(doc) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
        else {
            return false;
        };
        let rules = self.engine.current();
        let now = Instant::now();
        let mut fired: Fired<'_> = Vec::new();
        rules.on_state(device, &doc, &self.env(now), |r, p| fired.push((r, p)));
        self.carry_out(&rules, fired, Some(now)).await;
        true
    }

    /// Availability of a device or actuator.
    pub(crate) async fn on_availability(self: &Arc<Self>, device: &str, online: bool) {
        let rules = self.engine.current();
        let now = Instant::now();
        let mut fired: Fired<'_> = Vec::new();
        rules.on_availability(device, online, &self.env(now), |r, p| fired.push((r, p)));
        self.carry_out(&rules, fired, Some(now)).await;
    }

    /// Time and interval triggers.
    pub(crate) async fn tick(self: &Arc<Self>) {
        let rules = self.engine.current();
        let now = Instant::now();
        let mut fired: Fired<'_> = Vec::new();
        rules.on_tick(&self.env(now), |r, p| fired.push((r, p)));
        self.carry_out(&rules, fired, None).await;
    }

    /// Checks the file and reloads (`force`: always re-parse, as on SIGHUP); follows the
    /// topics the new rules need.
    pub(crate) fn reload(&self, force: bool) -> Option<Result<Reloaded, RulesError>> {
        let r = if force {
            Some(self.engine.reload(true))
        } else {
            self.engine.poll()
        };
        if let Some(Ok(Reloaded::Loaded(_))) = &r {
            self.follow_topics();
        }
        r
    }

    fn follow_topics(&self) {
        let guard = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        let Some((client, filters)) = guard.as_ref() else {
            return;
        };
        let wanted =
            crate::router::subscriptions(&self.engine.current(), &self.engine.actuator_base);
        let mut have = filters.lock().unwrap_or_else(|p| p.into_inner());
        let new: Vec<String> = wanted
            .iter()
            .filter(|t| !have.iter().any(|f| covers(f, t)))
            .cloned()
            .collect();
        if new.is_empty() {
            return;
        }
        have.extend(new.iter().cloned());
        let subs = new
            .into_iter()
            .map(|f| rumqttc::SubscribeFilter::new(f, rumqttc::QoS::AtLeastOnce));
        if let Err(e) = client.try_subscribe_many(subs) {
            tracing::warn!(error = %e, "cannot subscribe to the topics of the reloaded rules (done at the next reconnect)");
        }
    }

    async fn carry_out(
        self: &Arc<Self>,
        rules: &Arc<RuleSet>,
        fired: Fired<'_>,
        received: Option<Instant>,
    ) {
        for (r, plan) in fired {
            if r.debounce.is_zero() {
                self.fire(r, plan, received).await;
            } else {
                self.debounced(rules.clone(), r, plan);
            }
        }
    }

    /// Restarts `r`'s debounce timer with `plan`; fires it if nothing newer came in time.
    fn debounced(self: &Arc<Self>, rules: Arc<RuleSet>, r: &Rule, plan: Plan) {
        let gen = {
            let mut m = self.debounce.lock().unwrap_or_else(|p| p.into_inner());
            let g = m.entry(r.name.clone()).or_insert(0);
            *g += 1;
            *g
        };
        let me = self.clone();
        let wait = r.debounce;
        let name = r.name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let current = me
                .debounce
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .copied();
            if current != Some(gen) {
                return; // a newer trigger restarted the timer
            }
            let Some(r) = rules.rules().iter().find(|r| r.name == name) else {
                return;
            };
            if rules.claim(r, Instant::now()) {
                me.fire(r, plan, None).await;
            } else {
                Metrics::inc(&me.metrics.cooldown_suppressed);
            }
        });
    }

    async fn fire(self: &Arc<Self>, r: &Rule, plan: Plan, received: Option<Instant>) {
        r.fired.fetch_add(1, Ordering::Relaxed);
        Metrics::inc(&self.metrics.rules_fired);
        self.engine.history.record(Firing::of(&plan, now_ms()));
        tracing::debug!(rule = %plan.rule, trigger = %plan.trigger, steps = plan.steps.len(), "rule fired");
        self.clone()
            .run_steps(plan.rule, plan.steps, received)
            .await;
    }

    fn run_steps(
        self: Arc<Self>,
        rule: String,
        steps: Vec<Step>,
        received: Option<Instant>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let mut steps = steps.into_iter();
            while let Some(s) = steps.next() {
                match s {
                    Step::Command {
                        actuator,
                        topic,
                        payload,
                    } => {
                        if !self
                            .commands
                            .command_at(&actuator, &topic, payload.as_bytes(), received)
                            .await
                        {
                            Metrics::inc(&self.metrics.commands_failed);
                            tracing::warn!(rule = %rule, topic = %topic, "command not queued: delivery stopped");
                        }
                    }
                    Step::Delay(d) => {
                        let rest: Vec<Step> = steps.collect();
                        let me = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(d).await;
                            me.run_steps(rule, rest, None).await;
                        });
                        return;
                    }
                    Step::Refresh(model) => {
                        tracing::info!(rule = %rule, model = %model, "rule asks for a federated refresh");
                        (self.refresh)(&model);
                    }
                }
            }
        })
    }
}

/// Whether MQTT filter `f` already delivers topic `t` (so subscribing `t` too would make a
/// broker deliver its messages twice through overlapping subscriptions).
fn covers(f: &str, t: &str) -> bool {
    let mut fs = f.split('/');
    let mut ts = t.split('/');
    loop {
        match (fs.next(), ts.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod covers_tests {
    use super::covers;

    #[test]
    fn wildcards_cover_concrete_topics() {
        assert!(covers("z2m/+/availability", "z2m/lamp/availability"));
        assert!(covers("z2m/#", "z2m/lamp/availability"));
        assert!(covers("z2m/lamp", "z2m/lamp"));
        assert!(!covers("z2m/+", "z2m/lamp/availability"));
        assert!(!covers("z2m/+/availability", "z2m/lamp"));
    }
}
