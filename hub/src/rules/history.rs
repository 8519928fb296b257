//! Rule firing history, persisted in sled and bounded.
//!
//! The router never waits for the disk: firings go through a bounded channel to a writer
//! thread (a full channel drops the entry and counts it). Keys are a big-endian sequence
//! number, so the tree iterates in firing order; beyond `max_entries` the oldest entries
//! are removed. Without a path the tree lives in a temporary sled database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Plan, Step};

/// Default bound of the history.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// Entries waiting for the writer; more are dropped (and counted).
const CHANNEL: usize = 4096;
const TREE: &str = "firings";

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

/// Opens the tree (for the hub or the CLI).
pub fn open_tree(path: Option<&Path>) -> Result<sled::Tree, HistoryError> {
    let err = |source| HistoryError {
        path: path.map_or("(temporary)".into(), |p| p.display().to_string()),
        source,
    };
    let db = match path {
        Some(p) => sled::Config::new().path(p).flush_every_ms(Some(200)).open(),
        None => sled::Config::new().temporary(true).open(),
    }
    .map_err(err)?;
    db.open_tree(TREE).map_err(err)
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
    /// `max_entries`.
    pub fn open(path: Option<&Path>, max_entries: usize) -> Result<History, HistoryError> {
        let tree = open_tree(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Firing>(CHANNEL);
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let w = tree.clone();
        let count = written.clone();
        let writer = std::thread::Builder::new()
            .name("rules-history".into())
            .spawn(move || {
                let mut seq = w
                    .last()
                    .ok()
                    .flatten()
                    .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
                    .map_or(0, |s| s + 1);
                let mut len = w.len();
                while let Ok(f) = rx.recv() {
                    let Ok(v) = serde_json::to_vec(&f) else {
                        continue;
                    };
                    if let Err(e) = w.insert(seq.to_be_bytes(), v) {
                        tracing::warn!(error = %e, "rules history: write failed");
                        continue;
                    }
                    seq += 1;
                    len += 1;
                    while len > max_entries {
                        match w.pop_min() {
                            Ok(Some(_)) => len -= 1,
                            _ => break,
                        }
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                let _ = w.flush();
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
