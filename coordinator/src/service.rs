//! tonic implementations of `hearth.v1` Enrollment, Federation and Admin. This is the only place
//! that sees wire types and `tonic::Status`: requests are authenticated and converted to domain
//! calls on [`Coordinator`], results converted back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hearth_proto::v1::{
    self, admin_server::Admin, enrollment_server::Enrollment, federation_event,
    federation_server::Federation, update_chunk, FederationEvent,
};
use hearth_proto::{CHUNK_SIZE, CLIENT_ID_HEADER, CLIENT_KEY_HEADER};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::ClientOptimizer;
use crate::ratelimit::RateLimiter;
use crate::rounds::{RoundError, StartRound, Upload, UploadOutcome, VersionReport};
use crate::state::{sha256_hex, stopped, AuthError, Coordinator, EnrollError, Event};
use crate::store::{RoundRecord, RoundState, VersionMeta};

/// The gRPC services over one [`Coordinator`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Services {
    coord: Arc<Coordinator>,
    limiter: Arc<RateLimiter>,
}

impl Services {
    /// Services over `coord`.
    pub fn new(coord: Arc<Coordinator>) -> Self {
        let limiter = Arc::new(RateLimiter::new(&coord.config().rate_limit));
        Services { coord, limiter }
    }

    /// Charges one call to a rate-limit bucket: the client's when it authenticated, else the
    /// peer address's (failed guesses are limited too, and nobody drains a client's bucket by
    /// sending its id with a wrong key). Over the limit: `ResourceExhausted`, counted.
    fn limit<T>(
        &self,
        req: &Request<T>,
        call: &'static str,
        client: Option<&str>,
    ) -> Result<(), Status> {
        let key = match client {
            Some(id) => format!("client:{id}"),
            None => format!(
                "peer:{}",
                req.remote_addr()
                    .map_or("unknown".into(), |a| a.ip().to_string())
            ),
        };
        self.limiter.check(&key).map_err(|wait| {
            let rl = &self.coord.config().rate_limit;
            let detail = format!(
                "over {} calls a minute (burst {}); retry in {:.1} s",
                rl.calls_per_minute,
                rl.burst,
                wait.as_secs_f64()
            );
            self.coord
                .metrics()
                .reject(call, "rate_limited", &key, &detail);
            Status::resource_exhausted(detail)
        })
    }

    /// [`Services::client`], rate limited (by client id, or by peer address when it fails)
    /// and a failure counted.
    fn limited_client<T>(&self, req: &Request<T>, call: &'static str) -> Result<String, Status> {
        // `client` logs and counts a refusal itself.
        match self.client(call, req) {
            Ok(id) => self.limit(req, call, Some(&id)).map(|()| id),
            Err(e) => {
                self.limit(req, call, None)?;
                Err(e)
            }
        }
    }

    /// The calling client's id: from its certificate with TLS (identity = the certificate's
    /// CN, which must be the certificate issued to an enrolled, unrevoked client), from the
    /// shared-key metadata in insecure mode. Refusals are logged and counted.
    fn client<T>(&self, call: &'static str, req: &Request<T>) -> Result<String, Status> {
        let r = if self.coord.pki().is_some() {
            let certs = req.peer_certs();
            let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| &c[..]);
            self.coord.authenticate_cert(leaf)
        } else {
            let md = req.metadata();
            let id = md.get(CLIENT_ID_HEADER).and_then(|v| v.to_str().ok());
            let key = md.get(CLIENT_KEY_HEADER).and_then(|v| v.to_str().ok());
            self.coord.authenticate_client(id, key)
        };
        r.map(|c| c.client_id)
            .map_err(|e| self.auth_refused(call, "", e))
    }

    /// The admin credential check. A refused attempt also spends a token of the peer's
    /// rate-limit bucket (by address, as failed client logins do), so the admin token cannot
    /// be guessed faster than `rate_limit` allows: past the burst, ResourceExhausted.
    fn admin<T>(&self, call: &'static str, req: &Request<T>) -> Result<(), Status> {
        let v = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.coord.authenticate_admin(v).map_err(|e| {
            let refused = self.auth_refused(call, "admin", e);
            match self.limit(req, call, None) {
                Ok(()) => refused,
                Err(limited) => limited,
            }
        })
    }

    /// Counts and logs a refused call; revoked clients get PermissionDenied, the rest
    /// Unauthenticated.
    fn auth_refused(&self, call: &'static str, who: &str, e: AuthError) -> Status {
        let who = match &e {
            AuthError::NotEnrolled(id) | AuthError::Revoked(id) => id.as_str(),
            _ => who,
        };
        self.coord.metrics().reject(call, e.reason(), who, &e);
        match e {
            AuthError::Revoked(_) => Status::permission_denied(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

/// Resolves when `client` (if any) has been revoked; pending forever otherwise.
async fn revoked(coord: &Coordinator, client: Option<&str>, rx: &mut watch::Receiver<u64>) {
    let Some(client) = client else {
        return std::future::pending().await;
    };
    loop {
        if coord.is_revoked(client) {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Ends `call`'s open stream of a revoked client: counted, logged, PermissionDenied.
fn revoked_status(coord: &Coordinator, call: &'static str, client: Option<&str>) -> Status {
    let e = AuthError::Revoked(client.unwrap_or_default().to_string());
    coord
        .metrics()
        .reject(call, e.reason(), client.unwrap_or_default(), &e);
    Status::permission_denied(e.to_string())
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

fn round_status(e: RoundError) -> Status {
    match e {
        RoundError::UnknownModel(_) | RoundError::UnknownRound(_) => {
            Status::not_found(e.to_string())
        }
        RoundError::Invalid(m) => Status::invalid_argument(m),
        RoundError::NotEnoughClients(m) | RoundError::Conflict(m) => Status::failed_precondition(m),
        RoundError::Internal(e) => internal(e),
    }
}

// ---------------------------------------------------------------- wire conversions

fn wire_state(s: RoundState) -> v1::RoundState {
    match s {
        RoundState::Open => v1::RoundState::Open,
        RoundState::Completed => v1::RoundState::Completed,
        RoundState::Failed => v1::RoundState::Failed,
    }
}

fn wire_status(r: &RoundRecord) -> v1::RoundStatus {
    v1::RoundStatus {
        model: r.model.clone(),
        round_id: r.id,
        state: wire_state(r.state) as i32,
        base_version: r.base_version,
        new_version: r.new_version,
        updates: r.updates,
        min_clients: r.min_clients,
        max_clients: r.max_clients,
        uplink_bytes: r.uplink_bytes,
        model_fp32_bytes: r.model_fp32_bytes,
        eval_accuracy: r.eval_accuracy.unwrap_or(-1.0),
        detail: r.detail.clone(),
        cohort_size: r.cohort.len() as u32,
        available_clients: r.available_clients,
        rounds_left: r.rounds_left,
        target_accuracy: r.target_accuracy,
        federated_accuracy: if r.fed_eval_samples > 0 {
            (r.fed_eval_correct / r.fed_eval_samples as f64) as f32
        } else {
            -1.0
        },
        federated_loss: if r.fed_eval_samples > 0 {
            (r.fed_eval_loss_sum / r.fed_eval_samples as f64) as f32
        } else {
            -1.0
        },
        federated_samples: r.fed_eval_samples,
    }
}

/// The round task as `client` sees it (`None`: the hub, which follows announcements):
/// `not_selected` when the round has a cohort without it.
fn wire_task(r: &RoundRecord, client: Option<&str>) -> v1::RoundTask {
    let not_selected = !r.cohort.is_empty()
        && client.is_some_and(|c| r.cohort.binary_search_by(|x| x.as_str().cmp(c)).is_err());
    let t = &r.task;
    v1::RoundTask {
        not_selected,
        client_optimizer: match t.client.optimizer {
            ClientOptimizer::Sgd => v1::ClientOptimizer::Sgd,
            ClientOptimizer::Momentum => v1::ClientOptimizer::Momentum,
        } as i32,
        client_momentum: t.client.momentum,
        proximal_mu: t.client.proximal_mu,
        eval_fraction: t.eval_fraction,
        model: r.model.clone(),
        round_id: r.id,
        base_version: r.base_version,
        local_epochs: r.task.local_epochs,
        learning_rate: r.task.learning_rate,
        batch_size: r.task.batch_size,
        // A home aggregator's round closes before the upstream deadline, which is the one
        // its clients wait for to learn the round's outcome (the next upstream version).
        deadline_unix_ms: r.deadline_unix_ms.max(r.upstream_deadline_unix_ms),
        clip_norm: r.task.clip_norm,
        quant_bits: r.task.quant_bits,
        topk_fraction: r.task.topk_fraction,
    }
}

fn wire_published(v: &VersionMeta) -> v1::ModelPublished {
    v1::ModelPublished {
        model: v.model.clone(),
        version: v.version,
        sha256: v.sha256.clone(),
        size_bytes: v.size_bytes,
        parent_version: v.parent_version,
        signature: hex::decode(&v.signature).unwrap_or_default(),
    }
}

fn wire_report(r: &VersionReport) -> v1::ModelVersion {
    let (fa, fl, fs) = r.federated.unwrap_or((-1.0, -1.0, 0));
    v1::ModelVersion {
        round_clients: r.clients,
        uplink_bytes: r.uplink_bytes,
        downlink_bytes: r.downlink_bytes,
        delta_bytes: r.delta_bytes,
        round_wall_ms: r.wall_ms,
        federated_accuracy: fa,
        federated_loss: fl,
        federated_samples: fs,
        ..wire_version(&r.meta)
    }
}

fn wire_version(v: &VersionMeta) -> v1::ModelVersion {
    v1::ModelVersion {
        rollback_of: v.rollback_of,
        version: v.version,
        sha256: v.sha256.clone(),
        size_bytes: v.size_bytes,
        eval_accuracy: v.eval_accuracy.unwrap_or(-1.0),
        created_unix_ms: v.created_unix_ms,
        from_round: v.from_round,
        parent_version: v.parent_version,
        signature: hex::decode(&v.signature).unwrap_or_default(),
        ..v1::ModelVersion::default()
    }
}

// ---------------------------------------------------------------- enrollment

#[tonic::async_trait]
impl Enrollment for Services {
    async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        self.limit(&req, "enroll", None)?;
        let r = req.into_inner();
        match self.coord.enroll(&r.token, &r.device_name, &r.csr_pem) {
            Ok(e) => Ok(Response::new(v1::EnrollResponse {
                client_id: e.client_id,
                client_key: e.client_key,
                client_cert_pem: e.cert_pem,
                ca_cert_pem: e.ca_pem,
                model_signing_key: self.coord.model_signing_key().to_vec(),
            })),
            Err(EnrollError::Store(e)) => Err(internal(e)),
            Err(e) => {
                self.coord
                    .metrics()
                    .reject("enroll", e.reason(), &r.device_name, &e);
                Err(match e {
                    EnrollError::DeviceName | EnrollError::Csr(_) => {
                        Status::invalid_argument(e.to_string())
                    }
                    _ => Status::permission_denied(e.to_string()),
                })
            }
        }
    }
}

// ---------------------------------------------------------------- federation

/// Sends `item` unless the client went away or the server is shutting down.
async fn send<T>(
    tx: &mpsc::Sender<Result<T, Status>>,
    item: T,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = tx.send(Ok(item)) => r.is_ok(),
        _ = stopped(stop) => false,
    }
}

/// Per-subscription filter that also drops events the client has already been sent.
struct Subscription {
    /// The subscribed client (`None`: the hub with the admin credential).
    client: Option<String>,
    models: BTreeSet<String>,
    versions: HashMap<String, u64>,
    rounds: HashMap<String, u64>,
}

impl Subscription {
    fn wire(&mut self, e: &Event) -> Option<FederationEvent> {
        let ev = match e {
            Event::Published(v) => {
                let last = self.versions.get(&v.model).copied().unwrap_or(0);
                if !self.models.contains(&v.model) || v.version <= last {
                    return None;
                }
                self.versions.insert(v.model.clone(), v.version);
                federation_event::Event::Published(wire_published(v))
            }
            Event::RoundOpened(r) => {
                let last = self.rounds.get(&r.model).copied().unwrap_or(0);
                if !self.models.contains(&r.model) || r.id <= last {
                    return None;
                }
                self.rounds.insert(r.model.clone(), r.id);
                federation_event::Event::Round(wire_task(r, self.client.as_deref()))
            }
        };
        Some(FederationEvent { event: Some(ev) })
    }

    /// Current versions, then open rounds, from the store.
    fn snapshot(&self, coord: &Coordinator) -> Result<Vec<Event>, Status> {
        let mut out = Vec::new();
        for m in &self.models {
            if let Some(v) = coord.store().latest_version(m).map_err(internal)? {
                out.push(Event::Published(v));
            }
        }
        for r in coord.store().open_rounds().map_err(internal)? {
            out.push(Event::RoundOpened(r));
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Federation for Services {
    type SubscribeStream = ReceiverStream<Result<FederationEvent, Status>>;
    type FetchModelStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<v1::ModelChunk, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // The hub follows announcements with the admin credential; agents with their own.
        let client = if req.metadata().contains_key("authorization") {
            self.admin("subscribe", &req)?;
            None
        } else {
            Some(self.limited_client(&req, "subscribe")?)
        };
        let wanted = req.into_inner().models;
        let models: BTreeSet<String> = if wanted.is_empty() {
            self.coord.model_names().into_iter().collect()
        } else {
            if let Some(m) = wanted.iter().find(|m| !self.coord.has_model(m)) {
                return Err(Status::not_found(format!("unknown model {m:?}")));
            }
            wanted.into_iter().collect()
        };
        let presence = client.as_deref().map(|c| {
            self.coord
                .subscribed(c, &models.iter().cloned().collect::<Vec<_>>())
        });
        let mut sub = Subscription {
            client: client.clone(),
            models,
            versions: HashMap::new(),
            rounds: HashMap::new(),
        };
        // Subscribe to live events before reading the snapshot so nothing falls in between.
        let mut live = self.coord.subscribe_events();
        let first = sub.snapshot(&self.coord)?;
        let (tx, rx) = mpsc::channel(64);
        let coord = self.coord.clone();
        let mut stop = coord.shutdown_signal();
        let mut revocations = coord.revocations();
        self.coord.spawn_task(async move {
            // The client is available for its models while this task runs.
            let _presence = presence;
            let client = client.as_deref();
            for e in &first {
                if let Some(w) = sub.wire(e) {
                    if !send(&tx, w, &mut stop).await {
                        return;
                    }
                }
            }
            // Runs as long as the client listens; ends on disconnect or shutdown.
            loop {
                let e = tokio::select! {
                    e = live.recv() => e,
                    _ = tx.closed() => return,
                    _ = stopped(&mut stop) => return,
                    _ = revoked(&coord, client, &mut revocations) => {
                        let _ = tx.try_send(Err(revoked_status(&coord, "subscribe", client)));
                        return;
                    }
                };
                let batch = match e {
                    Ok(e) => vec![e],
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "subscriber lagged; resending current state");
                        match sub.snapshot(&coord) {
                            Ok(s) => s,
                            Err(status) => {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                for e in &batch {
                    if let Some(w) = sub.wire(e) {
                        if !send(&tx, w, &mut stop).await {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_model(
        &self,
        req: Request<v1::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let client = self.limited_client(&req, "fetch")?;
        let r = req.into_inner();
        if !self.coord.has_model(&r.model) {
            return Err(Status::not_found(format!("unknown model {:?}", r.model)));
        }
        let store = self.coord.store();
        let meta = if r.version == 0 {
            store.latest_version(&r.model).map_err(internal)?
        } else {
            store.version(&r.model, r.version).map_err(internal)?
        }
        .ok_or_else(|| {
            Status::not_found(format!("model {} has no version {}", r.model, r.version))
        })?;
        // Compressed downlink: a client holding the signed parent gets the coded delta
        // (it rebuilds the file and checks it against the signed digest); anyone else, or
        // when no delta was kept, the whole file.
        let delta = if r.have_version != 0 && r.have_version == meta.parent_version {
            store
                .delta(&meta.model, meta.version)
                .map_err(internal)?
                .filter(|d| d.base == r.have_version)
        } else {
            None
        };
        let (bytes, delta_base): (Vec<u8>, u64) = match delta {
            Some(d) => (d.payload, d.base),
            None => (
                store
                    .model_bytes(&meta.model, meta.version)
                    .map_err(internal)?
                    .ok_or_else(|| {
                        internal(format!("bytes of {} v{} missing", meta.model, meta.version))
                    })?
                    .to_vec(),
                0,
            ),
        };
        let total = bytes.len() as u64;
        if r.offset > total {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end ({total} bytes)",
                r.offset
            )));
        }
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.coord.config().fetch_timeout_secs);
        let (tx, rx) = mpsc::channel(4);
        // How a cut stream ends: after the chunks already queued, with this status (a full
        // queue cannot take it, and an end without it would look like a complete download).
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<Status>();
        let mut stop = self.coord.shutdown_signal();
        let signature = hex::decode(&meta.signature).unwrap_or_default();
        let metrics = self.coord.metrics().clone();
        let mut revocations = self.coord.revocations();
        let coord = self.coord.clone();
        tokio::spawn(async move {
            let mut offset = r.offset as usize;
            // At least one chunk (empty when resuming at the very end) so the client learns
            // the size and checksum.
            loop {
                let end = (offset + CHUNK_SIZE).min(bytes.len());
                let chunk = v1::ModelChunk {
                    model: meta.model.clone(),
                    version: meta.version,
                    total_size: total,
                    sha256: meta.sha256.clone(),
                    offset: offset as u64,
                    data: bytes[offset..end].to_vec(),
                    parent_version: meta.parent_version,
                    signature: signature.clone(),
                    delta_base,
                };
                let sent = tokio::select! {
                    s = tokio::time::timeout_at(deadline, send(&tx, chunk, &mut stop)) => s,
                    _ = revoked(&coord, Some(client.as_str()), &mut revocations) => {
                        let _ = end_tx.send(revoked_status(&coord, "fetch_model", Some(client.as_str())));
                        return;
                    }
                };
                match sent {
                    Ok(true) => {
                        if let Err(e) = coord.store().add_downlink(
                            &meta.model,
                            meta.version,
                            (end - offset) as u64,
                        ) {
                            tracing::warn!(error = %e, "cannot count downlink bytes");
                        }
                    }
                    Ok(false) => return,
                    Err(_) => {
                        metrics.reject("fetch", "timeout", &client, &"fetch stream too slow");
                        let _ = end_tx.send(Status::deadline_exceeded("fetch took too long"));
                        return;
                    }
                }
                offset = end;
                if offset >= bytes.len() {
                    return;
                }
            }
        });
        let end = futures_util::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).chain(end))))
    }

    async fn upload_update(
        &self,
        req: Request<Streaming<v1::UpdateChunk>>,
    ) -> Result<Response<v1::UploadAck>, Status> {
        let client_id = self.limited_client(&req, "upload")?;
        let max = self.coord.config().max_update_bytes;
        // `upload_timeout_secs` bounds the whole call (`limits::CallTimeoutLayer`).
        let (header, payload) = read_upload(req.into_inner(), max).await?;
        let up = Upload {
            client_id,
            model: header.model,
            round_id: header.round_id,
            base_version: header.base_version,
            num_samples: header.num_samples,
            train_loss: header.train_loss,
            payload,
            eval: (header.eval_samples, header.eval_loss, header.eval_accuracy),
        };
        let outcome = self.coord.accept_upload(up).await.map_err(round_status)?;
        let ack = match outcome {
            UploadOutcome::Accepted { updates } => v1::UploadAck {
                accepted: true,
                duplicate: false,
                reason: String::new(),
                updates_in_round: updates,
            },
            UploadOutcome::Duplicate { updates } => v1::UploadAck {
                accepted: true,
                duplicate: true,
                reason: "already received for this round".into(),
                updates_in_round: updates,
            },
            UploadOutcome::Refused { reason, updates } => v1::UploadAck {
                accepted: false,
                duplicate: false,
                reason,
                updates_in_round: updates,
            },
        };
        Ok(Response::new(ack))
    }
}

/// Reads the header and the payload, enforcing the declared size, the size limit and the checksum.
async fn read_upload(
    mut stream: Streaming<v1::UpdateChunk>,
    max_bytes: u64,
) -> Result<(v1::UpdateHeader, Vec<u8>), Status> {
    let header = match stream.message().await? {
        Some(v1::UpdateChunk {
            part: Some(update_chunk::Part::Header(h)),
        }) => h,
        Some(_) => {
            return Err(Status::invalid_argument(
                "the first message must be the header",
            ))
        }
        None => return Err(Status::invalid_argument("empty upload")),
    };
    if header.payload_size == 0 {
        return Err(Status::invalid_argument("payload_size must be > 0"));
    }
    if header.payload_size > max_bytes {
        return Err(Status::resource_exhausted(format!(
            "payload of {} bytes exceeds the limit of {max_bytes}",
            header.payload_size
        )));
    }
    let mut payload = Vec::with_capacity(header.payload_size as usize);
    // Every useful message carries at least one byte; allow a few empty ones.
    let max_messages = header.payload_size + 16;
    for _ in 0..max_messages {
        match stream.message().await? {
            None => break,
            Some(v1::UpdateChunk {
                part: Some(update_chunk::Part::Data(d)),
            }) => {
                if payload.len() as u64 + d.len() as u64 > header.payload_size {
                    return Err(Status::invalid_argument(format!(
                        "payload is larger than the declared {} bytes",
                        header.payload_size
                    )));
                }
                payload.extend_from_slice(&d);
            }
            Some(_) => {
                return Err(Status::invalid_argument(
                    "only data chunks may follow the header",
                ))
            }
        }
    }
    if payload.len() as u64 != header.payload_size {
        return Err(Status::invalid_argument(format!(
            "received {} payload bytes, header declared {}",
            payload.len(),
            header.payload_size
        )));
    }
    if !sha256_hex(&payload).eq_ignore_ascii_case(&header.payload_sha256) {
        return Err(Status::invalid_argument(
            "payload sha256 does not match the header",
        ));
    }
    Ok((header, payload))
}

// ---------------------------------------------------------------- admin

#[tonic::async_trait]
impl Admin for Services {
    async fn start_round(
        &self,
        req: Request<v1::StartRoundRequest>,
    ) -> Result<Response<v1::RoundStatus>, Status> {
        self.admin("start_round", &req)?;
        let r = req.into_inner();
        let rec = self
            .coord
            .start_round(StartRound {
                model: r.model,
                min_clients: r.min_clients,
                max_clients: r.max_clients,
                deadline_secs: r.deadline_secs,
                reason: r.reason,
                num_rounds: r.num_rounds,
                target_accuracy: r.target_accuracy,
            })
            .await
            .map_err(round_status)?;
        Ok(Response::new(wire_status(&rec)))
    }

    async fn get_round_status(
        &self,
        req: Request<v1::RoundStatusRequest>,
    ) -> Result<Response<v1::RoundStatus>, Status> {
        self.admin("round_status", &req)?;
        let r = req.into_inner();
        let rec = self
            .coord
            .round_status(&r.model, r.round_id)
            .map_err(round_status)?;
        Ok(Response::new(wire_status(&rec)))
    }

    async fn list_versions(
        &self,
        req: Request<v1::ListVersionsRequest>,
    ) -> Result<Response<v1::ListVersionsResponse>, Status> {
        self.admin("list_versions", &req)?;
        let model = req.into_inner().model;
        if !self.coord.has_model(&model) {
            return Err(Status::not_found(format!("unknown model {model:?}")));
        }
        let versions = self.coord.version_reports(&model).map_err(round_status)?;
        Ok(Response::new(v1::ListVersionsResponse {
            model,
            versions: versions.iter().map(wire_report).collect(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::ModelVersion>, Status> {
        self.admin("rollback", &req)?;
        let r = req.into_inner();
        let meta = self
            .coord
            .rollback(&r.model, r.version)
            .await
            .map_err(round_status)?;
        Ok(Response::new(wire_version(&meta)))
    }

    async fn create_enrollment_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        self.admin("create_token", &req)?;
        let r = req.into_inner();
        if !r.device_name.is_empty()
            && (r.device_name.chars().count() > 128 || r.device_name.chars().any(char::is_control))
        {
            return Err(Status::invalid_argument(
                "device_name must be 1-128 printable characters",
            ));
        }
        let ttl = (r.ttl_secs > 0).then_some(Duration::from_secs(r.ttl_secs));
        let t = self
            .coord
            .create_token(r.uses, &r.device_name, ttl)
            .map_err(internal)?;
        Ok(Response::new(v1::CreateTokenResponse {
            token: t.token,
            expires_unix_ms: t.expires_unix_ms,
            ca_sha256: self
                .coord
                .pki()
                .map(|p| p.ca_sha256().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn revoke_device(
        &self,
        req: Request<v1::RevokeDeviceRequest>,
    ) -> Result<Response<v1::RevokeDeviceResponse>, Status> {
        self.admin("revoke", &req)?;
        let device = req.into_inner().device;
        if device.is_empty() {
            return Err(Status::invalid_argument(
                "device must be a device name or client id",
            ));
        }
        let client_ids = self.coord.revoke(&device).map_err(internal)?;
        if client_ids.is_empty() {
            return Err(Status::not_found(format!(
                "no client is enrolled as {device:?}"
            )));
        }
        Ok(Response::new(v1::RevokeDeviceResponse { client_ids }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(model: &str, v: u64) -> Event {
        Event::Published(VersionMeta {
            model: model.into(),
            version: v,
            sha256: "h".into(),
            size_bytes: 1,
            eval_accuracy: None,
            created_unix_ms: 0,
            from_round: 0,
            parent_version: v - 1,
            signature: String::new(),
            ..VersionMeta::default()
        })
    }

    #[test]
    fn subscription_filters_models_and_drops_what_was_sent() {
        let mut sub = Subscription {
            client: None,
            models: ["a".to_string()].into_iter().collect(),
            versions: HashMap::new(),
            rounds: HashMap::new(),
        };
        assert!(sub.wire(&version("a", 1)).is_some());
        // A resync after Lagged resends the snapshot: nothing old goes out twice.
        assert!(sub.wire(&version("a", 1)).is_none());
        assert!(sub.wire(&version("b", 1)).is_none());
        match sub.wire(&version("a", 2)).and_then(|e| e.event) {
            Some(federation_event::Event::Published(p)) => assert_eq!(p.version, 2),
            other => panic!("{other:?}"),
        }
        assert!(sub.wire(&version("a", 1)).is_none());
    }
}
