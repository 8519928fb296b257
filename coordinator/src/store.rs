//! The coordinator's one storage interface: every piece of durable state (clients, enrollment
//! tokens, model versions and their ONNX bytes, each model's server optimizer state, rounds,
//! accepted-update markers, each open round's running weighted sum and, for the robust
//! methods, its decoded updates) goes through [`Store`]. The methods are whole operations,
//! each one transaction of the backend: sled (embedded, one process; the default) or
//! PostgreSQL ([`pg`], `[store] backend = "postgres"`), which several coordinator instances
//! can share: there an open round's sum is one partial sum per instance ([`Store::round_sums`])
//! and the instance closing a round holds its lock in the database ([`Store::lock_round`]).

use std::path::Path;
use std::time::Duration;

pub mod pg;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{abort, ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{IVec, Transactional, Tree};

/// Storage failures.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The database itself failed.
    #[error("database error: {0}")]
    Db(#[from] sled::Error),
    /// PostgreSQL failed (connection, query, constraint).
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The database cannot be reached at start-up (a service unavailable, not a bad config).
    #[error("PostgreSQL unreachable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The enrollment token is unknown or used up.
    #[error("enrollment token unknown or already used")]
    TokenRejected,
    /// The enrollment token's lifetime is over.
    #[error("enrollment token expired")]
    TokenExpired,
    /// The enrollment token was made for another device name.
    #[error("enrollment token was issued for device {0:?}")]
    TokenDevice(String),
    /// The operation does not apply to the current state (e.g. completing a closed round).
    #[error("{0}")]
    Conflict(String),
    /// Folding an update into the round sum failed.
    #[error("aggregation failed: {0}")]
    Fold(String),
}

/// An enrolled client.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClientRecord {
    /// Random public id.
    pub client_id: String,
    /// Human name given at enrollment.
    pub device_name: String,
    /// Hex sha256 of the client key (the key itself is never stored); insecure mode only.
    pub key_sha256: String,
    /// Enrollment time.
    pub enrolled_unix_ms: u64,
    /// Hex sha256 of the DER of the client certificate issued at enrolment (TLS); only that
    /// certificate authenticates the client.
    #[serde(default)]
    pub cert_sha256: String,
    /// When the client was revoked; a revoked client is refused on every call.
    #[serde(default)]
    pub revoked_unix_ms: Option<u64>,
}

/// An enrollment token: uses left, expiry and the device it is for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    /// Enrollments left.
    pub uses: u32,
    /// Expiry (Unix ms); 0 = never (tokens from the config file).
    pub expires_unix_ms: u64,
    /// Device name the token enrolls; empty = any.
    pub device: String,
}

/// A token value: JSON, or the 4-byte use count written before tokens carried an expiry.
fn token_dec(v: &[u8]) -> Result<TokenRecord, StoreError> {
    if let Ok(b) = <[u8; 4]>::try_from(v) {
        return Ok(TokenRecord {
            uses: u32::from_be_bytes(b),
            expires_unix_ms: 0,
            device: String::new(),
        });
    }
    dec(v)
}

/// Metadata of one stored model version.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VersionMeta {
    /// Model name.
    pub model: String,
    /// Version number (1 = initial).
    pub version: u64,
    /// Hex sha256 of the ONNX bytes.
    pub sha256: String,
    /// Size of the ONNX bytes.
    pub size_bytes: u64,
    /// Held-out accuracy, when evaluated.
    pub eval_accuracy: Option<f32>,
    /// Creation time.
    pub created_unix_ms: u64,
    /// Round that produced it (0 for the initial model).
    pub from_round: u64,
    /// The version this one succeeds (the latest when it was published; 0 for the first).
    #[serde(default)]
    pub parent_version: u64,
    /// Hex ed25519 signature of (model, version, parent_version, sha256) with the
    /// coordinator's key (`crate::signing`); empty only in records from before signing,
    /// which are signed at start-up.
    #[serde(default)]
    pub signature: String,
    /// A rollback republishes the content of this older version (0 = not a rollback).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rollback_of: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Round lifecycle state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum RoundState {
    /// Accepting updates.
    #[default]
    Open,
    /// A new version was published.
    Completed,
    /// Closed without a new version.
    Failed,
}

/// What clients are asked to do in a round.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskParams {
    /// Local epochs.
    pub local_epochs: u32,
    /// Client learning rate.
    pub learning_rate: f32,
    /// Client batch size.
    pub batch_size: u32,
    /// Client-side L2 clip bound (0 = none).
    pub clip_norm: f32,
    /// Bits per uploaded value.
    pub quant_bits: u32,
    /// Fraction of entries kept.
    pub topk_fraction: f32,
    /// Client optimizer (records from before it existed: momentum 0.9, what agents did).
    #[serde(default)]
    pub client: crate::config::ClientTraining,
    /// Fraction of local data clients hold out for federated evaluation (0 = none).
    #[serde(default)]
    pub eval_fraction: f32,
}

/// One federated round.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    /// Globally unique round id (assigned by the store, starting at 1).
    pub id: u64,
    /// Model name.
    pub model: String,
    /// Lifecycle state.
    pub state: RoundState,
    /// Version the deltas are taken against.
    pub base_version: u64,
    /// Version published by the round (0 until completed).
    pub new_version: u64,
    /// Fewest updates to complete at the deadline.
    pub min_clients: u32,
    /// Updates that complete the round at once.
    pub max_clients: u32,
    /// Home aggregator: the upstream round this local round mirrors (0 = none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upstream_round: u64,
    /// Home aggregator: the upstream round's deadline, which is what the local clients are
    /// told (the local round itself closes `upload_margin_secs` earlier).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upstream_deadline_unix_ms: u64,
    /// Opening time.
    pub opened_unix_ms: u64,
    /// Deadline.
    pub deadline_unix_ms: u64,
    /// Client task.
    pub task: TaskParams,
    /// Why the round was started ("cli", "mqtt", ...).
    pub reason: String,
    /// Accepted updates.
    pub updates: u32,
    /// Σ aggregation weights (sample counts capped at `max_client_samples`) of accepted updates.
    pub total_samples: u64,
    /// Payload bytes of accepted updates.
    pub uplink_bytes: u64,
    /// 4 × parameter count of the model.
    pub model_fp32_bytes: u64,
    /// Held-out accuracy of the new version.
    pub eval_accuracy: Option<f32>,
    /// Human-readable outcome.
    pub detail: String,
    /// Whether the round keeps its decoded updates (robust methods; `auto` when they fit the
    /// memory bound).
    #[serde(default)]
    pub keep_updates: bool,
    /// Adaptive norm bound learnt from the model's last rounds when this one opened: updates
    /// above it are scaled down to it as they arrive (0 = none).
    #[serde(default)]
    pub norm_bound: f32,
    /// Sample-count cap learnt from the model's last rounds when this one opened (0 = none).
    #[serde(default)]
    pub sample_cap: u64,
    /// Client selection: the ids of the clients drawn for the round, sorted; empty = an open
    /// round (any enrolled client may upload).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cohort: Vec<String>,
    /// Clients available (subscribed, or recently) when the round opened.
    #[serde(default)]
    pub available_clients: u32,
    /// Seed of the cohort draw.
    #[serde(default)]
    pub selection_seed: u64,
    /// `max_clients` as requested (the round's own is at most the cohort's size).
    #[serde(default)]
    pub requested_max_clients: u32,
    /// Server loop: rounds still to run after this one.
    #[serde(default)]
    pub rounds_left: u32,
    /// Server loop: held-out accuracy that ends it (0 = none).
    #[serde(default)]
    pub target_accuracy: f32,
    /// When the round closed (0 while open).
    #[serde(default)]
    pub closed_unix_ms: u64,
    /// Federated evaluation of `base_version` by the round's accepted clients: Σ samples,
    /// Σ samples × loss, Σ samples × accuracy.
    #[serde(default)]
    pub fed_eval_samples: u64,
    /// See `fed_eval_samples`.
    #[serde(default)]
    pub fed_eval_loss_sum: f64,
    /// See `fed_eval_samples`.
    #[serde(default)]
    pub fed_eval_correct: f64,
}

/// The record kept per accepted (round, client) update, which makes uploads idempotent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UpdateMarker {
    /// Uploading client.
    pub client_id: String,
    /// Aggregation weight: the reported sample count, capped at `max_client_samples`.
    pub num_samples: u64,
    /// The sample count the client reported.
    #[serde(default)]
    pub reported_samples: u64,
    /// Hex sha256 of the payload.
    pub payload_sha256: String,
    /// Payload size.
    pub payload_bytes: u64,
    /// Client-reported training loss.
    pub train_loss: f32,
    /// Acceptance time.
    pub accepted_unix_ms: u64,
    /// L2 norm of the decoded update as received, before any clipping (0 in markers written
    /// before it was recorded).
    #[serde(default)]
    pub norm: f64,
    /// Federated evaluation of the base version on the client's held-out data (0 = none).
    #[serde(default)]
    pub eval_samples: u64,
    /// Its mean loss.
    #[serde(default)]
    pub eval_loss: f32,
    /// Its accuracy.
    #[serde(default)]
    pub eval_accuracy: f32,
}

/// Result of [`Store::accept_update`].
#[derive(Clone, Debug, PartialEq)]
pub enum AcceptOutcome {
    /// Folded and recorded; the round as it is now.
    Accepted(RoundRecord),
    /// This client's update for this round was already recorded; nothing changed.
    Duplicate(RoundRecord),
    /// The round is not open any more.
    NotOpen(RoundRecord),
    /// The round already holds `max_clients` updates.
    Full(RoundRecord),
    /// No such round.
    NotFound,
}

/// A version's coded delta against its parent (the compressed downlink).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaRecord {
    /// The version the delta applies to.
    pub base: u64,
    /// The coded delta (`hearth_model::update` format).
    pub payload: Vec<u8>,
    /// The server's error-feedback residual after this version (the coordinator's encoding;
    /// empty for none).
    pub residual: Vec<u8>,
}

/// What [`Store::mark_available`] records for a (model, client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkAvailable {
    /// A `Subscribe` stream opened on this instance: the client is available for as long as
    /// the instance is alive ([`Store::heartbeat`]), so a dead instance's clients drop out by
    /// themselves and nothing is written per client while streams last.
    Live,
    /// The client's stream ended: available until this time (Unix ms). Only an existing row
    /// changes (a row a revocation deleted is not made again).
    Until(u64),
}

/// The `until` of a live stream's presence row (PostgreSQL's largest `bigint`).
pub(crate) const LIVE_UNTIL: u64 = i64::MAX as u64;

/// A bounded draw from the clients available for a model ([`Store::sample_available`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AvailableSample {
    /// Clients available at the time asked.
    pub available: u64,
    /// The clients drawn (at most `k`), sorted by id.
    pub cohort: Vec<String>,
    /// The most client ids the draw held in memory at once (sled: the bottom-k heap;
    /// PostgreSQL: rows received from the server): at most `k`, whatever `available` is.
    pub held: usize,
}

/// The order of a seeded draw: sha256(seed as 8 big-endian bytes ‖ client id). A round's cohort
/// is the `k` available clients with the smallest keys: a uniform sample without replacement
/// that a database computes as `ORDER BY sha256(..) LIMIT k` and an iterator with a heap of
/// `k`, the same clients on both backends for the same seed.
pub fn draw_key(seed: u64, client: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(seed.to_be_bytes());
    h.update(client);
    h.finalize().into()
}

/// The store: sled or PostgreSQL behind the same operations. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Sled(SledStore),
    Postgres(pg::PgStore),
}

/// Held by the instance that closes a round (see [`Store::lock_round`]); released on drop.
#[derive(Debug)]
pub enum RoundLock {
    /// sled: one process, whose in-memory round lock is enough.
    Local,
    /// PostgreSQL: the round's advisory lock, held exclusively on a connection of its own.
    Postgres(pg::PgRoundLock),
}

/// Runs the same method on whichever backend the store has.
macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sled($s) => $e,
            Backend::Postgres($s) => $e,
        }
    };
}

impl Store {
    /// Opens (or creates) the sled database at `path`, made private to its owner (0700).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sled(SledStore::open(path)?),
        })
    }

    /// Connects to PostgreSQL and applies pending migrations (see [`pg`]).
    pub fn connect_postgres(opts: &pg::PgOptions) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Postgres(pg::PgStore::connect(opts)?),
        })
    }

    /// Whether several instances may share this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// How many [`Store::accept_update`]s of one round this process may run at once: 1 with
    /// sled (one running sum), `accept_slots` with PostgreSQL (a partial sum each).
    pub fn accept_concurrency(&self) -> u32 {
        match &self.backend {
            Backend::Sled(_) => 1,
            Backend::Postgres(p) => p.accept_slots(),
        }
    }

    /// Waits until another instance changed rounds or versions, or `limit` passes (sled:
    /// `limit`, nobody else writes).
    pub async fn wait_change(&self, limit: Duration) {
        match &self.backend {
            Backend::Sled(_) => tokio::time::sleep(limit).await,
            Backend::Postgres(p) => p.wait_change(limit).await,
        }
    }

    /// Takes round `id`'s lock for closing it: with PostgreSQL, exclusively in the database,
    /// after the accepts in flight on every instance and before any later one, so that the
    /// partial sums read while it is held are final; a crashed holder's lock ends with its
    /// connection. Callers of [`Store::complete_round`] and [`Store::fail_round`] hold it.
    pub fn lock_round(&self, id: u64) -> Result<RoundLock, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(RoundLock::Local),
            Backend::Postgres(p) => Ok(RoundLock::Postgres(p.lock_round(id)?)),
        }
    }

    /// Makes everything written so far durable (PostgreSQL: every commit already is).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.flush().await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Adds `token` with `uses` enrollments unless the token is already known (used or not),
    /// so tokens from the config file are not revived after being used. Returns whether it was added.
    pub fn seed_token(&self, token: &str, uses: u32) -> Result<bool, StoreError> {
        self.add_token(
            token,
            &TokenRecord {
                uses,
                expires_unix_ms: 0,
                device: String::new(),
            },
        )
    }

    /// Adds `token` unless it is already known. Returns whether it was added.
    pub fn add_token(&self, token: &str, rec: &TokenRecord) -> Result<bool, StoreError> {
        dispatch!(self, s => s.add_token(token, rec))
    }

    /// The token's record, if known.
    pub fn token(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        dispatch!(self, s => s.token(token))
    }

    /// Consumes one use of `token` and records `client` atomically; refuses a token that is
    /// unknown, used up, expired at `client.enrolled_unix_ms` or made for another device.
    pub fn enroll(&self, token: &str, client: &ClientRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.enroll(token, client))
    }

    /// Marks every client enrolled under device name `device` (or with client id `device`)
    /// revoked at `now_ms`, in one transaction; returns their ids (already revoked ones too).
    pub fn revoke(&self, device: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        dispatch!(self, s => s.revoke(device, now_ms))
    }

    /// The client with this id.
    pub fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
        dispatch!(self, s => s.client(client_id))
    }

    /// Stores a version that no round produced (the initial model). Fails if it exists.
    pub fn put_version(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_version(meta, onnx))
    }

    /// Replaces the metadata of an existing version (its bytes stay). Fails if it is missing.
    pub fn update_version_meta(&self, meta: &VersionMeta) -> Result<(), StoreError> {
        dispatch!(self, s => s.update_version_meta(meta))
    }

    /// Newest version of `model`.
    pub fn latest_version(&self, model: &str) -> Result<Option<VersionMeta>, StoreError> {
        dispatch!(self, s => s.latest_version(model))
    }

    /// One version's metadata.
    pub fn version(&self, model: &str, version: u64) -> Result<Option<VersionMeta>, StoreError> {
        dispatch!(self, s => s.version(model, version))
    }

    /// All versions of `model`, oldest first.
    pub fn versions(&self, model: &str) -> Result<Vec<VersionMeta>, StoreError> {
        dispatch!(self, s => s.versions(model))
    }

    /// Stores a rollback: `meta` (the next version, whose content is an older one's) and
    /// its bytes, and resets the model's server optimizer state (its moments belong to the
    /// trajectory being abandoned), in one transaction. Fails if the version exists.
    pub fn put_rollback(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_rollback(meta, onnx))
    }

    /// Adds `bytes` to what `FetchModel` served of one version.
    pub fn add_downlink(&self, model: &str, version: u64, bytes: u64) -> Result<(), StoreError> {
        dispatch!(self, s => s.add_downlink(model, version, bytes))
    }

    /// Bytes `FetchModel` served of one version.
    pub fn downlink(&self, model: &str, version: u64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.downlink(model, version))
    }

    /// Keeps the coded delta that turns version `rec.base` of `model` into `version` (the
    /// compressed downlink) with the server's error-feedback residual it left. Written after
    /// the version itself: a delta that is missing (a crash in between) only means agents
    /// download the whole file and the next delta starts without a residual.
    pub fn put_delta(
        &self,
        model: &str,
        version: u64,
        rec: &DeltaRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.put_delta(model, version, rec))
    }

    /// The coded delta into `version` of `model`, if kept.
    pub fn delta(&self, model: &str, version: u64) -> Result<Option<DeltaRecord>, StoreError> {
        dispatch!(self, s => s.delta(model, version))
    }

    /// Every round of `model`, oldest first.
    pub fn rounds_of(&self, model: &str) -> Result<Vec<RoundRecord>, StoreError> {
        dispatch!(self, s => s.rounds_of(model))
    }

    /// ONNX bytes of one version.
    pub fn model_bytes(&self, model: &str, version: u64) -> Result<Option<IVec>, StoreError> {
        dispatch!(self, s => s.model_bytes(model, version))
    }

    /// Opens a round for `proto.model` unless one is open already. `proto.id` is ignored (the
    /// store assigns it). Returns the open round and whether it was created now.
    pub fn open_round(&self, proto: &RoundRecord) -> Result<(RoundRecord, bool), StoreError> {
        dispatch!(self, s => s.open_round(proto))
    }

    /// One round (an open round's counters are summed over the instances).
    pub fn round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError> {
        dispatch!(self, s => s.round(id))
    }

    /// The most recently opened round of `model`.
    pub fn latest_round(&self, model: &str) -> Result<Option<RoundRecord>, StoreError> {
        dispatch!(self, s => s.latest_round(model))
    }

    /// All open rounds (one per model at most).
    pub fn open_rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        dispatch!(self, s => s.open_rounds())
    }

    /// The running aggregates of an open round (opaque bytes written by the fold closure of
    /// [`Store::accept_update`]): one per instance that accepted an update (sled: at most
    /// one), to be combined by the caller.
    pub fn round_sums(&self, id: u64) -> Result<Vec<IVec>, StoreError> {
        dispatch!(self, s => s.round_sums(id))
    }

    /// Markers of the updates accepted in the model's last `rounds` completed rounds, newest
    /// round first (what the adaptive bounds of the next round are learnt from).
    pub fn recent_markers(
        &self,
        model: &str,
        rounds: usize,
    ) -> Result<Vec<UpdateMarker>, StoreError> {
        dispatch!(self, s => s.recent_markers(model, rounds))
    }

    /// Records that `clients` follow `model` (a `Subscribe` stream on this instance), or that
    /// their stream ended ([`MarkAvailable`]). The availability client selection draws from
    /// lives here, so every instance sharing the store draws from every instance's clients.
    pub fn mark_available(
        &self,
        model: &str,
        clients: &[String],
        how: MarkAvailable,
    ) -> Result<(), StoreError> {
        if clients.is_empty() {
            return Ok(());
        }
        dispatch!(self, s => s.mark_available(model, clients, how))
    }

    /// This instance is alive until `alive_until_ms`: its live streams' clients count as
    /// available until then (renewed by the coordinator: one write per instance, not per client).
    pub fn heartbeat(&self, alive_until_ms: u64) -> Result<(), StoreError> {
        dispatch!(self, s => s.heartbeat(alive_until_ms))
    }

    /// Counts the clients available for `model` at `now_ms` and draws `k` of them (0: only
    /// counts) with the seeded order of [`draw_key`], in memory bounded by `k`: PostgreSQL
    /// sorts by the key with `LIMIT k` (a top-k heap in the server), sled keeps a heap of `k`
    /// while it iterates. Never a list of every available client.
    pub fn sample_available(
        &self,
        model: &str,
        now_ms: u64,
        seed: u64,
        k: usize,
    ) -> Result<AvailableSample, StoreError> {
        dispatch!(self, s => s.sample_available(model, now_ms, seed, k))
    }

    /// Every tree's (sled) or table's (PostgreSQL: one row as JSON per key, empty values)
    /// contents by name: a full copy of the stored state, for checking that an operation
    /// changed nothing (tests, audits), except presence (who is subscribed, renewed in the
    /// background). Reads the whole database.
    pub fn snapshot(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<(IVec, IVec)>>, StoreError> {
        dispatch!(self, s => s.snapshot())
    }

    /// Accepted-update markers of a round, in client-id order.
    pub fn markers(&self, id: u64) -> Result<Vec<UpdateMarker>, StoreError> {
        dispatch!(self, s => s.markers(id))
    }

    /// The marker of `client`'s update in round `id`, if any.
    pub fn marker(&self, id: u64, client: &str) -> Result<Option<UpdateMarker>, StoreError> {
        dispatch!(self, s => s.marker(id, client))
    }

    /// The decoded updates kept for round `id`, with their markers, in client-id order.
    pub fn kept_updates(&self, id: u64) -> Result<Vec<(UpdateMarker, IVec)>, StoreError> {
        dispatch!(self, s => s.kept_updates(id))
    }

    /// The server optimizer state of `model` (opaque bytes written by [`Store::complete_round`]).
    pub fn server_state(&self, model: &str) -> Result<Option<IVec>, StoreError> {
        dispatch!(self, s => s.server_state(model))
    }

    /// Records an accepted update: in one transaction checks the round is open and not full and
    /// the client has no update in it yet, replaces this instance's running sum of the round by
    /// `fold(previous_sum)`, writes the client's marker, keeps the decoded update `keep` under
    /// (round, client) when given (the robust methods need every update) and bumps the round's
    /// counters. `fold` may run more than once if the transaction is retried, so it must be
    /// pure. With several instances (or accept slots, PostgreSQL), "full" is checked against the
    /// updates committed when the transaction starts, so a round can end with up to
    /// (instances × accept_slots − 1) updates above `max_clients`, each counted once. Callers
    /// run at most [`Store::accept_concurrency`] accepts of a round at once.
    pub fn accept_update<F>(
        &self,
        round_id: u64,
        marker: &UpdateMarker,
        keep: Option<&[u8]>,
        fold: F,
    ) -> Result<AcceptOutcome, StoreError>
    where
        F: Fn(Option<&[u8]>) -> Result<Vec<u8>, String> + Send + Sync,
    {
        dispatch!(self, s => s.accept_update(round_id, marker, keep, &fold))
    }

    /// Closes an open round with a new version and the model's new server optimizer state
    /// (stored in the same transaction); the round's kept updates are dropped. The caller
    /// holds [`Store::lock_round`].
    pub fn complete_round(
        &self,
        round_id: u64,
        meta: &VersionMeta,
        onnx: &[u8],
        server_state: Option<&[u8]>,
        detail: &str,
    ) -> Result<RoundRecord, StoreError> {
        dispatch!(self, s => s.complete_round(round_id, meta, onnx, server_state, detail))
    }

    /// Closes an open round without a new version; its kept updates are dropped. The caller
    /// holds [`Store::lock_round`].
    pub fn fail_round(&self, round_id: u64, detail: &str) -> Result<RoundRecord, StoreError> {
        dispatch!(self, s => s.end_round(round_id, RoundState::Failed, detail))
    }

    /// A home aggregator's round whose aggregate the upstream coordinator accepted: closed as
    /// completed without a version of its own (the next version comes from upstream); its
    /// kept updates are dropped. The caller holds [`Store::lock_round`].
    pub fn forward_round(&self, round_id: u64, detail: &str) -> Result<RoundRecord, StoreError> {
        dispatch!(self, s => s.end_round(round_id, RoundState::Completed, detail))
    }
}

/// The sled backend. Cheap to clone.
#[derive(Clone, Debug)]
struct SledStore {
    db: sled::Db,
    clients: Tree,
    tokens: Tree,
    versions: Tree,
    blobs: Tree,
    rounds: Tree,
    model_rounds: Tree,
    open_rounds: Tree,
    markers: Tree,
    sums: Tree,
    kept: Tree,
    server_state: Tree,
    downlink: Tree,
    deltas: Tree,
    presence: Tree,
    instances: Tree,
    meta: Tree,
    /// This process's name in the presence rows (random per open).
    instance: String,
}

const NEXT_ROUND_KEY: &[u8] = b"next_round_id";

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("store records serialise")
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn tx_dec<T: DeserializeOwned>(b: &[u8]) -> TxResult<T> {
    dec(b).map_err(ConflictableTransactionError::Abort)
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Db(e),
    }
}

fn version_key(model: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 9);
    k.extend_from_slice(model.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn model_prefix(model: &str) -> Vec<u8> {
    let mut k = model.as_bytes().to_vec();
    k.push(0);
    k
}

fn marker_key(round: u64, client: &str) -> Vec<u8> {
    let mut k = round.to_be_bytes().to_vec();
    k.extend_from_slice(client.as_bytes());
    k
}

fn u64_from(b: &[u8]) -> Result<u64, StoreError> {
    let a: [u8; 8] = b
        .try_into()
        .map_err(|_| StoreError::Corrupt("expected 8-byte integer".into()))?;
    Ok(u64::from_be_bytes(a))
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates `path` (and its parents) if needed and restricts it to its owner (0700).
fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl SledStore {
    /// Opens (or creates) the database at `path`. The directory holds enrollment tokens
    /// and client key digests, so it is made private to the coordinator's user (0700).
    fn open(path: &Path) -> Result<SledStore, StoreError> {
        private_dir(path).map_err(sled::Error::Io)?;
        // sled's page cache defaults to 1 GiB; bounded so the coordinator's RSS stays flat
        // as rounds accumulate (a Pi serves a home's coordinator).
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(16 << 20)
            .open()?;
        Self::from_db(db)
    }

    fn from_db(db: sled::Db) -> Result<SledStore, StoreError> {
        Ok(SledStore {
            clients: db.open_tree("clients")?,
            tokens: db.open_tree("tokens")?,
            versions: db.open_tree("versions")?,
            blobs: db.open_tree("blobs")?,
            rounds: db.open_tree("rounds")?,
            model_rounds: db.open_tree("model_rounds")?,
            open_rounds: db.open_tree("open_rounds")?,
            markers: db.open_tree("markers")?,
            sums: db.open_tree("sums")?,
            kept: db.open_tree("kept_updates")?,
            server_state: db.open_tree("server_state")?,
            downlink: db.open_tree("downlink")?,
            deltas: db.open_tree("deltas")?,
            presence: db.open_tree("presence")?,
            instances: db.open_tree("instances")?,
            instance: {
                let mut b = [0u8; 8];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
                hex::encode(b)
            },
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    // ------------------------------------------------------------ tokens and clients

    fn add_token(&self, token: &str, rec: &TokenRecord) -> Result<bool, StoreError> {
        let r = self
            .tokens
            .compare_and_swap(token, None::<&[u8]>, Some(enc(rec)))?;
        Ok(r.is_ok())
    }

    /// The token's record, if known.
    pub fn token(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens.get(token)?.map(|v| token_dec(&v)).transpose()
    }

    /// Consumes one use of `token` and records `client` atomically; refuses a token that is
    /// unknown, used up, expired at `client.enrolled_unix_ms` or made for another device.
    pub fn enroll(&self, token: &str, client: &ClientRecord) -> Result<(), StoreError> {
        (&self.tokens, &self.clients)
            .transaction(|(tokens, clients)| {
                let mut rec = match tokens.get(token)? {
                    Some(v) => token_dec(&v).map_err(ConflictableTransactionError::Abort)?,
                    None => return abort(StoreError::TokenRejected),
                };
                if rec.uses == 0 {
                    return abort(StoreError::TokenRejected);
                }
                if rec.expires_unix_ms != 0 && client.enrolled_unix_ms >= rec.expires_unix_ms {
                    return abort(StoreError::TokenExpired);
                }
                if !rec.device.is_empty() && rec.device != client.device_name {
                    return abort(StoreError::TokenDevice(rec.device.clone()));
                }
                rec.uses -= 1;
                tokens.insert(token, enc(&rec))?;
                clients.insert(client.client_id.as_bytes(), enc(client))?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Marks every client enrolled under device name `device` (or with client id `device`)
    /// revoked at `now_ms`, in one transaction; returns their ids (already revoked ones too).
    pub fn revoke(&self, device: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for kv in self.clients.iter() {
            let (k, v) = kv?;
            let rec: ClientRecord = dec(&v)?;
            if rec.device_name == device || rec.client_id == device {
                ids.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        self.clients
            .transaction(|clients| {
                for id in &ids {
                    if let Some(v) = clients.get(id.as_bytes())? {
                        let mut rec: ClientRecord = tx_dec(&v)?;
                        if rec.revoked_unix_ms.is_none() {
                            rec.revoked_unix_ms = Some(now_ms);
                            clients.insert(id.as_bytes(), enc(&rec))?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(tx_err)?;
        // A revoked client is not available any more (rare: one pass over the presence rows).
        for kv in self.presence.iter() {
            let (k, _) = kv?;
            let client = k.iter().position(|b| *b == 0).map(|i| &k[i + 1..]);
            if client.is_some_and(|c| ids.iter().any(|id| id.as_bytes() == c)) {
                self.presence.remove(&k)?;
            }
        }
        Ok(ids)
    }

    /// The client with this id.
    pub fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.clients.get(client_id)?.map(|v| dec(&v)).transpose()
    }

    // ------------------------------------------------------------ availability

    /// Presence rows: key model \0 client, value `until` (8 bytes, big-endian) ‖ instance.
    fn mark_available(
        &self,
        model: &str,
        clients: &[String],
        how: MarkAvailable,
    ) -> Result<(), StoreError> {
        for c in clients {
            let mut key = model_prefix(model);
            key.extend_from_slice(c.as_bytes());
            match how {
                MarkAvailable::Live => {
                    let mut v = LIVE_UNTIL.to_be_bytes().to_vec();
                    v.extend_from_slice(self.instance.as_bytes());
                    self.presence.insert(key, v)?;
                }
                MarkAvailable::Until(until) => {
                    self.presence
                        .fetch_and_update(key, |old| old.map(|_| until.to_be_bytes().to_vec()))?;
                }
            }
        }
        Ok(())
    }

    fn heartbeat(&self, alive_until_ms: u64) -> Result<(), StoreError> {
        self.instances
            .insert(self.instance.as_bytes(), &alive_until_ms.to_be_bytes()[..])?;
        Ok(())
    }

    /// One pass over the model's presence rows keeping the `k` smallest draw keys in a
    /// max-heap: memory O(k) (and one flag per instance), time O(n log k).
    fn sample_available(
        &self,
        model: &str,
        now_ms: u64,
        seed: u64,
        k: usize,
    ) -> Result<AvailableSample, StoreError> {
        use std::collections::BinaryHeap;
        let prefix = model_prefix(model);
        let mut heap: BinaryHeap<([u8; 32], IVec)> = BinaryHeap::with_capacity(k.min(1 << 16));
        let (mut available, mut held) = (0u64, 0usize);
        // Whether each instance named by a live row is alive (a handful of instances).
        let mut alive: std::collections::HashMap<Vec<u8>, bool> = Default::default();
        for kv in self.presence.scan_prefix(&prefix) {
            let (key, v) = kv?;
            if v.len() < 8 {
                return Err(StoreError::Corrupt("short presence row".into()));
            }
            let until = u64_from(&v[..8])?;
            if until < now_ms {
                continue;
            }
            if until == LIVE_UNTIL {
                let inst = &v[8..];
                let up = match alive.get(inst) {
                    Some(up) => *up,
                    None => {
                        let up = match self.instances.get(inst)? {
                            Some(t) => u64_from(&t)? >= now_ms,
                            None => false,
                        };
                        alive.insert(inst.to_vec(), up);
                        up
                    }
                };
                if !up {
                    continue;
                }
            }
            available += 1;
            if k == 0 {
                continue;
            }
            let draw = draw_key(seed, &key[prefix.len()..]);
            if heap.len() < k {
                heap.push((draw, key));
            } else if heap.peek().is_some_and(|top| draw < top.0) {
                if let Some(mut top) = heap.peek_mut() {
                    *top = (draw, key);
                }
            }
            held = held.max(heap.len());
        }
        let mut cohort: Vec<String> = heap
            .into_iter()
            .map(|(_, key)| String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
            .collect();
        cohort.sort();
        Ok(AvailableSample {
            available,
            cohort,
            held,
        })
    }

    // ------------------------------------------------------------ models

    /// Stores a version that no round produced (the initial model). Fails if it exists.
    pub fn put_version(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        let key = version_key(&meta.model, meta.version);
        (&self.versions, &self.blobs)
            .transaction(|(versions, blobs)| {
                if versions.get(&key)?.is_some() {
                    return abort(StoreError::Conflict(format!(
                        "version {} of {} already exists",
                        meta.version, meta.model
                    )));
                }
                versions.insert(key.as_slice(), enc(meta))?;
                blobs.insert(key.as_slice(), onnx)?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Replaces the metadata of an existing version (its bytes stay). Fails if it is missing.
    pub fn update_version_meta(&self, meta: &VersionMeta) -> Result<(), StoreError> {
        let key = version_key(&meta.model, meta.version);
        self.versions
            .transaction(|versions| {
                if versions.get(&key)?.is_none() {
                    return abort(StoreError::Conflict(format!(
                        "version {} of {} does not exist",
                        meta.version, meta.model
                    )));
                }
                versions.insert(key.as_slice(), enc(meta))?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Newest version of `model`.
    pub fn latest_version(&self, model: &str) -> Result<Option<VersionMeta>, StoreError> {
        match self.versions.scan_prefix(model_prefix(model)).next_back() {
            Some(kv) => Ok(Some(dec(&kv?.1)?)),
            None => Ok(None),
        }
    }

    /// One version's metadata.
    pub fn version(&self, model: &str, version: u64) -> Result<Option<VersionMeta>, StoreError> {
        self.versions
            .get(version_key(model, version))?
            .map(|v| dec(&v))
            .transpose()
    }

    /// All versions of `model`, oldest first.
    pub fn versions(&self, model: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.versions
            .scan_prefix(model_prefix(model))
            .map(|kv| dec(&kv?.1))
            .collect()
    }

    /// Stores a rollback: `meta` (the next version, whose content is an older one's) and
    /// its bytes, and resets the model's server optimizer state (its moments belong to the
    /// trajectory being abandoned), in one transaction. Fails if the version exists.
    pub fn put_rollback(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        let key = version_key(&meta.model, meta.version);
        (&self.versions, &self.blobs, &self.server_state)
            .transaction(|(versions, blobs, states)| {
                if versions.get(&key)?.is_some() {
                    return abort(StoreError::Conflict(format!(
                        "version {} of {} already exists",
                        meta.version, meta.model
                    )));
                }
                versions.insert(key.as_slice(), enc(meta))?;
                blobs.insert(key.as_slice(), onnx)?;
                states.remove(meta.model.as_bytes())?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Adds `bytes` to what `FetchModel` served of one version.
    pub fn add_downlink(&self, model: &str, version: u64, bytes: u64) -> Result<(), StoreError> {
        self.downlink
            .update_and_fetch(version_key(model, version), |old| {
                let before = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(before.saturating_add(bytes).to_be_bytes().to_vec())
            })?;
        Ok(())
    }

    /// Bytes `FetchModel` served of one version.
    pub fn downlink(&self, model: &str, version: u64) -> Result<u64, StoreError> {
        match self.downlink.get(version_key(model, version))? {
            Some(b) => u64_from(&b),
            None => Ok(0),
        }
    }

    /// Keeps the coded delta that turns version `rec.base` of `model` into `version` (the
    /// compressed downlink) with the server's error-feedback residual it left. Written after
    /// the version itself: a delta that is missing (a crash in between) only means agents
    /// download the whole file and the next delta starts without a residual.
    pub fn put_delta(
        &self,
        model: &str,
        version: u64,
        rec: &DeltaRecord,
    ) -> Result<(), StoreError> {
        let mut v = Vec::with_capacity(16 + rec.payload.len() + rec.residual.len());
        v.extend_from_slice(&rec.base.to_be_bytes());
        v.extend_from_slice(&(rec.payload.len() as u64).to_be_bytes());
        v.extend_from_slice(&rec.payload);
        v.extend_from_slice(&rec.residual);
        self.deltas.insert(version_key(model, version), v)?;
        Ok(())
    }

    /// The coded delta into `version` of `model`, if kept.
    pub fn delta(&self, model: &str, version: u64) -> Result<Option<DeltaRecord>, StoreError> {
        let Some(b) = self.deltas.get(version_key(model, version))? else {
            return Ok(None);
        };
        let corrupt = || StoreError::Corrupt("short delta record".into());
        if b.len() < 16 {
            return Err(corrupt());
        }
        let base = u64_from(&b[..8])?;
        let n = usize::try_from(u64_from(&b[8..16])?).map_err(|_| corrupt())?;
        if n > b.len() - 16 {
            return Err(corrupt());
        }
        Ok(Some(DeltaRecord {
            base,
            payload: b[16..16 + n].to_vec(),
            residual: b[16 + n..].to_vec(),
        }))
    }

    /// Every round of `model`, oldest first.
    pub fn rounds_of(&self, model: &str) -> Result<Vec<RoundRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.model_rounds.scan_prefix(model_prefix(model)) {
            let (k, _) = kv?;
            if let Some(r) = self.round(u64_from(&k[k.len() - 8..])?)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// ONNX bytes of one version.
    pub fn model_bytes(&self, model: &str, version: u64) -> Result<Option<IVec>, StoreError> {
        Ok(self.blobs.get(version_key(model, version))?)
    }

    // ------------------------------------------------------------ rounds

    /// Opens a round for `proto.model` unless one is open already. `proto.id` is ignored (the
    /// store assigns it). Returns the open round and whether it was created now.
    pub fn open_round(&self, proto: &RoundRecord) -> Result<(RoundRecord, bool), StoreError> {
        let model = proto.model.as_bytes();
        (
            &self.rounds,
            &self.open_rounds,
            &self.model_rounds,
            &self.meta,
        )
            .transaction(|(rounds, open, model_rounds, meta)| {
                if let Some(id) = open.get(model)? {
                    let rec = rounds.get(&id)?.ok_or_else(|| {
                        ConflictableTransactionError::Abort(StoreError::Corrupt(
                            "open round index points at a missing round".into(),
                        ))
                    })?;
                    return Ok((tx_dec(&rec)?, false));
                }
                let id = match meta.get(NEXT_ROUND_KEY)? {
                    Some(v) => u64_from(&v).map_err(ConflictableTransactionError::Abort)?,
                    None => 1,
                };
                meta.insert(NEXT_ROUND_KEY, &(id + 1).to_be_bytes()[..])?;
                let mut rec = proto.clone();
                rec.id = id;
                rec.state = RoundState::Open;
                rounds.insert(&id.to_be_bytes()[..], enc(&rec))?;
                open.insert(model, &id.to_be_bytes()[..])?;
                model_rounds.insert(version_key(&rec.model, id), &[][..])?;
                Ok((rec, true))
            })
            .map_err(tx_err)
    }

    /// One round.
    pub fn round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError> {
        self.rounds
            .get(id.to_be_bytes())?
            .map(|v| dec(&v))
            .transpose()
    }

    /// The most recently opened round of `model`.
    pub fn latest_round(&self, model: &str) -> Result<Option<RoundRecord>, StoreError> {
        match self
            .model_rounds
            .scan_prefix(model_prefix(model))
            .next_back()
        {
            Some(kv) => {
                let (k, _) = kv?;
                let id = u64_from(&k[k.len() - 8..])?;
                self.round(id)
            }
            None => Ok(None),
        }
    }

    /// All open rounds (one per model at most).
    pub fn open_rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.open_rounds.iter() {
            let (_, id) = kv?;
            if let Some(r) = self.round(u64_from(&id)?)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn round_sums(&self, id: u64) -> Result<Vec<IVec>, StoreError> {
        Ok(self.sums.get(id.to_be_bytes())?.into_iter().collect())
    }

    /// Markers of the updates accepted in the model's last `rounds` completed rounds, newest
    /// round first (what the adaptive bounds of the next round are learnt from).
    pub fn recent_markers(
        &self,
        model: &str,
        rounds: usize,
    ) -> Result<Vec<UpdateMarker>, StoreError> {
        let mut out = Vec::new();
        let mut seen = 0;
        for kv in self.model_rounds.scan_prefix(model_prefix(model)).rev() {
            if seen >= rounds {
                break;
            }
            let (k, _) = kv?;
            let id = u64_from(&k[k.len() - 8..])?;
            if self
                .round(id)?
                .is_some_and(|r| r.state == RoundState::Completed)
            {
                seen += 1;
                out.extend(self.markers(id)?);
            }
        }
        Ok(out)
    }

    /// Every tree's keys and values, by tree name: a full copy of the stored state, for
    /// checking that an operation changed nothing (tests, audits). Reads the whole database.
    pub fn snapshot(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<(IVec, IVec)>>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        for name in self.db.tree_names() {
            // Presence is liveness renewed in the background, not state an operation changes.
            if [&b"presence"[..], b"instances"].contains(&&name[..]) {
                continue;
            }
            let tree = self.db.open_tree(&name)?;
            let kvs = tree.iter().collect::<Result<Vec<_>, _>>()?;
            out.insert(String::from_utf8_lossy(&name).into_owned(), kvs);
        }
        Ok(out)
    }

    /// Accepted-update markers of a round.
    pub fn markers(&self, id: u64) -> Result<Vec<UpdateMarker>, StoreError> {
        self.markers
            .scan_prefix(id.to_be_bytes())
            .map(|kv| dec(&kv?.1))
            .collect()
    }

    /// The marker of `client`'s update in round `id`, if any.
    pub fn marker(&self, id: u64, client: &str) -> Result<Option<UpdateMarker>, StoreError> {
        self.markers
            .get(marker_key(id, client))?
            .map(|v| dec(&v))
            .transpose()
    }

    /// The decoded updates kept for round `id`, with their markers, in client-id order.
    pub fn kept_updates(&self, id: u64) -> Result<Vec<(UpdateMarker, IVec)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.kept.scan_prefix(id.to_be_bytes()) {
            let (k, v) = kv?;
            let marker = self
                .markers
                .get(&k)?
                .ok_or_else(|| StoreError::Corrupt("kept update without a marker".into()))?;
            out.push((dec(&marker)?, v));
        }
        Ok(out)
    }

    /// The server optimizer state of `model` (opaque bytes written by [`Store::complete_round`]).
    pub fn server_state(&self, model: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.server_state.get(model)?)
    }

    /// Records an accepted update: in one transaction checks the round is open and not full and
    /// the client has no update in it yet, replaces the round's running sum by
    /// `fold(previous_sum)`, writes the client's marker, keeps the decoded update `keep` under
    /// (round, client) when given (the robust methods need every update) and bumps the round's
    /// counters. `fold` may run more than once if the transaction is retried, so it must be pure.
    fn accept_update<F>(
        &self,
        round_id: u64,
        marker: &UpdateMarker,
        keep: Option<&[u8]>,
        fold: F,
    ) -> Result<AcceptOutcome, StoreError>
    where
        F: Fn(Option<&[u8]>) -> Result<Vec<u8>, String>,
    {
        let rkey = round_id.to_be_bytes();
        let mkey = marker_key(round_id, &marker.client_id);
        (&self.rounds, &self.markers, &self.sums, &self.kept)
            .transaction(|(rounds, markers, sums, kept)| {
                let Some(rec) = rounds.get(rkey)? else {
                    return Ok(AcceptOutcome::NotFound);
                };
                let mut rec: RoundRecord = tx_dec(&rec)?;
                if markers.get(&mkey)?.is_some() {
                    return Ok(AcceptOutcome::Duplicate(rec));
                }
                if rec.state != RoundState::Open {
                    return Ok(AcceptOutcome::NotOpen(rec));
                }
                if rec.updates >= rec.max_clients {
                    return Ok(AcceptOutcome::Full(rec));
                }
                let prev = sums.get(rkey)?;
                let next = fold(prev.as_deref())
                    .map_err(|e| ConflictableTransactionError::Abort(StoreError::Fold(e)))?;
                sums.insert(&rkey[..], next)?;
                markers.insert(mkey.as_slice(), enc(marker))?;
                if let Some(update) = keep {
                    kept.insert(mkey.as_slice(), update)?;
                }
                rec.updates += 1;
                rec.total_samples += marker.num_samples;
                rec.uplink_bytes += marker.payload_bytes;
                if marker.eval_samples > 0 {
                    let n = marker.eval_samples as f64;
                    rec.fed_eval_samples += marker.eval_samples;
                    rec.fed_eval_loss_sum += n * f64::from(marker.eval_loss);
                    rec.fed_eval_correct += n * f64::from(marker.eval_accuracy);
                }
                rounds.insert(&rkey[..], enc(&rec))?;
                Ok(AcceptOutcome::Accepted(rec))
            })
            .map_err(tx_err)
    }

    /// Keys of the updates kept for a round (read before the closing transaction: sled
    /// transactions cannot scan; callers hold the round's lock, so none is added meanwhile).
    fn kept_keys(&self, round_id: u64) -> Result<Vec<IVec>, StoreError> {
        self.kept
            .scan_prefix(round_id.to_be_bytes())
            .keys()
            .map(|k| k.map_err(StoreError::from))
            .collect()
    }

    fn close_round_tx(
        (rounds, open, sums, kept): (
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
            &TransactionalTree,
        ),
        kept_keys: &[IVec],
        round_id: u64,
    ) -> TxResult<RoundRecord> {
        let rkey = round_id.to_be_bytes();
        let Some(rec) = rounds.get(rkey)? else {
            return abort(StoreError::Conflict(format!(
                "round {round_id} does not exist"
            )));
        };
        let rec: RoundRecord = tx_dec(&rec)?;
        if rec.state != RoundState::Open {
            return abort(StoreError::Conflict(format!(
                "round {round_id} is not open"
            )));
        }
        let mut rec = rec;
        rec.closed_unix_ms = now_unix_ms();
        open.remove(rec.model.as_bytes())?;
        sums.remove(&rkey[..])?;
        for k in kept_keys {
            kept.remove(k)?;
        }
        Ok(rec)
    }

    /// Closes an open round with a new version and the model's new server optimizer state
    /// (stored in the same transaction); the round's kept updates are dropped.
    pub fn complete_round(
        &self,
        round_id: u64,
        meta: &VersionMeta,
        onnx: &[u8],
        server_state: Option<&[u8]>,
        detail: &str,
    ) -> Result<RoundRecord, StoreError> {
        let vkey = version_key(&meta.model, meta.version);
        let kept_keys = self.kept_keys(round_id)?;
        (
            &self.rounds,
            &self.open_rounds,
            &self.sums,
            &self.kept,
            &self.versions,
            &self.blobs,
            &self.server_state,
        )
            .transaction(|(rounds, open, sums, kept, versions, blobs, states)| {
                let mut rec =
                    Self::close_round_tx((rounds, open, sums, kept), &kept_keys, round_id)?;
                if versions.get(&vkey)?.is_some() {
                    return abort(StoreError::Conflict(format!(
                        "version {} of {} already exists",
                        meta.version, meta.model
                    )));
                }
                versions.insert(vkey.as_slice(), enc(meta))?;
                blobs.insert(vkey.as_slice(), onnx)?;
                if let Some(state) = server_state {
                    states.insert(meta.model.as_bytes(), state)?;
                }
                rec.state = RoundState::Completed;
                rec.new_version = meta.version;
                rec.eval_accuracy = meta.eval_accuracy;
                rec.detail = detail.to_string();
                rounds.insert(&round_id.to_be_bytes()[..], enc(&rec))?;
                Ok(rec)
            })
            .map_err(tx_err)
    }

    /// Closes an open round without a new version, in `state`; its kept updates are dropped.
    pub fn end_round(
        &self,
        round_id: u64,
        state: RoundState,
        detail: &str,
    ) -> Result<RoundRecord, StoreError> {
        let kept_keys = self.kept_keys(round_id)?;
        (&self.rounds, &self.open_rounds, &self.sums, &self.kept)
            .transaction(|(rounds, open, sums, kept)| {
                let mut rec =
                    Self::close_round_tx((rounds, open, sums, kept), &kept_keys, round_id)?;
                rec.state = state;
                rec.detail = detail.to_string();
                rounds.insert(&round_id.to_be_bytes()[..], enc(&rec))?;
                Ok(rec)
            })
            .map_err(tx_err)
    }
}

#[cfg(all(test, unix))]
#[path = "../tests/common/pg.rs"]
mod pg_cluster;

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `check` against a fresh sled store and a fresh PostgreSQL store (a cluster of its
    /// own; skipped with a message when PostgreSQL is not installed). `check` gets an opener:
    /// each call opens the same database again (drop the previous store first).
    fn on_both_backends(check: impl Fn(&dyn Fn() -> Store)) {
        let dir = tempfile::tempdir().unwrap();
        check(&|| Store::open(dir.path()).unwrap());
        #[cfg(unix)]
        if let Some(cluster) = super::pg_cluster::PgCluster::start() {
            let opts = pg::PgOptions {
                url: cluster.database("store_test"),
                pool_size: 4,
                instance: "unit".into(),
                accept_slots: 1,
            };
            check(&|| Store::connect_postgres(&opts).unwrap());
        }
    }

    fn round(model: &str) -> RoundRecord {
        RoundRecord {
            id: 0,
            model: model.into(),
            state: RoundState::Open,
            base_version: 1,
            new_version: 0,
            min_clients: 1,
            max_clients: 2,
            opened_unix_ms: 0,
            deadline_unix_ms: 0,
            task: TaskParams {
                local_epochs: 1,
                learning_rate: 0.1,
                batch_size: 8,
                clip_norm: 1.0,
                quant_bits: 8,
                topk_fraction: 1.0,
                ..TaskParams::default()
            },
            reason: "test".into(),
            updates: 0,
            total_samples: 0,
            uplink_bytes: 0,
            model_fp32_bytes: 40,
            eval_accuracy: None,
            detail: String::new(),
            keep_updates: true,
            norm_bound: 0.0,
            sample_cap: 0,
            ..RoundRecord::default()
        }
    }

    fn marker(c: &str, n: u64) -> UpdateMarker {
        UpdateMarker {
            client_id: c.into(),
            num_samples: n,
            reported_samples: n,
            payload_sha256: "x".into(),
            payload_bytes: 10,
            train_loss: 0.5,
            accepted_unix_ms: 1,
            norm: 1.0,
            ..UpdateMarker::default()
        }
    }

    #[cfg(unix)]
    #[test]
    fn database_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        // An existing directory open to others is tightened, a new one created private.
        std::fs::create_dir(&db).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Store::open(&db).unwrap();
        s.seed_token("tok-123456", 1).unwrap();
        drop(s);
        let mode = std::fs::metadata(&db).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "database readable by others: {mode:o}");
        let fresh = dir.path().join("a/b/db");
        drop(Store::open(&fresh).unwrap());
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "new database readable by others: {mode:o}");
    }

    #[test]
    fn tokens_are_one_time_and_not_reseeded() {
        on_both_backends(|open| {
            let s = open();
            assert!(s.seed_token("tok-123456", 1).unwrap());
            let c = ClientRecord {
                client_id: "c1".into(),
                device_name: "d".into(),
                key_sha256: "k".into(),
                enrolled_unix_ms: 1,
                cert_sha256: String::new(),
                revoked_unix_ms: None,
            };
            s.enroll("tok-123456", &c).unwrap();
            assert!(matches!(
                s.enroll("tok-123456", &c),
                Err(StoreError::TokenRejected)
            ));
            assert!(matches!(
                s.enroll("nope", &c),
                Err(StoreError::TokenRejected)
            ));
            assert!(!s.seed_token("tok-123456", 1).unwrap());
            assert!(matches!(
                s.enroll("tok-123456", &c),
                Err(StoreError::TokenRejected)
            ));
            assert_eq!(s.client("c1").unwrap().unwrap(), c);
        });
    }

    #[test]
    fn tokens_expire_are_bound_to_a_device_and_clients_are_revoked() {
        on_both_backends(|open| {
            let s = open();
            let tok = |exp, dev: &str| TokenRecord {
                uses: 1,
                expires_unix_ms: exp,
                device: dev.into(),
            };
            let client = |id: &str, dev: &str, at| ClientRecord {
                client_id: id.into(),
                device_name: dev.into(),
                key_sha256: String::new(),
                enrolled_unix_ms: at,
                cert_sha256: "f".into(),
                revoked_unix_ms: None,
            };
            s.add_token("t-expiring", &tok(100, "")).unwrap();
            assert!(matches!(
                s.enroll("t-expiring", &client("c1", "d", 100)),
                Err(StoreError::TokenExpired)
            ));
            s.enroll("t-expiring", &client("c1", "d", 99)).unwrap();
            s.add_token("t-lamp", &tok(0, "lamp")).unwrap();
            assert!(matches!(
                s.enroll("t-lamp", &client("c2", "plug", 1)),
                Err(StoreError::TokenDevice(_))
            ));
            s.enroll("t-lamp", &client("c2", "lamp", 1)).unwrap();
            assert_eq!(s.revoke("lamp", 5).unwrap(), vec!["c2".to_string()]);
            assert_eq!(s.client("c2").unwrap().unwrap().revoked_unix_ms, Some(5));
            assert_eq!(s.client("c1").unwrap().unwrap().revoked_unix_ms, None);
            assert!(s.revoke("nobody", 5).unwrap().is_empty());
        });
    }

    #[test]
    fn rounds_accept_once_per_client_and_close() {
        on_both_backends(|open| {
            let s = open();
            let (r, created) = s.open_round(&round("m")).unwrap();
            assert!(created);
            assert_eq!(r.id, 1);
            let (again, created) = s.open_round(&round("m")).unwrap();
            assert!(!created);
            assert_eq!(again.id, 1);
            let (other, _) = s.open_round(&round("n")).unwrap();
            assert_eq!(other.id, 2);

            let append = |p: Option<&[u8]>| {
                let mut v = p.map(|p| p.to_vec()).unwrap_or_default();
                v.push(7);
                Ok(v)
            };
            assert!(
                matches!(s.accept_update(1, &marker("a", 3), Some(&b"ua"[..]), append).unwrap(), AcceptOutcome::Accepted(r) if r.updates == 1 && r.total_samples == 3)
            );
            assert!(
                matches!(s.accept_update(1, &marker("a", 3), Some(&b"ua"[..]), append).unwrap(), AcceptOutcome::Duplicate(r) if r.updates == 1)
            );
            assert!(
                matches!(s.accept_update(1, &marker("b", 2), Some(&b"ub"[..]), append).unwrap(), AcceptOutcome::Accepted(r) if r.updates == 2 && r.uplink_bytes == 20)
            );
            assert!(matches!(
                s.accept_update(1, &marker("c", 2), Some(&b"uc"[..]), append)
                    .unwrap(),
                AcceptOutcome::Full(_)
            ));
            let sums = s.round_sums(1).unwrap();
            assert_eq!(sums.len(), 1);
            assert_eq!(sums[0].as_ref(), &[7, 7]);
            assert_eq!(s.markers(1).unwrap().len(), 2);
            let kept = s.kept_updates(1).unwrap();
            let kept: Vec<(&str, &[u8])> = kept
                .iter()
                .map(|(m, b)| (m.client_id.as_str(), b.as_ref()))
                .collect();
            assert_eq!(kept, vec![("a", &b"ua"[..]), ("b", &b"ub"[..])]);
            assert!(
                s.kept_updates(2).unwrap().is_empty(),
                "a failed fold keeps nothing"
            );
            assert!(matches!(
                s.accept_update(9, &marker("a", 1), None, append).unwrap(),
                AcceptOutcome::NotFound
            ));
            let failing = |_: Option<&[u8]>| Err("boom".to_string());
            assert!(matches!(
                s.accept_update(2, &marker("a", 1), Some(&b"x"[..]), failing),
                Err(StoreError::Fold(_))
            ));
            assert_eq!(s.round(2).unwrap().unwrap().updates, 0);

            let meta = VersionMeta {
                model: "m".into(),
                version: 2,
                sha256: "h".into(),
                size_bytes: 3,
                eval_accuracy: Some(0.5),
                created_unix_ms: 1,
                from_round: 1,
                parent_version: 1,
                signature: String::new(),
                ..VersionMeta::default()
            };
            let done = s
                .complete_round(1, &meta, b"abc", Some(&b"state"[..]), "ok")
                .unwrap();
            assert_eq!(done.state, RoundState::Completed);
            assert_eq!(done.new_version, 2);
            assert!(s.complete_round(1, &meta, b"abc", None, "ok").is_err());
            assert_eq!(s.server_state("m").unwrap().unwrap().as_ref(), b"state");
            assert!(s.server_state("n").unwrap().is_none());
            assert!(
                s.kept_updates(1).unwrap().is_empty(),
                "closing drops kept updates"
            );
            assert_eq!(s.latest_version("m").unwrap().unwrap(), meta);
            assert_eq!(s.model_bytes("m", 2).unwrap().unwrap().as_ref(), b"abc");
            assert!(s.round_sums(1).unwrap().is_empty());
            assert!(matches!(
                s.accept_update(1, &marker("z", 1), None, append).unwrap(),
                AcceptOutcome::NotOpen(_)
            ));
            assert_eq!(s.open_rounds().unwrap().len(), 1);
            s.fail_round(2, "too few").unwrap();
            assert!(s.open_rounds().unwrap().is_empty());
            assert_eq!(s.latest_round("m").unwrap().unwrap().id, 1);
            assert_eq!(
                s.latest_round("n").unwrap().unwrap().state,
                RoundState::Failed
            );
            // A new round for m gets a fresh id.
            assert_eq!(s.open_round(&round("m")).unwrap().0.id, 3);
            assert_eq!(s.latest_round("m").unwrap().unwrap().id, 3);
            // A home aggregator's round ends completed without a version of its own.
            let fwd = s.forward_round(3, "sent upstream").unwrap();
            assert_eq!((fwd.state, fwd.new_version), (RoundState::Completed, 0));
            assert!(s.open_rounds().unwrap().is_empty());
            assert_eq!(s.latest_version("m").unwrap().unwrap(), meta);
        });
    }

    /// A cohort drawn from 200,000 available clients: the draw holds at most k client ids at
    /// once (sled: its heap; PostgreSQL: the rows it receives, after a top-N heap sort in the
    /// server, checked in the plan), so a return to "list every available client, then
    /// sample" fails here; seeded (the same seed gives the same cohort, on both backends:
    /// the k smallest `draw_key`s, computed here independently); live streams count only
    /// while their instance's heartbeat lasts; ended, other models' and revoked clients are
    /// left out.
    #[test]
    fn cohort_draws_are_seeded_and_bounded_in_memory() {
        const N: usize = 200_000;
        const K: usize = 100;
        let ids: Vec<String> = (0..N).map(|i| format!("c-{i:08x}")).collect();
        let mut keyed: Vec<([u8; 32], &String)> =
            ids.iter().map(|c| (draw_key(7, c.as_bytes()), c)).collect();
        keyed.sort();
        let mut want: Vec<String> = keyed[..K].iter().map(|(_, c)| (*c).clone()).collect();
        want.sort();
        let now = 5_000;
        on_both_backends(|open| {
            let s = open();
            s.mark_available("m", &ids, MarkAvailable::Live).unwrap();
            // Live streams of an instance without a heartbeat, or whose heartbeat ran out,
            // do not count.
            assert_eq!(s.sample_available("m", now, 7, K).unwrap().available, 0);
            s.heartbeat(now - 1).unwrap();
            assert_eq!(s.sample_available("m", now, 7, K).unwrap().available, 0);
            s.heartbeat(now + 30_000).unwrap();
            // Another model's clients and ended streams do not count.
            s.mark_available("other", &ids[..10], MarkAvailable::Live)
                .unwrap();
            let stale = ["stale".to_string()];
            s.mark_available("m", &stale, MarkAvailable::Live).unwrap();
            s.mark_available("m", &stale, MarkAvailable::Until(now - 1))
                .unwrap();
            let t = std::time::Instant::now();
            let a = s.sample_available("m", now, 7, K).unwrap();
            eprintln!("draw of {K} from {N}: {:?}", t.elapsed());
            assert_eq!(a.available, N as u64);
            assert_eq!(a.cohort, want, "the k smallest draw keys, on every backend");
            assert!(a.held <= K, "the draw held {} ids for k = {K}", a.held);
            assert_eq!(s.sample_available("m", now, 7, K).unwrap(), a);
            let b = s.sample_available("m", now, 8, K).unwrap();
            assert_ne!(b.cohort, a.cohort, "another seed, another cohort");
            let counted = s.sample_available("m", now, 7, 0).unwrap();
            assert_eq!(
                (counted.available, counted.cohort.len(), counted.held),
                (N as u64, 0, 0)
            );
            if let Backend::Postgres(p) = &s.backend {
                let plan = p.explain_sample("m", now, K).unwrap();
                assert!(plan.contains("top-N heapsort"), "{plan}");
                assert!(plan.starts_with("Limit"), "{plan}");
            }
            // A stream that ended: available until the time given (here: already past).
            s.mark_available("m", &ids[..1], MarkAvailable::Until(now - 1))
                .unwrap();
            // An end makes no row (a revoked client's row stays gone).
            s.mark_available("m", &["ghost".into()], MarkAvailable::Until(now + 1))
                .unwrap();
            assert_eq!(
                s.sample_available("m", now, 7, 0).unwrap().available,
                N as u64 - 1
            );
            // Revocation removes the client's rows.
            s.seed_token("tok-revoke", 1).unwrap();
            let c = ClientRecord {
                client_id: ids[1].clone(),
                device_name: "gone".into(),
                key_sha256: String::new(),
                enrolled_unix_ms: 1,
                cert_sha256: String::new(),
                revoked_unix_ms: None,
            };
            s.enroll("tok-revoke", &c).unwrap();
            assert_eq!(s.revoke("gone", 2).unwrap(), vec![ids[1].clone()]);
            let after = s.sample_available("m", now, 7, N).unwrap();
            assert_eq!(after.available, N as u64 - 2);
            assert!(!after.cohort.contains(&ids[1]) && !after.cohort.contains(&ids[0]));
        });
    }

    #[test]
    fn versions_are_listed_in_order_and_survive_reopen() {
        on_both_backends(|open| {
            {
                let s = open();
                for v in [1u64, 2, 10] {
                    let meta = VersionMeta {
                        model: "m".into(),
                        version: v,
                        sha256: format!("{v}"),
                        size_bytes: 1,
                        eval_accuracy: None,
                        created_unix_ms: v,
                        from_round: 0,
                        parent_version: 0,
                        signature: String::new(),
                        ..VersionMeta::default()
                    };
                    s.put_version(&meta, &[v as u8]).unwrap();
                }
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(s.flush())
                    .unwrap();
            }
            let s = open();
            let vs: Vec<u64> = s.versions("m").unwrap().iter().map(|v| v.version).collect();
            assert_eq!(vs, vec![1, 2, 10]);
            assert_eq!(s.latest_version("m").unwrap().unwrap().version, 10);
            assert!(s.latest_version("mm").unwrap().is_none());
        });
    }
}

/// Two instances on one PostgreSQL database.
#[cfg(all(test, unix))]
mod shared_tests {
    use super::pg::PgOptions;
    use super::*;
    use std::time::{Duration, Instant};

    fn marker(c: &str, n: u64) -> UpdateMarker {
        UpdateMarker {
            client_id: c.into(),
            num_samples: n,
            reported_samples: n,
            payload_bytes: 10,
            ..UpdateMarker::default()
        }
    }

    fn push(v: u8) -> impl Fn(Option<&[u8]>) -> Result<Vec<u8>, String> + Send + Sync {
        move |p| {
            let mut out = p.map(<[u8]>::to_vec).unwrap_or_default();
            out.push(v);
            Ok(out)
        }
    }

    /// Presence is shared: a client subscribed on instance `a` is available to a draw on `b`
    /// while `a`'s heartbeat lasts, and drops out when `a` stops beating (died).
    #[test]
    fn every_instance_draws_from_every_instances_subscribers() {
        let Some(cluster) = super::pg_cluster::PgCluster::start() else {
            return;
        };
        let url = cluster.database("presence");
        let open = |instance: &str| {
            Store::connect_postgres(&PgOptions {
                url: url.clone(),
                pool_size: 3,
                instance: instance.into(),
                accept_slots: 1,
            })
            .unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let now = 1_000_000;
        a.heartbeat(now + 30_000).unwrap();
        b.heartbeat(now + 30_000).unwrap();
        a.mark_available("m", &["on-a".into()], MarkAvailable::Live)
            .unwrap();
        b.mark_available("m", &["on-b".into()], MarkAvailable::Live)
            .unwrap();
        let drawn = b.sample_available("m", now, 1, 10).unwrap();
        assert_eq!(drawn.cohort, vec!["on-a".to_string(), "on-b".to_string()]);
        // `a` died: its last heartbeat runs out, its clients are not available any more.
        let later = now + 31_000;
        b.heartbeat(later + 30_000).unwrap();
        let drawn = b.sample_available("m", later, 1, 10).unwrap();
        assert_eq!(
            (drawn.available, drawn.cohort),
            (1, vec!["on-b".to_string()])
        );
    }

    /// Accept slots: one instance folding concurrently into several partial sums loses no
    /// fold and counts every update once (each slot is used by one accept at a time; two
    /// accepts racing on one new partial-sum row would each write their own sum).
    #[test]
    fn concurrent_accepts_on_slots_lose_no_fold() {
        let Some(cluster) = super::pg_cluster::PgCluster::start() else {
            return;
        };
        let s = Store::connect_postgres(&PgOptions {
            url: cluster.database("slots"),
            pool_size: 8,
            instance: "a".into(),
            accept_slots: 4,
        })
        .unwrap();
        assert_eq!(s.accept_concurrency(), 4);
        let proto = RoundRecord {
            model: "m".into(),
            max_clients: 1000,
            ..RoundRecord::default()
        };
        let (r, _) = s.open_round(&proto).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..5 {
                        let m = marker(&format!("c{t}-{i}"), 1);
                        let out = s.accept_update(r.id, &m, None, push(1)).unwrap();
                        assert!(matches!(out, AcceptOutcome::Accepted(_)), "{out:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let sums = s.round_sums(r.id).unwrap();
        assert!((1..=4).contains(&sums.len()), "{} partial sums", sums.len());
        let folded: usize = sums.iter().map(|b| b.len()).sum();
        assert_eq!(folded, 40, "every accepted update folded once");
        assert_eq!(s.round(r.id).unwrap().unwrap().updates, 40);
        assert_eq!(s.markers(r.id).unwrap().len(), 40);
    }

    #[test]
    fn instances_count_each_update_once_and_accepts_wait_for_the_closer() {
        let Some(cluster) = super::pg_cluster::PgCluster::start() else {
            return;
        };
        let url = cluster.database("shared");
        let open = |instance: &str| {
            Store::connect_postgres(&PgOptions {
                url: url.clone(),
                pool_size: 3,
                instance: instance.into(),
                accept_slots: 1,
            })
            .unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let proto = RoundRecord {
            model: "m".into(),
            max_clients: 4,
            ..RoundRecord::default()
        };
        let (r, created) = a.open_round(&proto).unwrap();
        assert!(created);
        // One open round per model, whichever instance asks.
        let (same, created) = b.open_round(&proto).unwrap();
        assert!(!created);
        assert_eq!(same.id, r.id);

        assert!(matches!(
            a.accept_update(r.id, &marker("c1", 3), None, push(1)).unwrap(),
            AcceptOutcome::Accepted(x) if x.updates == 1
        ));
        assert!(matches!(
            b.accept_update(r.id, &marker("c2", 5), None, push(2)).unwrap(),
            AcceptOutcome::Accepted(x) if x.updates == 2 && x.total_samples == 8
        ));
        // c1 is counted once, whichever instance it retries on.
        assert!(matches!(
            b.accept_update(r.id, &marker("c1", 3), None, push(9)).unwrap(),
            AcceptOutcome::Duplicate(x) if x.updates == 2
        ));
        // Each instance folded what it accepted into its own partial sum.
        let mut sums: Vec<Vec<u8>> = a
            .round_sums(r.id)
            .unwrap()
            .iter()
            .map(|s| s.to_vec())
            .collect();
        sums.sort();
        assert_eq!(sums, vec![vec![1], vec![2]]);
        assert_eq!(b.round(r.id).unwrap().unwrap().updates, 2);

        // While `a` holds the round's lock to close it, an accept on `b` waits, and then
        // finds the round closed: nothing lands after the partial sums were read.
        let lock = a.lock_round(r.id).unwrap();
        let b2 = b.clone();
        let id = r.id;
        let late = std::thread::spawn(move || {
            let t = Instant::now();
            let out = b2
                .accept_update(id, &marker("c3", 1), None, push(3))
                .unwrap();
            (out, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            !late.is_finished(),
            "an accept went through a closing round's lock"
        );
        let closed = a.fail_round(r.id, "test").unwrap();
        assert_eq!((closed.updates, closed.total_samples), (2, 8));
        drop(lock);
        let (out, waited) = late.join().unwrap();
        assert!(matches!(out, AcceptOutcome::NotOpen(_)), "{out:?}");
        assert!(waited >= Duration::from_millis(400), "{waited:?}");
        assert!(a.round_sums(r.id).unwrap().is_empty());
        // Closed rounds keep their final counters.
        let rec = b.round(r.id).unwrap().unwrap();
        assert_eq!((rec.state, rec.updates), (RoundState::Failed, 2));
        assert_eq!(b.markers(r.id).unwrap().len(), 2);
    }
}
