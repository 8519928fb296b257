//! The on-device sample store: the preprocessed sample behind each recent event, so that a
//! [`hearth_proto::mqtt::Feedback`] naming the event can label it, and the labelled samples
//! join the next local training. sled under `<state_dir>/samples`, bounded to at most
//! `max_samples` samples and `max_mb` MiB of records (oldest dropped first). Samples never
//! leave the device; `hearth-agent wipe` empties the store.
//!
//! Layout: tree `samples` maps a big-endian sequence number to a record (label, predicted
//! class, the input as f32 LE); tree `events` maps an event id to its sequence number. Both
//! change together in one transaction.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::Error;

/// Record format version.
const RECORD_V1: u8 = 1;
/// "No label" in a record.
const NO_LABEL: u16 = u16::MAX;

/// `[store]` in the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Keep the samples behind events (needed for feedback and distillation).
    pub enabled: bool,
    /// At most this many samples (oldest dropped first).
    pub max_samples: usize,
    /// At most this many MiB of records (oldest dropped first).
    pub max_mb: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            enabled: true,
            max_samples: 2000,
            max_mb: 8.0,
        }
    }
}

impl StoreConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_samples == 0 {
            return Err("store.max_samples must be at least 1".into());
        }
        if !(self.max_mb.is_finite() && self.max_mb > 0.0) {
            return Err(format!("store.max_mb {} must be > 0", self.max_mb));
        }
        Ok(())
    }

    fn max_bytes(&self) -> u64 {
        (self.max_mb * 1024.0 * 1024.0) as u64
    }
}

/// One stored sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The model input (after preprocessing).
    pub input: Vec<f32>,
    /// The class the model gave.
    pub predicted: u16,
    /// The class a user gave, if any.
    pub label: Option<u16>,
}

impl Sample {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(5 + 4 * self.input.len());
        b.push(RECORD_V1);
        b.extend_from_slice(&self.label.unwrap_or(NO_LABEL).to_le_bytes());
        b.extend_from_slice(&self.predicted.to_le_bytes());
        for v in &self.input {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Sample, Error> {
        if b.len() < 5 || b[0] != RECORD_V1 || !(b.len() - 5).is_multiple_of(4) {
            return Err(Error::Integrity("sample store: malformed record".into()));
        }
        let label = u16::from_le_bytes([b[1], b[2]]);
        Ok(Sample {
            label: (label != NO_LABEL).then_some(label),
            predicted: u16::from_le_bytes([b[3], b[4]]),
            input: b[5..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }
}

/// What a feedback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Labelled {
    /// The sample now carries the label.
    Applied,
    /// No sample behind that event (never stored, or dropped as the oldest).
    UnknownEvent,
}

/// The bounded sample store.
pub struct SampleStore {
    db: sled::Db,
    samples: sled::Tree,
    events: sled::Tree,
    config: StoreConfig,
    /// Serialises inserts (sequence numbers, accounting, eviction).
    inner: Mutex<Accounting>,
}

impl std::fmt::Debug for SampleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Accounting {
    next_seq: u64,
    bytes: u64,
    count: usize,
}

fn sled_err(e: sled::Error) -> Error {
    Error::Integrity(format!("sample store: {e}"))
}

/// Bytes a record occupies in the accounting (key, value and its index entry).
fn cost(id: &str, value: &[u8]) -> u64 {
    (8 + value.len() + id.len() + 8) as u64
}

impl SampleStore {
    /// Where the store of a state directory lives.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("samples")
    }

    /// Opens (or creates) the store of `state_dir`.
    pub fn open(state_dir: &Path, config: StoreConfig) -> Result<SampleStore, Error> {
        let db = sled::Config::new()
            .path(SampleStore::path(state_dir))
            .cache_capacity(4 << 20)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(sled_err)?;
        let samples = db.open_tree("samples").map_err(sled_err)?;
        let events = db.open_tree("events").map_err(sled_err)?;
        let mut acc = Accounting::default();
        // Index entries per sequence (for the cost of each record).
        let mut id_len = std::collections::HashMap::new();
        for kv in events.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            id_len.insert(v.to_vec(), k.len());
        }
        for kv in samples.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::Integrity("sample store: bad key".into()))?,
            );
            acc.next_seq = acc.next_seq.max(seq + 1);
            acc.count += 1;
            acc.bytes += (8 + v.len() + id_len.get(k.as_ref()).copied().unwrap_or(0) + 8) as u64;
        }
        let s = SampleStore {
            db,
            samples,
            events,
            config,
            inner: Mutex::new(acc),
        };
        // A smaller bound than the store was written with takes effect at once.
        s.evict(&mut s.inner.lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok(s)
    }

    /// Empties the store of `state_dir` (`hearth-agent wipe`); returns how many samples it held.
    pub fn wipe(state_dir: &Path) -> Result<usize, Error> {
        let path = SampleStore::path(state_dir);
        if !path.exists() {
            return Ok(0);
        }
        let n = {
            let s = SampleStore::open(state_dir, StoreConfig::default())?;
            let n = s.len();
            s.samples.clear().map_err(sled_err)?;
            s.events.clear().map_err(sled_err)?;
            s.db.flush().map_err(sled_err)?;
            n
        };
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        Ok(n)
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    /// True when the store holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of records held (as bounded by `max_mb`).
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Keeps the sample behind event `id` (dropping the oldest beyond the bounds).
    pub fn insert(&self, id: &str, input: &[f32], predicted: u16) -> Result<(), Error> {
        let value = Sample {
            input: input.to_vec(),
            predicted,
            label: None,
        }
        .encode();
        let c = cost(id, &value);
        if c > self.config.max_bytes() {
            return Ok(()); // a single sample above the byte bound is not kept
        }
        let mut acc = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = acc.next_seq.to_be_bytes();
        (&self.samples, &self.events)
            .transaction(|(s, e)| {
                s.insert(&key, value.as_slice())?;
                if let Some(old) = e.insert(id.as_bytes(), &key)? {
                    // An id seen again (ids are random: only by a bug) replaces its sample.
                    s.remove(old)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        acc.next_seq += 1;
        acc.count += 1;
        acc.bytes += c;
        self.evict(&mut acc)
    }

    /// Drops the oldest samples until both bounds hold.
    fn evict(&self, acc: &mut Accounting) -> Result<(), Error> {
        while acc.count > self.config.max_samples || acc.bytes > self.config.max_bytes() {
            let Some((k, v)) = self.samples.first().map_err(sled_err)? else {
                acc.count = 0;
                acc.bytes = 0;
                break;
            };
            // Its index entry: the id whose value is this key (scan is bounded by the store).
            let id = self
                .events
                .iter()
                .filter_map(Result::ok)
                .find(|(_, seq)| seq == &k)
                .map(|(id, _)| id);
            (&self.samples, &self.events)
                .transaction(|(s, e)| {
                    s.remove(&k)?;
                    if let Some(id) = &id {
                        e.remove(id)?;
                    }
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(tx_err)?;
            acc.count = acc.count.saturating_sub(1);
            acc.bytes = acc
                .bytes
                .saturating_sub((8 + v.len() + id.map_or(0, |i| i.len()) + 8) as u64);
        }
        Ok(())
    }

    /// Labels the sample behind event `id`.
    pub fn label(&self, id: &str, class: u16) -> Result<Labelled, Error> {
        let _g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(seq) = self.events.get(id.as_bytes()).map_err(sled_err)? else {
            return Ok(Labelled::UnknownEvent);
        };
        let Some(v) = self.samples.get(&seq).map_err(sled_err)? else {
            return Ok(Labelled::UnknownEvent);
        };
        let mut s = Sample::decode(&v)?;
        s.label = Some(class);
        self.samples.insert(&seq, s.encode()).map_err(sled_err)?;
        Ok(Labelled::Applied)
    }

    /// Every stored sample, oldest first.
    pub fn all(&self) -> Result<Vec<Sample>, Error> {
        self.samples
            .iter()
            .map(|kv| Sample::decode(&kv.map_err(sled_err)?.1))
            .collect()
    }

    /// The labelled samples, oldest first.
    pub fn labelled(&self) -> Result<Vec<Sample>, Error> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|s| s.label.is_some())
            .collect())
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush().map(|_| ()).map_err(sled_err)
    }
}

fn tx_err(e: TransactionError<()>) -> Error {
    match e {
        TransactionError::Storage(e) => sled_err(e),
        TransactionError::Abort(()) => Error::Integrity("sample store: transaction aborted".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: usize, mb: f64) -> StoreConfig {
        StoreConfig {
            enabled: true,
            max_samples: n,
            max_mb: mb,
        }
    }

    #[test]
    fn bounded_by_count_oldest_first_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SampleStore::open(dir.path(), cfg(5, 1.0)).unwrap();
            for i in 0..8u16 {
                s.insert(&format!("e{i}"), &[f32::from(i); 4], i).unwrap();
            }
            assert_eq!(s.len(), 5);
            let kept: Vec<u16> = s.all().unwrap().iter().map(|x| x.predicted).collect();
            assert_eq!(kept, [3, 4, 5, 6, 7], "the oldest three went");
            assert_eq!(s.label("e1", 1).unwrap(), Labelled::UnknownEvent);
            assert_eq!(s.label("e6", 0).unwrap(), Labelled::Applied);
            assert_eq!(s.label("nope", 0).unwrap(), Labelled::UnknownEvent);
            s.flush().unwrap();
        }
        let s = SampleStore::open(dir.path(), cfg(5, 1.0)).unwrap();
        assert_eq!(s.len(), 5);
        let l = s.labelled().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].label, l[0].predicted), (Some(0), 6));
        assert_eq!(l[0].input, vec![6.0; 4]);
        drop(s);
        // Reopened with a smaller bound: trimmed at once, newest kept.
        let s = SampleStore::open(dir.path(), cfg(2, 1.0)).unwrap();
        let kept: Vec<u16> = s.all().unwrap().iter().map(|x| x.predicted).collect();
        assert_eq!(kept, [6, 7]);
        drop(s);
        assert_eq!(SampleStore::wipe(dir.path()).unwrap(), 2);
        let s = SampleStore::open(dir.path(), cfg(2, 1.0)).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn bounded_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // 1000 floats = ~4 KB per record; 0.02 MiB holds 5 of them.
        let s = SampleStore::open(dir.path(), cfg(1000, 0.02)).unwrap();
        for i in 0..20u16 {
            s.insert(&format!("id-{i}"), &[0.5; 1000], i).unwrap();
        }
        assert!(
            s.bytes() <= (0.02 * 1024.0 * 1024.0) as u64,
            "{}",
            s.bytes()
        );
        assert_eq!(s.len(), 5);
        assert_eq!(s.all().unwrap()[0].predicted, 15);
    }
}
