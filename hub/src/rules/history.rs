//! Rule firing history, persisted in sled and bounded.
//!
//! The router never waits for the disk: firings go through a bounded channel to a writer
//! thread (a full channel drops the entry and counts it). Keys are a big-endian sequence
//! number, so the tree iterates in firing order; beyond `max_entries` the oldest entries
//! are removed, and beyond `max_per_rule` entries of one rule that rule's oldest, so a rule
//! firing thousands of times an hour cannot push every other rule's history out. Without a
//! path the tree lives in a temporary sled database.
//!
//! **Cost.** What is stored (each sequence number and its rule) is kept in memory, read
//! from the tree at start-up, so the writer's only tree operations are one insert per
//! firing and one remove per eviction; nothing is read back. (The first version kept a
//! second tree indexing firings by rule, and per firing did four tree operations, a JSON
//! parse of the evicted firing and a prefix scan: with sled's page copies and its I/O
//! threads, most of the hub's CPU at 10,000 events/s, measured with `perf`. sled's
//! `apply_batch` is no cheaper: every batch seals the log buffer, one write per batch. That
//! index tree, if present, is dropped at start-up; an older hub rebuilds it from the
//! firings.) The writer sleeps [`LINGER`] after the first firing of a burst and then takes
//! all that queued (at most [`MAX_BATCH`]), so the router's sends wake nobody.
//!
//! **What a crash loses.** A clean shutdown ([`History::close`]) writes everything queued
//! and flushes. A crash (SIGKILL, power loss) loses at most the firings still queued
//! (≤ [`CHANNEL`]), those the writer took in the last [`LINGER`] and what sled had not
//! flushed to disk (every [`FLUSH_EVERY_MS`] ms): about the last quarter second of firings.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Plan, Step};

/// Default bound of the history.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Default bound of one rule's entries.
pub const DEFAULT_MAX_PER_RULE: usize = 1_000;
/// Entries waiting for the writer; more are dropped (and counted).
pub const CHANNEL: usize = 4096;
/// Most firings the writer gathers into one write.
pub const MAX_BATCH: usize = 1024;
/// How long the writer lets firings gather after the first before writing them.
pub const LINGER: Duration = Duration::from_millis(20);
/// sled writes its log to disk this often (ms).
pub const FLUSH_EVERY_MS: u64 = 200;
const TREE: &str = "firings";
const BY_RULE: &str = "firings_by_rule";

/// Why the history could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("rules history {path}: {source}")]
pub struct HistoryError {
    path: String,
    source: sled::Error,
}

/// One command of a firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiredCommand {
    pub topic: String,
    pub payload: String,
    /// Seconds after the firing it is due (delays before it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after_secs: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// One firing as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firing {
    /// Sequence number (monotonic across restarts).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub at_ms: u64,
    pub rule: String,
    pub trigger: String,
    #[serde(default)]
    pub commands: Vec<FiredCommand>,
    /// Models whose federated round it asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refresh: Vec<String>,
}

impl Firing {
    /// The record of a plan fired at `at_ms`.
    pub fn of(plan: &Plan, at_ms: u64) -> Firing {
        let mut after = 0.0;
        let mut commands = Vec::new();
        let mut refresh = Vec::new();
        for s in &plan.steps {
            match s {
                Step::Command { topic, payload, .. } => commands.push(FiredCommand {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    after_secs: after,
                }),
                Step::Delay(d) => after += d.as_secs_f64(),
                Step::Refresh(m) => refresh.push(m.clone()),
            }
        }
        Firing {
            seq: 0,
            at_ms,
            rule: plan.rule.clone(),
            trigger: plan.trigger.clone(),
            commands,
            refresh,
        }
    }
}

struct Open {
    tree: sled::Tree,
    tx: std::sync::mpsc::SyncSender<Firing>,
    writer: std::thread::JoinHandle<()>,
}

/// The firing history.
pub struct History {
    open: Mutex<Option<Open>>,
    path: Option<PathBuf>,
    /// Entries dropped because the writer was behind.
    pub dropped: AtomicU64,
    /// Entries written.
    pub written: std::sync::Arc<AtomicU64>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// sled's page cache for the history database (bytes).
const SLED_CACHE_BYTES: u64 = 4 << 20;

/// Opens the tree (for the hub or the CLI).
pub fn open_tree(path: Option<&Path>) -> Result<sled::Tree, HistoryError> {
    let err = |source| HistoryError {
        path: path.map_or("(temporary)".into(), |p| p.display().to_string()),
        source,
    };
    let db = match path {
        // sled's page cache defaults to 1 GiB and grows with every firing written: bounded
        // here so the hub's RSS stays flat over a long run (as the agent's sample store).
        Some(p) => sled::Config::new()
            .path(p)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(Some(FLUSH_EVERY_MS))
            .open(),
        None => sled::Config::new()
            .temporary(true)
            .cache_capacity(SLED_CACHE_BYTES)
            .open(),
    }
    .map_err(err)?;
    // The by-rule index of earlier versions (see the module notes).
    if db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == BY_RULE.as_bytes())
    {
        db.drop_tree(BY_RULE).map_err(err)?;
    }
    db.open_tree(TREE).map_err(err)
}

/// The writer's side: the tree, the next sequence number, and what is stored: every
/// sequence number with its rule, in order, and each rule's sequence numbers, so evictions
/// need no read of the tree.
struct Writer {
    firings: sled::Tree,
    seq: u64,
    /// Every stored firing: sequence number → rule.
    order: std::collections::BTreeMap<u64, std::sync::Arc<str>>,
    /// Each rule's stored sequence numbers, oldest first.
    per_rule: std::collections::HashMap<std::sync::Arc<str>, VecDeque<u64>>,
    max_entries: usize,
    max_per_rule: usize,
}

impl Writer {
    fn new(firings: sled::Tree, max_entries: usize, max_per_rule: usize) -> Writer {
        #[derive(Deserialize)]
        struct RuleOf<'a> {
            #[serde(borrow)]
            rule: std::borrow::Cow<'a, str>,
        }
        let mut w = Writer {
            firings,
            seq: 0,
            order: std::collections::BTreeMap::new(),
            per_rule: std::collections::HashMap::new(),
            max_entries,
            max_per_rule,
        };
        for (k, v) in w.firings.iter().flatten() {
            let (Ok(f), Ok(seq)) = (
                serde_json::from_slice::<RuleOf<'_>>(&v),
                <[u8; 8]>::try_from(k.as_ref()),
            ) else {
                continue;
            };
            w.remember(&f.rule, u64::from_be_bytes(seq));
        }
        w.seq = w
            .firings
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .map_or(0, |s| s + 1);
        w
    }

    fn remember(&mut self, rule: &str, seq: u64) {
        let rule: std::sync::Arc<str> = match self.per_rule.get_key_value(rule) {
            Some((k, _)) => k.clone(),
            None => rule.into(),
        };
        self.order.insert(seq, rule.clone());
        self.per_rule.entry(rule).or_default().push_back(seq);
    }

    /// Writes `batch` in order and evicts beyond the bounds; returns how many were written.
    fn write(&mut self, batch: &[Firing]) -> Result<usize, sled::Error> {
        let mut n = 0;
        for f in batch {
            let Ok(v) = serde_json::to_vec(f) else {
                continue;
            };
            let seq = self.seq;
            self.seq += 1;
            self.firings.insert(seq.to_be_bytes(), v)?;
            self.remember(&f.rule, seq);
            n += 1;
            // This rule's oldest beyond its own bound.
            let rule: &str = &f.rule;
            while self.per_rule.get(rule).map_or(0, VecDeque::len) > self.max_per_rule {
                let Some(old) = self.per_rule.get_mut(rule).and_then(VecDeque::pop_front) else {
                    break;
                };
                self.order.remove(&old);
                self.firings.remove(old.to_be_bytes())?;
            }
            // The oldest of all beyond the total bound.
            while self.order.len() > self.max_entries {
                let Some((old, rule)) = self.order.pop_first() else {
                    break;
                };
                if let Some(q) = self.per_rule.get_mut(&rule) {
                    // The oldest of all is its rule's oldest.
                    if q.front() == Some(&old) {
                        q.pop_front();
                    } else {
                        q.retain(|s| *s != old);
                    }
                    if q.is_empty() {
                        self.per_rule.remove(&rule);
                    }
                }
                self.firings.remove(old.to_be_bytes())?;
            }
        }
        Ok(n)
    }
}

/// The stored firings, newest first, optionally of one rule only.
pub fn list(tree: &sled::Tree, rule: Option<&str>, limit: usize) -> Vec<Firing> {
    tree.iter()
        .rev()
        .filter_map(|kv| {
            let (k, v) = kv.ok()?;
            let mut f: Firing = serde_json::from_slice(&v).ok()?;
            f.seq = u64::from_be_bytes(k.as_ref().try_into().ok()?);
            Some(f)
        })
        .filter(|f| rule.is_none_or(|r| f.rule == r))
        .take(limit)
        .collect()
}

impl History {
    /// Opens (or creates) the history at `path` (temporary when `None`), keeping at most
    /// `max_entries` in all and `max_per_rule` of any one rule.
    pub fn open(
        path: Option<&Path>,
        max_entries: usize,
        max_per_rule: usize,
    ) -> Result<History, HistoryError> {
        let tree = open_tree(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Firing>(CHANNEL);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let mut w = Writer::new(tree.clone(), max_entries, max_per_rule.max(1));
        let count = written.clone();
        let writer = std::thread::Builder::new()
            .name("rules-history".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                let drain = |batch: &mut Vec<Firing>| {
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(f) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                };
                while let Ok(f) = rx.recv() {
                    // One write per LINGER (or per MAX_BATCH firings): the writer sleeps
                    // while the burst queues up, so the router's sends wake nobody, and
                    // sled gets one batch per tree instead of four operations per firing.
                    batch.push(f);
                    drain(&mut batch);
                    if batch.len() < MAX_BATCH {
                        std::thread::sleep(LINGER);
                        drain(&mut batch);
                    }
                    match w.write(&batch) {
                        Ok(n) => {
                            count.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "rules history: write failed"),
                    }
                    batch.clear();
                }
                let _ = w.firings.flush();
            })
            .expect("spawn the history writer");
        Ok(History {
            open: Mutex::new(Some(Open { tree, tx, writer })),
            path: path.map(Path::to_path_buf),
            dropped: AtomicU64::new(0),
            written,
        })
    }

    /// Queues a firing (never blocks; dropped and counted when the writer is behind).
    pub fn record(&self, f: Firing) {
        let g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = g.as_ref() else { return };
        if o.tx.try_send(f).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Newest first.
    pub fn list(&self, rule: Option<&str>, limit: usize) -> Vec<Firing> {
        let g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .map_or_else(Vec::new, |o| list(&o.tree, rule, limit))
    }

    /// Writes what is queued, flushes and closes the database (bounded wait).
    pub fn close(&self) {
        let taken = self.open.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Open { tree, tx, writer }) = taken {
            drop(tx);
            drop(tree);
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::warn!("rules history writer did not finish in time");
            }
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(rule: &str, n: u64) -> Firing {
        Firing {
            seq: 0,
            at_ms: n,
            rule: rule.into(),
            trigger: format!("t{n}"),
            commands: Vec::new(),
            refresh: Vec::new(),
        }
    }

    /// Waits (bounded) until the writer has written `n` entries in all.
    fn settle(h: &History, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.written.load(Ordering::Relaxed) < n {
            assert!(std::time::Instant::now() < deadline, "writer too slow");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_busy_rule_keeps_its_newest_and_cannot_push_the_others_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        {
            let h = History::open(Some(&path), 100, 10).unwrap();
            for i in 0..5 {
                h.record(firing("quiet", i));
            }
            for i in 0..40 {
                h.record(firing("busy", 100 + i));
            }
            settle(&h, 45);
            let busy = h.list(Some("busy"), 1000);
            assert_eq!(busy.len(), 10, "the busy rule is capped");
            // Its newest, newest first.
            assert_eq!(busy[0].at_ms, 139);
            assert_eq!(busy[9].at_ms, 130);
            assert_eq!(
                h.list(Some("quiet"), 1000).len(),
                5,
                "the quiet rule keeps all"
            );
            assert_eq!(h.list(None, 1000).len(), 15);
            h.close();
        }
        // The counts survive a restart: the busy rule stays capped.
        let h = History::open(Some(&path), 100, 10).unwrap();
        for i in 0..3 {
            h.record(firing("busy", 200 + i));
        }
        settle(&h, 3);
        let busy = h.list(Some("busy"), 1000);
        assert_eq!(busy.len(), 10);
        assert_eq!(busy[0].at_ms, 202);
        assert_eq!(h.list(Some("quiet"), 1000).len(), 5);
    }

    #[test]
    fn the_total_bound_still_holds_and_keeps_the_rule_counts_in_step() {
        let h = History::open(None, 12, 10).unwrap();
        for i in 0..8 {
            h.record(firing("a", i));
        }
        for i in 0..8 {
            h.record(firing("b", 100 + i));
        }
        settle(&h, 16);
        assert_eq!(h.list(None, 1000).len(), 12);
        // The four oldest (all "a") went first.
        assert_eq!(h.list(Some("a"), 1000).len(), 4);
        // "a"'s count followed the total bound's evictions: 6 more of "a" reach its cap
        // of 10 only once it really holds 10.
        for i in 0..6 {
            h.record(firing("a", 200 + i));
        }
        settle(&h, 22);
        let a = h.list(Some("a"), 1000);
        let total = h.list(None, 1000).len();
        assert_eq!(total, 12);
        assert!(a.len() <= 10 && a[0].at_ms == 205, "{a:?}");
    }

    #[test]
    fn batched_writes_persist_everything_after_a_clean_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        let n = 3000u64;
        {
            let h = History::open(Some(&path), 100_000, 100_000).unwrap();
            for i in 0..n {
                h.record(firing(&format!("r{}", i % 7), i));
            }
            // No wait for the writer: close writes what is queued or being gathered.
            h.close();
            assert_eq!(h.dropped.load(Ordering::Relaxed), 0);
            assert_eq!(h.written.load(Ordering::Relaxed), n);
        }
        let h = History::open(Some(&path), 100_000, 100_000).unwrap();
        let all = h.list(None, 10_000);
        assert_eq!(all.len() as u64, n, "every firing is stored");
        // Newest first, in firing order, sequence numbers unbroken.
        for (k, f) in all.iter().enumerate() {
            assert_eq!(f.at_ms, n - 1 - k as u64);
            assert_eq!(f.seq, n - 1 - k as u64);
        }
        assert_eq!(h.list(Some("r3"), 10_000).len(), 429);
        // The next firing continues the sequence.
        h.record(firing("r0", n));
        settle(&h, 1);
        assert_eq!(h.list(None, 1)[0].seq, n);
    }

    #[test]
    fn a_lone_firing_is_written_without_waiting_for_a_full_batch() {
        let h = History::open(None, 100, 100).unwrap();
        let t0 = std::time::Instant::now();
        h.record(firing("a", 1));
        settle(&h, 1);
        assert!(t0.elapsed() < LINGER + Duration::from_secs(2));
        assert_eq!(h.list(None, 10).len(), 1);
    }

    #[test]
    fn evictions_within_one_write_keep_both_bounds_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        {
            // An index tree as the first version wrote it: dropped at start-up.
            let db = sled::Config::new().path(&path).open().unwrap();
            db.open_tree(BY_RULE).unwrap().insert(b"x", b"").unwrap();
            db.flush().unwrap();
        }
        {
            let h = History::open(Some(&path), 50, 5).unwrap();
            // One write: every rule goes over its bound and all of them over the total.
            for i in 0..400 {
                h.record(firing(&format!("r{}", i % 20), i));
            }
            h.close();
        }
        let check = |h: &History| {
            let all = h.list(None, 1000);
            assert_eq!(all.len(), 50);
            // The newest 50 stay: 2 or 3 of each rule, within its bound of 5.
            assert!(all.iter().all(|f| f.at_ms >= 350), "{all:?}");
        };
        let h = History::open(Some(&path), 50, 5).unwrap();
        check(&h);
        // The per-rule lists were rebuilt from the tree: r0 holds 2 (360, 380); 4 more go
        // over its bound of 5 and its oldest (360) goes.
        for i in 0..4 {
            h.record(firing("r0", 1000 + i));
        }
        settle(&h, 4);
        let r0 = h.list(Some("r0"), 1000);
        assert_eq!(r0.len(), 5, "{r0:?}");
        assert_eq!((r0[0].at_ms, r0[4].at_ms), (1003, 380));
        assert_eq!(h.list(None, 1000).len(), 50);
        h.close();
        let db = sled::Config::new().path(&path).open().unwrap();
        assert!(!db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == BY_RULE.as_bytes()));
    }
}
