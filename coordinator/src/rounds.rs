//! Round lifecycle: open (one per model at a time, once `min_available_clients` are available,
//! with a cohort drawn at random from the available clients when selection is configured),
//! accept updates (from the cohort only; validated, folded into the running sum and persisted
//! together with the client's marker in one store transaction), complete at `max_clients` or
//! at the deadline with at least `min_clients` (else FAILED), run the next round of a server
//! loop (`num_rounds`, or until a target accuracy), and resume open rounds after a restart
//! with their sum and deadline. Also the operators' view of versions and rollback.

use std::sync::Arc;
use std::time::Duration;

use hearth_model::update::CodecConfig;
use hearth_model::{OnnxModel, Weights};
use rand::RngCore;

use crate::aggregate::{
    clip_update, validate_update, weights_from_bytes, weights_to_bytes, Aggregate, AggregateError,
};
use crate::config::Combine;
use crate::optimizer::{self, ServerState};
use crate::robust::{self, Weighted};
use crate::state::{blocking_task, evaluate, sha256_hex, stopped, Coordinator, Event};
use crate::store::{
    now_unix_ms, AcceptOutcome, DeltaRecord, RoundRecord, RoundState, StoreError, TaskParams,
    UpdateMarker, VersionMeta,
};
use crate::Error;

/// Completed rounds whose accepted updates a new round's adaptive bounds are learnt from.
pub const HISTORY_ROUNDS: usize = 3;

/// Parameters of `StartRound` (0 = configured default).
#[derive(Clone, Debug, Default)]
pub struct StartRound {
    /// Model name.
    pub model: String,
    /// Fewest updates to complete at the deadline.
    pub min_clients: u32,
    /// Updates that complete the round at once.
    pub max_clients: u32,
    /// Seconds to the deadline.
    pub deadline_secs: u32,
    /// Why ("cli", "mqtt", "schedule", "drift").
    pub reason: String,
    /// Server loop: rounds to run back to back (0 or 1 = one).
    pub num_rounds: u32,
    /// Server loop: stop once the held-out accuracy reaches this (0 = no target).
    pub target_accuracy: f32,
}

/// Why a round operation was refused.
#[derive(thiserror::Error, Debug)]
pub enum RoundError {
    /// The model is not served.
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    /// The round does not exist.
    #[error("round {0} not found")]
    UnknownRound(u64),
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// Too few clients are available to start a round.
    #[error("{0}")]
    NotEnoughClients(String),
    /// The operation conflicts with the model's state (e.g. a round is open).
    #[error("{0}")]
    Conflict(String),
    /// Anything else.
    #[error(transparent)]
    Internal(#[from] Error),
}

impl From<StoreError> for RoundError {
    fn from(e: StoreError) -> Self {
        RoundError::Internal(Error::Store(e))
    }
}

/// An update as received (already authenticated, read in full, size and checksum verified).
#[derive(Clone, Debug)]
pub struct Upload {
    /// Uploading client.
    pub client_id: String,
    /// Model named in the header.
    pub model: String,
    /// Round named in the header.
    pub round_id: u64,
    /// Version the delta was taken against.
    pub base_version: u64,
    /// FedAvg weight.
    pub num_samples: u64,
    /// Client-reported loss.
    pub train_loss: f32,
    /// Encoded delta (`hearth_model::encode_update`).
    pub payload: Vec<u8>,
    /// Federated evaluation of the base version: held-out samples (0 = none), loss, accuracy.
    pub eval: (u64, f32, f32),
}

/// What a home aggregator's local round takes from the upstream round it mirrors.
#[derive(Clone, Debug)]
pub(crate) struct Mirror {
    /// The upstream round's id (the aggregate is uploaded to it).
    pub upstream_round: u64,
    /// The upstream round's base version (stored locally before the round opens).
    pub base_version: u64,
    /// The upstream round's deadline (what local clients are told).
    pub upstream_deadline_unix_ms: u64,
    /// When the local round closes (the upstream deadline less `upload_margin_secs`).
    pub close_unix_ms: u64,
    /// The upstream round's client task.
    pub task: TaskParams,
}

/// A round's cohort as drawn when it opens.
struct Selection {
    cohort: Vec<String>,
    available: u32,
    seed: u64,
}

/// One published version as operators see it (`hearth-coordinator versions`).
#[derive(Clone, Debug, PartialEq)]
pub struct VersionReport {
    /// The stored metadata (digest, signature, lineage, held-out accuracy).
    pub meta: VersionMeta,
    /// Updates aggregated into it (0 for the initial version and rollbacks).
    pub clients: u32,
    /// Payload bytes of those updates.
    pub uplink_bytes: u64,
    /// Bytes of this version served by `FetchModel` (whole files and coded deltas).
    pub downlink_bytes: u64,
    /// Size of its coded delta against its parent (0: none kept, agents fetch the file).
    pub delta_bytes: u64,
    /// Opening to close of the round that produced it, ms.
    pub wall_ms: u64,
    /// Clients' evaluation of this version on their held-out data (rounds based on it),
    /// weighted by samples: (accuracy, loss, samples); `None` without any.
    pub federated: Option<(f32, f32, u64)>,
}

/// FNV-1a of `s`, to mix a model name into a seed.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Outcome of [`Coordinator::accept_upload`].
#[derive(Clone, Debug, PartialEq)]
pub enum UploadOutcome {
    /// Folded into the round.
    Accepted {
        /// Updates now in the round.
        updates: u32,
    },
    /// Already counted earlier.
    Duplicate {
        /// Updates in the round.
        updates: u32,
    },
    /// Not counted.
    Refused {
        /// Why.
        reason: String,
        /// Updates in the round.
        updates: u32,
    },
}

impl Coordinator {
    /// A refused upload, logged and counted under `code` (see [`crate::metrics::Metrics::reject`]).
    fn refuse(
        &self,
        code: &'static str,
        reason: impl Into<String>,
        rec: &RoundRecord,
        client: &str,
    ) -> UploadOutcome {
        let reason = reason.into();
        self.metrics.reject(
            "upload",
            code,
            client,
            &format_args!("round {}: {reason}", rec.id),
        );
        UploadOutcome::Refused {
            reason,
            updates: rec.updates,
        }
    }

    /// Round `id`'s lock in this process: [`Store::accept_concurrency`] permits, one per
    /// accept in flight; closing the round takes them all.
    ///
    /// [`Store::accept_concurrency`]: crate::store::Store::accept_concurrency
    pub(crate) fn round_lock(&self, id: u64) -> Arc<tokio::sync::Semaphore> {
        let permits = self.store.accept_concurrency() as usize;
        self.round_locks
            .lock()
            .expect("round lock map")
            .entry(id)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(permits)))
            .clone()
    }

    pub(crate) fn drop_round_lock(&self, id: u64) {
        self.round_locks.lock().expect("round lock map").remove(&id);
    }

    /// Opens a round, or returns the round already open for the model. A home aggregator
    /// refuses: its rounds follow the upstream coordinator's ([`crate::upstream`]).
    pub async fn start_round(self: &Arc<Self>, req: StartRound) -> Result<RoundRecord, RoundError> {
        if self.upstream.is_some() && self.has_model(&req.model) {
            return Err(RoundError::Conflict(format!(
                "this is a home aggregator: rounds of {} start at the upstream coordinator",
                req.model
            )));
        }
        self.open_round(req, None).await
    }

    /// [`Coordinator::start_round`]; with `mirror`, a home aggregator's local round of an
    /// upstream round: its task, base version and deadlines come from upstream.
    pub(crate) async fn open_round(
        self: &Arc<Self>,
        req: StartRound,
        mirror: Option<Mirror>,
    ) -> Result<RoundRecord, RoundError> {
        if !self.has_model(&req.model) {
            return Err(RoundError::UnknownModel(req.model));
        }
        if let Some(open) = self
            .store
            .open_rounds()?
            .into_iter()
            .find(|r| r.model == req.model)
        {
            return Ok(open);
        }
        let d = &self.config.round;
        let min = if req.min_clients == 0 {
            d.min_clients
        } else {
            req.min_clients
        };
        let max = if req.max_clients == 0 {
            d.max_clients.max(min)
        } else {
            req.max_clients
        };
        if max < min {
            return Err(RoundError::Invalid(format!(
                "max_clients ({max}) must be >= min_clients ({min})"
            )));
        }
        if max > 100_000 {
            return Err(RoundError::Invalid("max_clients must be <= 100000".into()));
        }
        let deadline_secs = if req.deadline_secs == 0 {
            d.deadline_secs
        } else {
            req.deadline_secs
        };
        if deadline_secs > 7 * 24 * 3600 {
            return Err(RoundError::Invalid(
                "deadline_secs must be <= one week".into(),
            ));
        }
        let reason = if req.reason.is_empty() {
            "admin".to_string()
        } else {
            req.reason.clone()
        };
        if reason.len() > 64 {
            return Err(RoundError::Invalid("reason must be <= 64 bytes".into()));
        }
        let max_loop = d.max_rounds_per_refresh;
        if req.num_rounds > max_loop {
            return Err(RoundError::Invalid(format!(
                "num_rounds ({}) must be <= round.max_rounds_per_refresh ({max_loop})",
                req.num_rounds
            )));
        }
        let target = req.target_accuracy;
        if !(target.is_finite() && (0.0..=1.0).contains(&target)) {
            return Err(RoundError::Invalid(
                "target_accuracy must be in [0, 1] (0 = none)".into(),
            ));
        }
        if target > 0.0 && !self.eval_sets.contains_key(&req.model) {
            return Err(RoundError::Invalid(format!(
                "target_accuracy needs a held-out evaluation, and model {} has eval = false",
                req.model
            )));
        }
        let rounds = match (req.num_rounds, target > 0.0) {
            (0, true) => max_loop,
            (n, _) => n.max(1),
        };
        let sel = self.select_cohort(&req.model, min).await?;
        let requested_max = max;
        let max = if sel.cohort.is_empty() {
            max
        } else {
            max.min(sel.cohort.len() as u32)
        };
        let base = match &mirror {
            Some(m) => self.store.version(&req.model, m.base_version)?,
            None => self.store.latest_version(&req.model)?,
        }
        .ok_or_else(|| Error::Internal(format!("model {} has no version", req.model)))?;
        let global = self.global_weights(&req.model, base.version).await?;
        let model_fp32_bytes = 4 * hearth_model::num_params(&global) as u64;
        let agg = self.config.aggregation_for(&req.model);
        let limit = self.config.round_memory_limit();
        agg.check_round(min, max, model_fp32_bytes, limit)
            .map_err(RoundError::Invalid)?;
        let keep_updates = agg.keeps_for_round(max, model_fp32_bytes, limit);
        if agg.combine == Combine::Auto && !keep_updates {
            tracing::warn!(
                model = %req.model, max_clients = max,
                "the round's updates do not fit max_round_memory_mb: plain mean with the bounds \
                 learnt from earlier rounds, no multi-Krum"
            );
        }
        let (norm_bound, sample_cap) = self.learnt_bounds(&req.model)?;
        let now = now_unix_ms();
        let proto = RoundRecord {
            id: 0,
            model: req.model.clone(),
            state: RoundState::Open,
            base_version: base.version,
            new_version: 0,
            min_clients: min,
            max_clients: max,
            opened_unix_ms: now,
            deadline_unix_ms: mirror
                .as_ref()
                .map_or(now + u64::from(deadline_secs) * 1000, |m| m.close_unix_ms),
            upstream_round: mirror.as_ref().map_or(0, |m| m.upstream_round),
            upstream_deadline_unix_ms: mirror.as_ref().map_or(0, |m| m.upstream_deadline_unix_ms),
            task: match &mirror {
                Some(m) => m.task.clone(),
                None => TaskParams {
                    local_epochs: d.local_epochs,
                    learning_rate: d.learning_rate,
                    batch_size: d.batch_size,
                    clip_norm: d.clip_norm,
                    quant_bits: d.quant_bits,
                    topk_fraction: d.topk_fraction,
                    client: self.config.training_for(&req.model),
                    eval_fraction: d.eval_fraction,
                },
            },
            reason,
            updates: 0,
            total_samples: 0,
            uplink_bytes: 0,
            model_fp32_bytes,
            eval_accuracy: None,
            detail: String::new(),
            keep_updates,
            norm_bound,
            sample_cap,
            cohort: sel.cohort,
            available_clients: sel.available,
            selection_seed: sel.seed,
            requested_max_clients: requested_max,
            rounds_left: rounds - 1,
            target_accuracy: target,
            ..RoundRecord::default()
        };
        let (rec, created) = self.store.open_round(&proto)?;
        if created {
            self.store.flush().await?;
            tracing::info!(
                model = %rec.model, round = rec.id, base = rec.base_version,
                min = rec.min_clients, max = rec.max_clients, reason = %rec.reason,
                keep_updates = rec.keep_updates, norm_bound = rec.norm_bound,
                sample_cap = rec.sample_cap, available = rec.available_clients,
                cohort = rec.cohort.len(), rounds_left = rec.rounds_left,
                target = rec.target_accuracy, "round opened"
            );
            self.spawn_deadline(rec.id, rec.deadline_unix_ms);
            self.publish(Event::RoundOpened(rec.clone()));
        }
        Ok(rec)
    }

    /// Waits (up to `available_wait_secs`) until enough clients are available for `model` —
    /// `min_available_clients`, and with selection at least `min_clients` — then draws the
    /// cohort: `clients_per_round`, or `client_fraction` of the available clients rounded up,
    /// at least `min_clients`, sampled without replacement with a seeded generator. Without
    /// selection the cohort is empty (an open round). A refusal is logged and counted.
    async fn select_cohort(&self, model: &str, min_clients: u32) -> Result<Selection, RoundError> {
        let d = &self.config.round;
        let selecting = d.clients_per_round > 0 || d.client_fraction > 0.0;
        let need = d
            .min_available_clients
            .max(if selecting { min_clients } else { 0 });
        let wait = Duration::from_secs(u64::from(d.available_wait_secs));
        let until = tokio::time::Instant::now() + wait;
        let mut shutdown = self.shutdown.clone();
        let available = loop {
            let a = self.available_count(model)?;
            if a >= u64::from(need) {
                break a;
            }
            if tokio::time::Instant::now() >= until || *shutdown.borrow() {
                let detail = format!(
                    "only {a} of the {need} clients a round of {model} needs are available \
                     (subscribed now or in the last {} s; waited {} s): min_available_clients = \
                     {}, min_clients = {min_clients}",
                    d.available_window_secs,
                    wait.as_secs(),
                    d.min_available_clients,
                );
                self.metrics
                    .reject("start_round", "not_enough_clients", "admin", &detail);
                return Err(RoundError::NotEnoughClients(detail));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stopped(&mut shutdown) => {}
            }
        };
        let n = u32::try_from(available).unwrap_or(u32::MAX);
        if !selecting {
            return Ok(Selection {
                cohort: Vec::new(),
                available: n,
                seed: 0,
            });
        }
        let k = if d.clients_per_round > 0 {
            d.clients_per_round
        } else {
            (d.client_fraction * n as f32).ceil() as u32
        };
        let k = k.max(min_clients).min(n);
        let position = self.store.latest_round(model)?.map_or(0, |r| r.id);
        let seed = match d.selection_seed {
            Some(s) => s ^ fnv(model) ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            None => rand::rngs::OsRng.next_u64(),
        };
        // A query of the store, in memory bounded by k: never a list of every available client.
        let drawn = self
            .store
            .sample_available(model, now_unix_ms(), seed, k as usize)?;
        Ok(Selection {
            cohort: drawn.cohort,
            available: u32::try_from(drawn.available).unwrap_or(u32::MAX),
            seed,
        })
    }

    /// The adaptive bounds a new round of `model` starts with, learnt from the updates accepted
    /// in its last [`HISTORY_ROUNDS`] completed rounds: (`norm_bound_factor` × their median
    /// raw norm, `sample_cap_factor` × their median reported sample count); 0 = none (a factor
    /// of 0, or fewer than three updates to learn from).
    ///
    /// Why from earlier rounds: a round that folds updates into the running sum as they arrive
    /// must bound each one before the others are known, and a bound fixed when the round opens
    /// is the same for every client, survives a restart (it is stored in the round) and cannot
    /// be moved by anything uploaded during the round. The median over several rounds' updates
    /// is not moved by a minority of attackers. A round that keeps its updates is bounded again
    /// at close against its own median ([`robust::bound_round`]).
    fn learnt_bounds(&self, model: &str) -> Result<(f32, u64), Error> {
        let a = self.config.aggregation_for(model);
        if a.norm_bound_factor <= 0.0 && a.sample_cap_factor <= 0.0 {
            return Ok((0.0, 0));
        }
        let markers = self.store.recent_markers(model, HISTORY_ROUNDS)?;
        let mut norms: Vec<f64> = markers
            .iter()
            .map(|m| m.norm)
            .filter(|n| *n > 0.0)
            .collect();
        let mut samples: Vec<f64> = markers
            .iter()
            .map(|m| m.reported_samples.max(m.num_samples) as f64)
            .collect();
        let norm_bound = if a.norm_bound_factor > 0.0 && norms.len() >= robust::MIN_FOR_MEDIAN {
            robust::median_of(&mut norms)
                .map_or(0.0, |m| (f64::from(a.norm_bound_factor) * m) as f32)
        } else {
            0.0
        };
        let sample_cap = if a.sample_cap_factor > 0.0 && samples.len() >= robust::MIN_FOR_MEDIAN {
            robust::median_of(&mut samples).map_or(0, |m| {
                (f64::from(a.sample_cap_factor) * m).ceil().max(1.0) as u64
            })
        } else {
            0
        };
        Ok((norm_bound, sample_cap))
    }

    /// Status of round `id` of `model`, or of the model's latest round when `id` is 0.
    pub fn round_status(&self, model: &str, id: u64) -> Result<RoundRecord, RoundError> {
        let rec = if id == 0 {
            if !self.has_model(model) {
                return Err(RoundError::UnknownModel(model.to_string()));
            }
            self.store.latest_round(model)?
        } else {
            self.store.round(id)?
        };
        match rec {
            Some(r) if model.is_empty() || r.model == model => Ok(r),
            _ => Err(RoundError::UnknownRound(id)),
        }
    }

    /// Resumes every round left open by a previous run: its deadline timer is re-armed (a
    /// deadline that passed while down is handled at once) and a full round is completed.
    pub async fn resume_rounds(self: &Arc<Self>) -> Result<usize, Error> {
        let open = self.store.open_rounds()?;
        for r in &open {
            tracing::info!(
                model = %r.model, round = r.id, updates = r.updates,
                "resuming open round"
            );
            if r.updates >= r.max_clients {
                let me = self.clone();
                let id = r.id;
                self.spawn_task(async move { me.close_round(id, false).await });
            } else {
                self.spawn_deadline(r.id, r.deadline_unix_ms);
            }
        }
        Ok(open.len())
    }

    pub(crate) fn spawn_deadline(self: &Arc<Self>, id: u64, deadline_unix_ms: u64) {
        let me = self.clone();
        let mut shutdown = self.shutdown.clone();
        self.spawn_task(async move {
            let wait = Duration::from_millis(deadline_unix_ms.saturating_sub(now_unix_ms()));
            let due = tokio::select! {
                _ = tokio::time::sleep(wait) => true,
                _ = stopped(&mut shutdown) => false,
            };
            if due {
                me.close_round(id, true).await;
            }
        });
    }

    /// Validates and folds an upload.
    pub async fn accept_upload(self: &Arc<Self>, up: Upload) -> Result<UploadOutcome, RoundError> {
        let rec = self
            .store
            .round(up.round_id)?
            .ok_or(RoundError::UnknownRound(up.round_id))?;
        if rec.model != up.model {
            return Ok(self.refuse(
                "wrong_model",
                format!(
                    "round {} is for model {:?}, not {:?}",
                    rec.id, rec.model, up.model
                ),
                &rec,
                &up.client_id,
            ));
        }
        if self.store.marker(rec.id, &up.client_id)?.is_some() {
            return Ok(UploadOutcome::Duplicate {
                updates: rec.updates,
            });
        }
        if !rec.cohort.is_empty() && rec.cohort.binary_search(&up.client_id).is_err() {
            return Ok(self.refuse(
                "not_selected",
                format!(
                    "client is not in the cohort of round {} ({} of {} available clients drawn)",
                    rec.id,
                    rec.cohort.len(),
                    rec.available_clients
                ),
                &rec,
                &up.client_id,
            ));
        }
        let (eval_samples, eval_loss, eval_accuracy) = up.eval;
        if eval_samples > 0
            && !(eval_loss.is_finite() && eval_loss >= 0.0 && (0.0..=1.0).contains(&eval_accuracy))
        {
            return Ok(self.refuse(
                "invalid_eval",
                format!(
                    "federated evaluation out of range (loss {eval_loss}, accuracy {eval_accuracy})"
                ),
                &rec,
                &up.client_id,
            ));
        }
        if rec.state != RoundState::Open {
            return Ok(self.refuse(
                "round_not_open",
                format!("round {} is not open", rec.id),
                &rec,
                &up.client_id,
            ));
        }
        if up.base_version != rec.base_version {
            return Ok(self.refuse(
                "wrong_base",
                format!(
                    "update is against version {}, the round's base is {}",
                    up.base_version, rec.base_version
                ),
                &rec,
                &up.client_id,
            ));
        }
        if up.num_samples == 0 {
            return Ok(self.refuse(
                "zero_samples",
                "num_samples must be > 0",
                &rec,
                &up.client_id,
            ));
        }
        let global = self.global_weights(&rec.model, rec.base_version).await?;
        let max_norm = self.config.max_update_norm;
        let agg = self.config.aggregation_for(&rec.model);
        let keep = rec.keep_updates || agg.combine.keeps_updates();
        // The tighter of the fixed server bound and the one learnt from earlier rounds.
        let clip = [agg.clip_norm, rec.norm_bound]
            .into_iter()
            .filter(|b| *b > 0.0)
            .reduce(f32::min)
            .unwrap_or(0.0);
        let payload = Arc::new(up.payload);
        let decoded = {
            let (payload, global) = (payload.clone(), global.clone());
            blocking_task(move || {
                let mut update = hearth_model::decode_update_for(&payload, &global)
                    .map_err(|e| ("undecodable", format!("undecodable update: {e}")))?;
                let norm = validate_update(&update, &global, max_norm).map_err(|e| {
                    let code = match e {
                        AggregateError::Norm { .. } => "norm_bound",
                        _ => "invalid_update",
                    };
                    (code, format!("invalid update: {e}"))
                })?;
                let clipped = clip_update(&mut update, norm, clip);
                let kept = keep.then(|| weights_to_bytes(&update));
                Ok::<_, (&'static str, String)>((update, kept, norm, clipped))
            })
            .await?
        };
        let (update, kept, norm) = match decoded {
            Ok((u, kept, norm, clipped)) => {
                if clipped {
                    tracing::info!(
                        client = %up.client_id, round = rec.id, norm, bound = clip,
                        "update clipped to the server bound"
                    );
                }
                (Arc::new(u), kept, norm)
            }
            Err((code, reason)) => {
                return Ok(self.refuse(code, reason, &rec, &up.client_id));
            }
        };
        let cap = if rec.sample_cap > 0 {
            rec.sample_cap
        } else {
            u64::MAX
        };
        let weight_samples = up.num_samples.min(self.config.max_client_samples).min(cap);
        if weight_samples < up.num_samples {
            tracing::info!(
                client = %up.client_id, round = rec.id, reported = up.num_samples,
                weight = weight_samples, "sample count capped"
            );
        }
        let marker = UpdateMarker {
            client_id: up.client_id.clone(),
            num_samples: weight_samples,
            reported_samples: up.num_samples,
            payload_sha256: sha256_hex(&payload),
            payload_bytes: payload.len() as u64,
            train_loss: up.train_loss,
            accepted_unix_ms: now_unix_ms(),
            norm,
            // Weighted like the update: capped the same way.
            eval_samples: eval_samples.min(self.config.max_client_samples).min(cap),
            eval_loss,
            eval_accuracy,
        };
        let lock = self.round_lock(rec.id);
        let store = self.store.clone();
        let weight = weight_samples as f64;
        let outcome = {
            let _permit = lock
                .acquire()
                .await
                .map_err(|e| Error::Internal(format!("round lock: {e}")))?;
            let outcome = blocking_task(move || {
                store.accept_update(rec.id, &marker, kept.as_deref(), |prev| {
                    let mut agg = match prev {
                        Some(b) => Aggregate::from_bytes(b).map_err(|e| e.to_string())?,
                        None => Aggregate::new(&global),
                    };
                    agg.fold(&update, weight).map_err(|e| e.to_string())?;
                    Ok(agg.to_bytes())
                })
            })
            .await??;
            // Durable before the acknowledgement. Inside the permit: concurrent sled flushes
            // outside it stalled the server in bench/scale (1,000 clients).
            if matches!(outcome, AcceptOutcome::Accepted(_)) {
                self.store.flush().await?;
            }
            outcome
        };
        match outcome {
            AcceptOutcome::Accepted(now) => {
                tracing::info!(
                    client = %up.client_id, round = now.id, updates = now.updates,
                    bytes = payload.len(), "update accepted"
                );
                self.metrics.inc(
                    "hearth_coordinator_updates_accepted_total",
                    crate::metrics::labels(&[("model", &now.model)]),
                );
                if now.updates >= now.max_clients {
                    let me = self.clone();
                    let id = now.id;
                    self.spawn_task(async move { me.close_round(id, false).await });
                }
                Ok(UploadOutcome::Accepted {
                    updates: now.updates,
                })
            }
            AcceptOutcome::Duplicate(r) => Ok(UploadOutcome::Duplicate { updates: r.updates }),
            AcceptOutcome::NotOpen(r) => Ok(self.refuse(
                "round_not_open",
                format!("round {} is not open", r.id),
                &r,
                &up.client_id,
            )),
            AcceptOutcome::Full(r) => Ok(self.refuse(
                "round_full",
                format!("round {} already has {} updates", r.id, r.updates),
                &r,
                &up.client_id,
            )),
            AcceptOutcome::NotFound => Err(RoundError::UnknownRound(up.round_id)),
        }
    }

    /// Closes round `id` if it is still open: completes it when full, or at the deadline with at
    /// least `min_clients` updates; fails it at the deadline otherwise. Errors are logged.
    pub(crate) async fn close_round(self: Arc<Self>, id: u64, at_deadline: bool) {
        if let Err(e) = self.try_close_round(id, at_deadline).await {
            tracing::error!(round = id, error = %e, "closing the round failed");
        }
    }

    async fn try_close_round(self: &Arc<Self>, id: u64, at_deadline: bool) -> Result<(), Error> {
        let lock = self.round_lock(id);
        let _guard = lock
            .acquire_many(self.store.accept_concurrency())
            .await
            .map_err(|e| Error::Internal(format!("round lock: {e}")))?;
        // Instances sharing a database: the one holding this closes the round.
        let _closing = self.store.lock_round(id)?;
        let Some(rec) = self.store.round(id)? else {
            return Ok(());
        };
        if rec.state != RoundState::Open {
            return Ok(());
        }
        let full = rec.updates >= rec.max_clients;
        if !full && !at_deadline {
            return Ok(());
        }
        let mut accuracy = None;
        if !full && rec.updates < rec.min_clients {
            let detail = format!(
                "deadline passed with {} of at least {} updates",
                rec.updates, rec.min_clients
            );
            self.store.fail_round(id, &detail)?;
            self.store.flush().await?;
            tracing::warn!(model = %rec.model, round = id, %detail, "round failed");
        } else if self.upstream.is_some() {
            // A home aggregator: the round's aggregate goes upstream as one update.
            if let Err(e) = self.forward(&rec).await {
                let detail = format!("forwarding the aggregate failed: {e}");
                self.store.fail_round(id, &detail)?;
                self.store.flush().await?;
                tracing::error!(model = %rec.model, round = id, %detail, "round failed");
            }
        } else {
            match self.complete(&rec).await {
                Ok(meta) => {
                    accuracy = meta.eval_accuracy;
                    tracing::info!(
                        model = %meta.model, round = id, version = meta.version,
                        accuracy = ?meta.eval_accuracy, updates = rec.updates,
                        "round completed, version published"
                    );
                    self.metrics.inc(
                        "hearth_coordinator_versions_published_total",
                        crate::metrics::labels(&[("model", &meta.model)]),
                    );
                    self.publish(Event::Published(meta));
                }
                Err(e) => {
                    let detail = format!("aggregation failed: {e}");
                    self.store.fail_round(id, &detail)?;
                    self.store.flush().await?;
                    tracing::error!(model = %rec.model, round = id, %detail, "round failed");
                }
            }
        }
        drop(_closing);
        drop(_guard);
        self.drop_round_lock(id);
        self.continue_loop(&rec, accuracy);
        Ok(())
    }

    /// Server loop: after round `rec` closed (with held-out `accuracy` if it published),
    /// opens the next one unless the loop is done — no rounds left, or the target reached.
    /// A failed round counts as one of the loop's rounds.
    fn continue_loop(self: &Arc<Self>, rec: &RoundRecord, accuracy: Option<f32>) {
        if rec.rounds_left == 0 {
            return;
        }
        if rec.target_accuracy > 0.0 && accuracy.is_some_and(|a| a >= rec.target_accuracy) {
            tracing::info!(
                model = %rec.model, round = rec.id, accuracy = ?accuracy,
                target = rec.target_accuracy, "server loop: target accuracy reached"
            );
            return;
        }
        if *self.shutdown.borrow() {
            return;
        }
        let me = self.clone();
        let next = StartRound {
            model: rec.model.clone(),
            min_clients: rec.min_clients,
            max_clients: if rec.requested_max_clients > 0 {
                rec.requested_max_clients
            } else {
                rec.max_clients
            },
            deadline_secs: (rec.deadline_unix_ms.saturating_sub(rec.opened_unix_ms) / 1000).max(1)
                as u32,
            reason: rec.reason.clone(),
            num_rounds: rec.rounds_left,
            target_accuracy: rec.target_accuracy,
        };
        self.spawn_task(async move {
            match me.start_round(next).await {
                Ok(r) => tracing::info!(
                    model = %r.model, round = r.id, rounds_left = r.rounds_left,
                    "server loop: next round"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "server loop ended: the next round could not start")
                }
            }
        });
    }

    /// Every version of `model` with what produced it and how it did: the round's clients,
    /// bytes and wall time, the bytes served, the held-out and the federated accuracy.
    pub fn version_reports(&self, model: &str) -> Result<Vec<VersionReport>, RoundError> {
        if !self.has_model(model) {
            return Err(RoundError::UnknownModel(model.to_string()));
        }
        let rounds = self.store.rounds_of(model)?;
        let mut out = Vec::new();
        for meta in self.store.versions(model)? {
            let from = rounds
                .iter()
                .find(|r| meta.from_round != 0 && r.id == meta.from_round);
            let (mut n, mut loss, mut correct) = (0u64, 0f64, 0f64);
            for r in rounds.iter().filter(|r| r.base_version == meta.version) {
                n += r.fed_eval_samples;
                loss += r.fed_eval_loss_sum;
                correct += r.fed_eval_correct;
            }
            let federated = (n > 0).then(|| {
                let d = n as f64;
                ((correct / d) as f32, (loss / d) as f32, n)
            });
            out.push(VersionReport {
                clients: from.map_or(0, |r| r.updates),
                uplink_bytes: from.map_or(0, |r| r.uplink_bytes),
                wall_ms: from.map_or(0, |r| r.closed_unix_ms.saturating_sub(r.opened_unix_ms)),
                downlink_bytes: self.store.downlink(model, meta.version)?,
                delta_bytes: self
                    .store
                    .delta(model, meta.version)?
                    .map_or(0, |d| d.payload.len() as u64),
                federated,
                meta,
            });
        }
        Ok(out)
    }

    /// Republishes version `version` of `model` as a new version: the next number, the old
    /// content (same digest and held-out accuracy), the latest version as parent, signed and
    /// announced like any version, so agents load it through the same checks. The model's
    /// server optimizer state is reset. Refused while a round of the model is open.
    pub async fn rollback(
        self: &Arc<Self>,
        model: &str,
        version: u64,
    ) -> Result<VersionMeta, RoundError> {
        if !self.has_model(model) {
            return Err(RoundError::UnknownModel(model.to_string()));
        }
        if let Some(r) = self
            .store
            .open_rounds()?
            .into_iter()
            .find(|r| r.model == model)
        {
            return Err(RoundError::Conflict(format!(
                "round {} of {model} is open: wait for it to close before rolling back",
                r.id
            )));
        }
        let latest = self
            .store
            .latest_version(model)?
            .ok_or_else(|| Error::Internal(format!("model {model} has no version")))?;
        let old = self.store.version(model, version)?.ok_or_else(|| {
            RoundError::Invalid(format!("model {model} has no version {version}"))
        })?;
        if version == latest.version {
            return Err(RoundError::Invalid(format!(
                "version {version} is already the latest of {model}"
            )));
        }
        let bytes = self
            .store
            .model_bytes(model, version)?
            .ok_or_else(|| Error::Internal(format!("bytes of {model} v{version} missing")))?;
        let mut meta = VersionMeta {
            model: model.to_string(),
            version: latest.version + 1,
            sha256: old.sha256.clone(),
            size_bytes: old.size_bytes,
            eval_accuracy: old.eval_accuracy,
            created_unix_ms: now_unix_ms(),
            from_round: 0,
            parent_version: latest.version,
            signature: String::new(),
            rollback_of: version,
        };
        crate::signing::sign(&self.signer, &mut meta)?;
        self.store.put_rollback(&meta, &bytes)?;
        self.store.flush().await?;
        tracing::warn!(
            model,
            version = meta.version,
            content_of = version,
            parent = latest.version,
            "rollback published"
        );
        self.metrics.inc(
            "hearth_coordinator_versions_published_total",
            crate::metrics::labels(&[("model", model)]),
        );
        self.publish(Event::Published(meta.clone()));
        Ok(meta)
    }

    /// The round's pseudo-gradient Δ and how it was combined: the weighted mean of its
    /// running sums (one per instance that accepted updates), or the robust combination of
    /// its kept updates, bounded again against the round's own medians. The one combination
    /// a coordinator's round and a home aggregator's round both use.
    pub(crate) async fn round_delta(&self, rec: &RoundRecord) -> Result<(Weights, String), Error> {
        let sums = self.store.round_sums(rec.id)?;
        if sums.is_empty() {
            return Err(Error::Internal(format!(
                "round {} has no running sum",
                rec.id
            )));
        }
        let a = self.config.aggregation_for(&rec.model).clone();
        let keeps = rec.keep_updates || a.combine.keeps_updates();
        let kept = if keeps {
            self.store.kept_updates(rec.id)?
        } else {
            Vec::new()
        };
        let name = rec.model.clone();
        let updates = rec.updates as usize;
        let internal = |e: crate::aggregate::AggregateError| Error::Internal(e.to_string());
        blocking_task(move || -> Result<(Weights, String), Error> {
            if keeps && kept.len() == updates {
                let norms: Vec<f64> = kept.iter().map(|(m, _)| m.norm).collect();
                let mut ups = kept
                    .into_iter()
                    .map(|(m, b)| weights_from_bytes(&b).map(|w| (w, m.num_samples as f64)))
                    .collect::<Result<Vec<Weighted>, _>>()
                    .map_err(internal)?;
                let bounded = robust::bound_round(&a, &mut ups, &norms);
                let (delta, how) = robust::combine(&a, &ups).map_err(internal)?;
                if bounded.is_empty() {
                    Ok((delta, how))
                } else {
                    Ok((delta, format!("{how} ({bounded})")))
                }
            } else {
                if keeps {
                    tracing::warn!(
                        model = %name, kept = kept.len(), updates,
                        "not every update was kept (the config changed mid-round?): using the mean"
                    );
                }
                let mut agg = Aggregate::from_bytes(&sums[0]).map_err(internal)?;
                for s in &sums[1..] {
                    agg.merge(&Aggregate::from_bytes(s).map_err(internal)?)
                        .map_err(internal)?;
                }
                Ok((
                    agg.finish().map_err(internal)?,
                    format!("mean of {updates}"),
                ))
            }
        })
        .await?
    }

    /// FedAvg server step: new = global + lr · Σnᵢ·Δᵢ/Σnᵢ, written into the base ONNX file,
    /// evaluated, stored as the next version together with the round's completion.
    async fn complete(self: &Arc<Self>, rec: &RoundRecord) -> Result<VersionMeta, Error> {
        let (delta, how) = self.round_delta(rec).await?;
        let base = self
            .store
            .model_bytes(&rec.model, rec.base_version)?
            .ok_or_else(|| Error::Internal(format!("base version {} missing", rec.base_version)))?;
        let a = self.config.aggregation_for(&rec.model).clone();
        let lr = a
            .server_learning_rate
            .unwrap_or(self.config.server_learning_rate);
        let state = self.store.server_state(&rec.model)?;
        let eval = self.eval_sets.get(&rec.model).cloned();
        let name = rec.model.clone();
        // The version this one succeeds (rounds of a model run one at a time: its base).
        let parent = self
            .store
            .latest_version(&rec.model)?
            .map_or(0, |v| v.version);
        // Compressed downlink: the new version is coded as a delta against the parent, with
        // the residual the parent's delta left (none after an initial version or a rollback).
        let downlink = self.config.downlink;
        let coded = if downlink.bits != 0 && parent > 0 {
            let parent_bytes = self.store.model_bytes(&rec.model, parent)?;
            let residual = self
                .store
                .delta(&rec.model, parent)?
                .map(|d| d.residual)
                .unwrap_or_default();
            parent_bytes.map(|b| (b, residual))
        } else {
            None
        };
        let seed = rec.id ^ fnv(&rec.model);
        let internal = |e: crate::aggregate::AggregateError| Error::Internal(e.to_string());
        let (bytes, acc, state, how, delta_rec) = blocking_task(move || {
            let mut model = OnnxModel::from_bytes(&base)?;
            let mut w = model.weights();
            let previous = match state.as_deref().map(ServerState::from_bytes) {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(model = %name, error = %e, "unreadable server optimizer state: starting from zero");
                    ServerState::default()
                }
                None => ServerState::default(),
            };
            let next = optimizer::step(&a, lr, &mut w, &delta, previous).map_err(internal)?;
            // What is published: the exact target, or (compressed downlink) the model agents
            // rebuild from the parent and the coded delta — the same function on both sides.
            let mut delta_rec = None;
            if let Some((parent_bytes, residual)) = coded {
                let cfg = CodecConfig {
                    bits: downlink.bits as u8,
                    topk_fraction: downlink.topk_fraction,
                    entropy: true,
                    compact: true,
                };
                let mut residual = if residual.is_empty() {
                    Weights::new()
                } else {
                    weights_from_bytes(&residual).unwrap_or_else(|e| {
                        tracing::warn!(model = %name, error = %e, "unreadable downlink residual: dropped");
                        Weights::new()
                    })
                };
                let coded = OnnxModel::from_bytes(&parent_bytes).and_then(|p| {
                    hearth_model::downlink::code(&p, &w, &mut residual, &cfg, seed)
                });
                match coded {
                    Ok((payload, published)) => {
                        model = published;
                        delta_rec = Some(DeltaRecord {
                            base: parent,
                            payload,
                            residual: weights_to_bytes(&residual),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(model = %name, error = %e, "cannot code the new version as a delta: publishing the whole model");
                        model.set_weights(&w)?;
                    }
                }
            } else {
                model.set_weights(&w)?;
            }
            let acc = eval.and_then(|ds| evaluate(&name, &model, &ds));
            let how = format!("{:?} (η = {lr}) over the {how} updates", a.optimizer);
            Ok::<_, Error>((model.to_bytes(), acc, next.to_bytes(), how, delta_rec))
        })
        .await??;
        let version = parent + 1;
        let mut meta = VersionMeta {
            model: rec.model.clone(),
            version,
            sha256: sha256_hex(&bytes),
            size_bytes: bytes.len() as u64,
            eval_accuracy: acc,
            created_unix_ms: now_unix_ms(),
            from_round: rec.id,
            parent_version: parent,
            signature: String::new(),
            ..VersionMeta::default()
        };
        crate::signing::sign(&self.signer, &mut meta)?;
        let detail = format!("{how} ({} samples)", rec.total_samples);
        self.store
            .complete_round(rec.id, &meta, &bytes, Some(&state), &detail)?;
        if let Some(d) = delta_rec {
            // After the version: without it (a crash here) agents fetch the whole file.
            if let Err(e) = self.store.put_delta(&rec.model, version, &d) {
                tracing::warn!(model = %rec.model, version, error = %e, "cannot keep the downlink delta");
            }
        }
        self.store.flush().await?;
        Ok(meta)
    }
}
