//! Rule firing history, persisted in sled and bounded.
//!
//! The router never waits for the disk: firings go through a bounded channel to a writer
//! thread (a full channel drops the entry and counts it). Keys are a big-endian sequence
//! number, so the tree iterates in firing order; beyond `max_entries` the oldest entries
//! are removed, and beyond `max_per_rule` entries of one rule that rule's oldest, so a rule
//! firing thousands of times an hour cannot push every other rule's history out. A second
//! tree indexes the firings by rule (`<rule> 0x00 <seq>`, empty values): written before the
//! firing and removed after it, so after a crash it may hold an entry whose firing is gone
//! (evicted first next time, harmless) but never misses one. Without a path the trees live
//! in a temporary sled database.

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
const CHANNEL: usize = 4096;
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
    Ok(open_trees(path)?.0)
}

/// The firings tree and the by-rule index.
fn open_trees(path: Option<&Path>) -> Result<(sled::Tree, sled::Tree), HistoryError> {
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
            .flush_every_ms(Some(200))
            .open(),
        None => sled::Config::new()
            .temporary(true)
            .cache_capacity(SLED_CACHE_BYTES)
            .open(),
    }
    .map_err(err)?;
    Ok((
        db.open_tree(TREE).map_err(err)?,
        db.open_tree(BY_RULE).map_err(err)?,
    ))
}

fn index_key(rule: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(rule.len() + 9);
    k.extend_from_slice(rule.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The writer's side: both trees, the next sequence number, the entry count and the
/// entries per rule (from the index).
struct Writer {
    firings: sled::Tree,
    index: sled::Tree,
    seq: u64,
    len: usize,
    per_rule: std::collections::HashMap<String, usize>,
    max_entries: usize,
    max_per_rule: usize,
}

impl Writer {
    fn new(
        firings: sled::Tree,
        index: sled::Tree,
        max_entries: usize,
        max_per_rule: usize,
    ) -> Writer {
        let seq = firings
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .map_or(0, |s| s + 1);
        let mut per_rule = std::collections::HashMap::new();
        for (k, _) in index.iter().flatten() {
            if k.len() > 9 {
                let rule = String::from_utf8_lossy(&k[..k.len() - 9]).into_owned();
                *per_rule.entry(rule).or_insert(0) += 1;
            }
        }
        // A history written before the index existed: index it once.
        if per_rule.is_empty() && !firings.is_empty() {
            for (k, v) in firings.iter().flatten() {
                let (Ok(f), Ok(seq)) = (
                    serde_json::from_slice::<Firing>(&v),
                    <[u8; 8]>::try_from(k.as_ref()),
                ) else {
                    continue;
                };
                let _ = index.insert(index_key(&f.rule, u64::from_be_bytes(seq)), &[]);
                *per_rule.entry(f.rule).or_insert(0) += 1;
            }
        }
        Writer {
            len: firings.len(),
            firings,
            index,
            seq,
            per_rule,
            max_entries,
            max_per_rule,
        }
    }

    fn write(&mut self, f: &Firing) -> Result<(), sled::Error> {
        let Ok(v) = serde_json::to_vec(f) else {
            return Ok(());
        };
        // Index first: the index never misses a stored firing.
        self.index.insert(index_key(&f.rule, self.seq), &[])?;
        self.firings.insert(self.seq.to_be_bytes(), v)?;
        self.seq += 1;
        self.len += 1;
        let n = self.per_rule.entry(f.rule.clone()).or_insert(0);
        *n += 1;
        // This rule's oldest beyond its own bound.
        while self.per_rule.get(&f.rule).copied().unwrap_or(0) > self.max_per_rule {
            let mut prefix = f.rule.as_bytes().to_vec();
            prefix.push(0);
            let Some(Ok((k, _))) = self.index.scan_prefix(&prefix).next() else {
                break;
            };
            if let Ok(seq) = <[u8; 8]>::try_from(&k[k.len() - 8..]) {
                if self.firings.remove(seq)?.is_some() {
                    self.len -= 1;
                }
            }
            self.index.remove(k)?;
            if let Some(n) = self.per_rule.get_mut(&f.rule) {
                *n -= 1;
            }
        }
        // The oldest of all beyond the total bound.
        while self.len > self.max_entries {
            let Some((k, v)) = self.firings.pop_min()? else {
                break;
            };
            self.len -= 1;
            if let (Ok(old), Ok(seq)) = (
                serde_json::from_slice::<Firing>(&v),
                <[u8; 8]>::try_from(k.as_ref()),
            ) {
                if self
                    .index
                    .remove(index_key(&old.rule, u64::from_be_bytes(seq)))?
                    .is_some()
                {
                    if let Some(n) = self.per_rule.get_mut(&old.rule) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        Ok(())
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
        let (tree, index) = open_trees(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Firing>(CHANNEL);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let mut w = Writer::new(tree.clone(), index, max_entries, max_per_rule.max(1));
        let count = written.clone();
        let writer = std::thread::Builder::new()
            .name("rules-history".into())
            .spawn(move || {
                while let Ok(f) = rx.recv() {
                    match w.write(&f) {
                        Ok(()) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "rules history: write failed"),
                    }
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
    fn the_total_bound_still_holds_and_keeps_the_index_in_step() {
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
}
