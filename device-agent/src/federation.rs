//! Federation client (tonic): enrollment, the `Subscribe` stream with bounded
//! reconnect backoff, resumable checksum-verified model fetches with hot-swap,
//! and rounds: local training on the device's own share, clipped delta,
//! compressed with error feedback, uploaded idempotently. The round task chooses the
//! client optimizer (plain SGD, momentum, FedProx's proximal term), may tell this client
//! it was not selected (it then does not train), and may ask for a federated evaluation:
//! the base version's loss and accuracy on a held-out part of the local data, which is
//! then never trained on, sent in the upload header.
//!
//! Every downloaded model is checked before it is stored or used ([`check_model`]): its
//! signature verifies with the coordinator key pinned at enrolment (or in the config), its
//! bytes hash to the signed digest, and its signed lineage succeeds the version in use.
//! A refused model is counted and logged; the current one stays.
//!
//! A round's update survives crashes: once trained it is saved with the residual it
//! would leave ([`PendingUpdate`]) before the first byte is sent, re-sent unchanged until
//! the round's deadline (and after a restart, without retraining), and its residual is
//! committed only when the round is known to have completed; a failed round rolls it
//! back. The protocol has no round-outcome message, so the outcome is read from what the
//! coordinator announces: a version newer than the round's base (rounds of a model run
//! one at a time, so it came from this round), a later round on the same base (this one
//! failed) or on a newer base (it completed), or, past the deadline, whether the version
//! after the base exists.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_edge::{stopped, Backoff};
use hearth_model::{
    clip_l2, encode_update, l2_norm, sub, train, CodecConfig, Dataset, OnnxModel, Tensor,
    TrainConfig, Weights,
};
use hearth_proto::signing::{ModelStatement, ModelVerifier};
use hearth_proto::v1::enrollment_client::EnrollmentClient;
use hearth_proto::v1::federation_client::FederationClient;
use hearth_proto::v1::{
    federation_event, update_chunk, ClientOptimizer, EnrollRequest, FederationEvent,
    FetchModelRequest, ModelChunk, ModelPublished, RoundTask, SubscribeRequest, UpdateChunk,
    UpdateHeader, UploadAck,
};
use hearth_proto::{CHUNK_SIZE, CLIENT_ID_HEADER, CLIENT_KEY_HEADER};
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::agent::Shared;
use crate::config::Config;
use crate::inference::Loaded;
use crate::state::{sha256_hex, Credentials, FedState, ModelMeta, PendingUpdate, StateDir};
use crate::stats::add;
use crate::{Error, RpcCode};

/// Largest model the agent accepts to download.
pub const MAX_MODEL_BYTES: u64 = 64 * 1024 * 1024;
const FETCH_ATTEMPTS: u32 = 6;
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// A whole upload (3 s in this crate's unit tests, which check that it holds).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 60 });
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
/// Opening the `Subscribe` stream, and the version check (3 s in this crate's unit tests).
const OPEN_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 15 });
/// After a round's deadline, how long the coordinator gets to close it before the agent
/// asks whether it produced a version.
const OUTCOME_GRACE: Duration = Duration::from_secs(5);
/// How long an update whose round deadline has passed is still re-sent (after a restart:
/// the coordinator may have counted it before the agent recorded the acknowledgement).
const LATE_UPLOAD_WINDOW: Duration = Duration::from_secs(15);
/// Wait before trying again to settle a pending update when the coordinator is unreachable.
const SETTLE_RETRY: Duration = Duration::from_secs(10);
/// Test hook: `HEARTH_TEST_PAUSE_AT=ack` parks the federation worker right after the
/// coordinator acknowledged an upload and before the agent records it, `=chunk` after the
/// first chunk of a model download, so that a test can SIGKILL the process at exactly that
/// point. Inert unless set.
const TEST_PAUSE_ENV: &str = "HEARTH_TEST_PAUSE_AT";

async fn test_pause(point: &str) {
    if std::env::var(TEST_PAUSE_ENV).is_ok_and(|v| v == point) {
        tracing::warn!(point, "{TEST_PAUSE_ENV}: federation worker paused");
        std::future::pending::<()>().await;
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The runtime instant of a Unix time in milliseconds (now, if it has passed).
fn instant_at(unix_ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_unix_ms()))
}

type FedClient = FederationClient<InterceptedService<Channel, Auth>>;

/// Adds the enrolled identity to every federation call of an insecure (`http://`)
/// coordinator; over TLS the client certificate is the identity and nothing is added.
#[derive(Clone)]
struct Auth {
    id_key: Option<(MetadataValue<Ascii>, MetadataValue<Ascii>)>,
}

impl Auth {
    fn new(c: &Credentials) -> Result<Auth, Error> {
        if c.client_key.is_empty() {
            return Ok(Auth { id_key: None });
        }
        let v = |s: &str| {
            MetadataValue::try_from(s)
                .map_err(|_| Error::Protocol("credentials are not valid metadata".into()))
        };
        Ok(Auth {
            id_key: Some((v(&c.client_id)?, v(&c.client_key)?)),
        })
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some((id, key)) = &self.id_key {
            req.metadata_mut().insert(CLIENT_ID_HEADER, id.clone());
            req.metadata_mut().insert(CLIENT_KEY_HEADER, key.clone());
        }
        Ok(req)
    }
}

fn is_tls(url: &str) -> bool {
    url.starts_with("https://")
}

/// The CA trusted for an `https://` coordinator: `coordinator_ca_file`, else the CA stored at
/// enrolment.
fn trusted_ca(config: &Config, creds: Option<&Credentials>) -> Result<Option<String>, Error> {
    if let Some(p) = &config.coordinator_ca_file {
        return std::fs::read_to_string(p)
            .map(Some)
            .map_err(|e| Error::io(p, e));
    }
    Ok(creds.map(|c| c.ca_pem.clone()).filter(|c| !c.is_empty()))
}

/// Connection-level limits of the channel to the coordinator.
#[derive(Debug, Clone, Copy)]
struct ChannelLimits {
    /// A TCP (and TLS) connection must be up within this.
    connect: Duration,
    /// HTTP/2 ping interval, also while no call is open: a coordinator that stopped
    /// answering (power cut, a NAT that dropped the mapping) is found even while the
    /// `Subscribe` stream waits for days.
    keepalive_interval: Duration,
    /// A ping not answered within this closes the connection (open calls fail, the
    /// subscribe loop reconnects).
    keepalive_timeout: Duration,
}

const CHANNEL_LIMITS: ChannelLimits = ChannelLimits {
    connect: Duration::from_secs(5),
    keepalive_interval: Duration::from_secs(20),
    keepalive_timeout: Duration::from_secs(10),
};

/// A lazily connecting channel to `url`: over TLS trusting `ca` and presenting the client
/// certificate of `creds` when given; plaintext for `http://`.
fn channel(url: &str, ca: Option<&str>, creds: Option<&Credentials>) -> Result<Channel, Error> {
    channel_with(url, ca, creds, &CHANNEL_LIMITS)
}

/// [`channel`] with the given limits.
fn channel_with(
    url: &str,
    ca: Option<&str>,
    creds: Option<&Credentials>,
    limits: &ChannelLimits,
) -> Result<Channel, Error> {
    let bad = |e: tonic::transport::Error| Error::Config(format!("coordinator `{url}`: {e}"));
    let mut ep = Endpoint::from_shared(url.to_string())
        .map_err(bad)?
        .connect_timeout(limits.connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout)
        .keep_alive_while_idle(true);
    if is_tls(url) {
        let ca = ca.ok_or_else(|| {
            Error::Config(format!(
                "coordinator `{url}` uses TLS: set coordinator_ca_file to the coordinator's CA \
                 certificate (its pki/ca.pem)"
            ))
        })?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(c) = creds.filter(|c| !c.cert_pem.is_empty()) {
            tls = tls.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        ep = ep.tls_config(tls).map_err(bad)?;
    }
    Ok(ep.connect_lazy())
}

/// A new key pair made on this device (ECDSA P-256) and a certificate signing request for
/// it; returns (key PEM, CSR PEM).
fn key_and_csr(device: &str) -> Result<(String, String), Error> {
    let fail = |e: rcgen::Error| Error::Protocol(format!("cannot make the device key: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device);
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok((key.serialize_pem(), csr.pem().map_err(fail)?))
}

/// One enrolment call: trades `token` for an identity. Over TLS the key is generated here and
/// only a CSR leaves the device; the coordinator returns the certificate.
async fn enroll_once(
    url: &str,
    ca: Option<&str>,
    token: &str,
    device: &str,
) -> Result<Credentials, Error> {
    let tls = is_tls(url);
    let (key_pem, csr_pem) = if tls {
        key_and_csr(device)?
    } else {
        (String::new(), String::new())
    };
    let mut client = EnrollmentClient::new(channel(url, ca, None)?)
        .max_decoding_message_size(64 * 1024)
        .max_encoding_message_size(64 * 1024);
    let req = EnrollRequest {
        token: token.to_string(),
        device_name: device.to_string(),
        csr_pem,
    };
    let r = tokio::time::timeout(ENROLL_TIMEOUT, client.enroll(req))
        .await
        .map_err(|_| Error::Unavailable(format!("enrolment at {url} timed out")))?
        .map_err(rpc_error)?
        .into_inner();
    let complete = if tls {
        !r.client_cert_pem.is_empty()
    } else {
        !r.client_key.is_empty()
    };
    if r.client_id.is_empty() || !complete {
        return Err(Error::Protocol(
            "enrollment returned an empty identity".into(),
        ));
    }
    let model_signing_key = if r.model_signing_key.is_empty() {
        None
    } else {
        let k = ModelVerifier::from_bytes(&r.model_signing_key)
            .map_err(|e| Error::Protocol(format!("enrollment returned a bad signing key: {e}")))?;
        Some(k.to_hex())
    };
    Ok(Credentials {
        coordinator: url.to_string(),
        client_id: r.client_id,
        client_key: r.client_key,
        model_signing_key,
        cert_pem: r.client_cert_pem,
        key_pem,
        ca_pem: if r.ca_cert_pem.is_empty() {
            ca.unwrap_or_default().to_string()
        } else {
            r.ca_cert_pem
        },
    })
}

/// `hearth-agent enroll`: enrols once with `token` at the configured coordinator and stores
/// the credentials (key, certificate, CA) in the state directory, replacing any before.
pub async fn enroll(config: &Config, token: &str) -> Result<Credentials, Error> {
    let url = config
        .coordinator_url()
        .ok_or_else(|| Error::Config("no coordinator configured".into()))?;
    let state = crate::state::StateDir::open(&config.state_dir)?;
    let ca = trusted_ca(config, None)?;
    let c = enroll_once(url, ca.as_deref(), token, &config.device).await?;
    state.save_credentials(&c)?;
    Ok(c)
}

/// The gRPC edge of the agent: a tonic status becomes a domain [`Error`] here, so no wire
/// type leaves this module.
fn rpc_error(s: Status) -> Error {
    let code = match s.code() {
        Code::Ok | Code::Unknown => RpcCode::Unknown,
        Code::Cancelled => RpcCode::Cancelled,
        Code::InvalidArgument => RpcCode::InvalidArgument,
        Code::DeadlineExceeded => RpcCode::DeadlineExceeded,
        Code::NotFound => RpcCode::NotFound,
        Code::AlreadyExists => RpcCode::AlreadyExists,
        Code::PermissionDenied => RpcCode::PermissionDenied,
        Code::ResourceExhausted => RpcCode::ResourceExhausted,
        Code::FailedPrecondition => RpcCode::FailedPrecondition,
        Code::Aborted => RpcCode::Aborted,
        Code::OutOfRange => RpcCode::OutOfRange,
        Code::Unimplemented => RpcCode::Unimplemented,
        Code::Internal => RpcCode::Internal,
        Code::Unavailable => RpcCode::Unavailable,
        Code::DataLoss => RpcCode::DataLoss,
        Code::Unauthenticated => RpcCode::Unauthenticated,
    };
    Error::Rpc {
        code,
        message: s.message().to_string(),
    }
}

/// Sleeps `d` unless shutdown comes first; returns false on shutdown.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stopped(stop) => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Runs the federation client until shutdown.
pub(crate) async fn run(shared: Arc<Shared>, url: String, mut stop: watch::Receiver<bool>) {
    let creds = match credentials(&shared, &url, &mut stop).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(coordinator = %url, "federation disabled, enrollment failed: {e}");
            return;
        }
    };
    let verifier = match pinned_key(&shared.config, &creds) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!("federation disabled: {e}");
            return;
        }
    };
    tracing::info!(key = %verifier.to_hex(), "models must be signed with this coordinator key");
    let connected = trusted_ca(&shared.config, Some(&creds))
        .and_then(|ca| channel(&url, ca.as_deref(), Some(&creds)))
        .and_then(|ch| Ok((ch, Auth::new(&creds)?)));
    let (channel, auth) = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(coordinator = %url, "federation disabled: {e}");
            return;
        }
    };
    let client = FederationClient::with_interceptor(channel, auth)
        .max_decoding_message_size(2 * CHUNK_SIZE + 4096)
        .max_encoding_message_size(2 * CHUNK_SIZE + 4096);
    let (tx, rx) = mpsc::channel(64);
    let worker =
        tokio::spawn(Worker::new(shared.clone(), client.clone(), verifier).run(rx, stop.clone()));
    subscribe_loop(&shared, client, tx, &mut stop).await;
    if let Err(e) = worker.await {
        tracing::warn!("federation worker ended abnormally: {e}");
    }
}

/// The key every model must be signed with: `model_signing_key` from the config (pinned out
/// of band) wins over the one the coordinator gave at enrolment. Credentials from before
/// model signing hold none: without a configured key such an agent runs no federation (it
/// could only trust whatever it is sent) and says how to fix it.
fn pinned_key(config: &Config, c: &Credentials) -> Result<ModelVerifier, Error> {
    let enrolled = c
        .model_signing_key
        .as_deref()
        .map(ModelVerifier::from_hex)
        .transpose()
        .map_err(|e| Error::State(format!("credentials.json: model_signing_key: {e}")))?;
    if let Some(hex) = &config.model_signing_key {
        let k = ModelVerifier::from_hex(hex)
            .map_err(|e| Error::Config(format!("model_signing_key: {e}")))?;
        if enrolled.as_ref().is_some_and(|e| *e != k) {
            tracing::warn!(
                "the configured model_signing_key differs from the key the coordinator gave at \
                 enrolment: the configured one is pinned"
            );
        }
        return Ok(k);
    }
    enrolled.ok_or_else(|| {
        Error::Config(
            "no coordinator model-signing key is pinned (the stored credentials predate model \
             signing, or the coordinator sent none): re-enrol (remove credentials.json from the \
             state directory and set a fresh enrollment_token) or set model_signing_key to the \
             coordinator's public key (its <signing key>.pub)"
                .into(),
        )
    })
}

/// Stored credentials for `url`, or a fresh enrollment with the configured token (retried
/// while the coordinator is unreachable).
async fn credentials(
    shared: &Shared,
    url: &str,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Credentials>, Error> {
    if let Some(c) = shared.state.load_credentials()? {
        if c.coordinator == url && (c.cert_pem.is_empty() != is_tls(url)) {
            return Ok(Some(c));
        }
        tracing::info!(old = %c.coordinator, new = %url, "stored credentials are for another coordinator");
    }
    let token = shared.config.enrollment_token.clone().ok_or_else(|| {
        Error::Config("no stored credentials and no enrollment_token configured".into())
    })?;
    let ca = trusted_ca(&shared.config, None)?;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let res = tokio::select! {
            _ = stopped(stop) => return Ok(None),
            r = enroll_once(url, ca.as_deref(), &token, &shared.config.device) => r,
        };
        match res {
            Ok(c) => {
                shared.state.save_credentials(&c)?;
                tracing::info!(client_id = %c.client_id, tls = is_tls(url), "enrolled with the coordinator");
                return Ok(Some(c));
            }
            Err(e) if e.is_transient() => tracing::warn!("enrollment: {e}"),
            Err(e) => return Err(e),
        }
        if !pause(backoff.next_wait(), stop).await {
            return Ok(None);
        }
    }
}

/// Keeps one `Subscribe` stream open (reconnecting with bounded backoff) and
/// hands its events to the worker, until shutdown.
async fn subscribe_loop(
    shared: &Shared,
    mut client: FedClient,
    tx: mpsc::Sender<FederationEvent>,
    stop: &mut watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let res = tokio::select! {
            _ = stopped(stop) => return,
            r = open_subscription(&mut client, &shared.model_name) => r,
        };
        match res {
            Ok(mut stream) => {
                tracing::info!(model = %shared.model_name, "subscribed to federation events");
                loop {
                    let msg = tokio::select! {
                        _ = stopped(stop) => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(ev)) => {
                            backoff.reset();
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("federation stream closed by the coordinator");
                            break;
                        }
                        Err(s) => {
                            tracing::warn!("federation stream: {}", s.message());
                            break;
                        }
                    }
                }
            }
            Err(s) if s.code() == Code::Unauthenticated || s.code() == Code::PermissionDenied => {
                tracing::error!(
                    "coordinator refused the stored credentials: {}",
                    s.message()
                );
            }
            Err(s) => tracing::warn!("subscribe: {}", s.message()),
        }
        if !pause(backoff.next_wait(), stop).await {
            return;
        }
    }
}

/// Opens the `Subscribe` stream for `model`. The stream may live for days (HTTP/2
/// keepalive finds a dead coordinator); opening it must not hang: [`OPEN_TIMEOUT`].
async fn open_subscription(
    client: &mut FedClient,
    model: &str,
) -> Result<tonic::Streaming<FederationEvent>, Status> {
    let req = SubscribeRequest {
        models: vec![model.to_string()],
    };
    match tokio::time::timeout(OPEN_TIMEOUT, client.subscribe(req)).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded("subscribe timed out")),
    }
}

/// The result of local training for one round (computed off the runtime).
struct LocalUpdate {
    payload: Vec<u8>,
    residual: Weights,
    samples: usize,
    loss: f32,
    norm: f32,
    /// Federated evaluation of the base model: (held-out samples, loss, accuracy).
    eval: (u64, f32, f32),
}

/// How the round of a pending update ended for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The round completed with the update: its residual becomes the committed one.
    Completed,
    /// The round failed after accepting the update: the residual rolls back.
    Failed,
    /// The round closed before the update arrived: the residual stays as it was.
    CountedOut,
}

/// Processes federation events one at a time (a round task that arrives while another
/// round trains waits in the channel), and settles the pending update on a timer.
struct Worker {
    shared: Arc<Shared>,
    client: FedClient,
    /// The pinned coordinator key every model must be signed with.
    verifier: ModelVerifier,
    fed: FedState,
    /// Newest global version the coordinator announced.
    latest: u64,
    /// When to next try to settle the pending update (resume its upload, learn its outcome).
    settle_at: Option<tokio::time::Instant>,
}

impl Worker {
    fn new(shared: Arc<Shared>, client: FedClient, verifier: ModelVerifier) -> Worker {
        let fed = match shared.state.load_federation(&shared.model_name) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("ignoring the stored federation state: {e}");
                FedState::default()
            }
        };
        if let Some(p) = &fed.pending {
            tracing::info!(
                round = p.round_id,
                acked = p.acked,
                "resuming the update of an unsettled round"
            );
        }
        let settle_at = fed.pending.as_ref().map(|_| tokio::time::Instant::now());
        Worker {
            shared,
            client,
            verifier,
            fed,
            latest: 0,
            settle_at,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<FederationEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let wake = self.settle_at;
            let ev = tokio::select! {
                _ = stopped(&mut stop) => return,
                ev = rx.recv() => match ev { Some(ev) => Some(ev), None => return },
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)),
                    if wake.is_some() => None,
            };
            let res = tokio::select! {
                _ = stopped(&mut stop) => return,
                r = self.step(ev) => r,
            };
            if let Err(e) = res {
                tracing::warn!("federation: {e}");
            }
        }
    }

    async fn step(&mut self, ev: Option<FederationEvent>) -> Result<(), Error> {
        match ev {
            Some(ev) => self.handle(ev).await,
            None => self.settle().await,
        }
    }

    fn persist(&self) -> Result<(), Error> {
        self.shared
            .state
            .save_federation(&self.shared.model_name, &self.fed)
    }

    /// Ends the pending update's round: commits or drops its residual, in one write.
    fn finish(&mut self, outcome: Outcome) -> Result<(), Error> {
        let Some(p) = self.fed.pending.take() else {
            return Ok(());
        };
        let round = p.round_id;
        match outcome {
            Outcome::Completed => {
                self.fed.residual = Some(p.residual);
                add(&self.shared.stats.rounds_committed, 1);
            }
            Outcome::Failed | Outcome::CountedOut => {
                add(&self.shared.stats.rounds_rolled_back, 1);
            }
        }
        self.persist()?;
        tracing::info!(
            round,
            ?outcome,
            "round settled: residual {}",
            match outcome {
                Outcome::Completed => "committed",
                _ => "rolled back",
            }
        );
        Ok(())
    }

    /// Settles an acknowledged update from what is already known: a version newer than
    /// its base was announced.
    fn settle_known(&mut self) -> Result<(), Error> {
        match &self.fed.pending {
            Some(p) if p.acked && self.latest > p.base_version => self.finish(Outcome::Completed),
            _ => Ok(()),
        }
    }

    /// The timer: re-sends an unacknowledged update, or learns the round's outcome once
    /// its deadline (plus a grace period) has passed.
    async fn settle(&mut self) -> Result<(), Error> {
        self.settle_at = None;
        let Some((acked, base, deadline)) = self
            .fed
            .pending
            .as_ref()
            .map(|p| (p.acked, p.base_version, p.deadline_unix_ms))
        else {
            return Ok(());
        };
        if !acked {
            add(&self.shared.stats.uploads_resumed, 1);
            return self.send_pending().await;
        }
        if self.latest > base {
            return self.finish(Outcome::Completed);
        }
        let due = deadline + OUTCOME_GRACE.as_millis() as u64;
        if now_unix_ms() < due {
            self.settle_at = Some(instant_at(due));
            return Ok(());
        }
        match version_exists(&mut self.client, &self.shared.model_name, base + 1).await {
            Ok(true) => self.finish(Outcome::Completed),
            Ok(false) => self.finish(Outcome::Failed),
            Err(e) => {
                self.settle_at = Some(tokio::time::Instant::now() + SETTLE_RETRY);
                Err(e)
            }
        }
    }

    /// Uploads the pending update (the same bytes on every attempt) until the round's
    /// deadline, and records the acknowledgement together with the round joined.
    async fn send_pending(&mut self) -> Result<(), Error> {
        let Some(p) = &self.fed.pending else {
            return Ok(());
        };
        let header = UpdateHeader {
            model: self.shared.model_name.clone(),
            round_id: p.round_id,
            base_version: p.base_version,
            num_samples: p.num_samples,
            train_loss: p.train_loss,
            payload_size: p.payload.len() as u64,
            payload_sha256: sha256_hex(&p.payload),
            eval_samples: p.eval.0,
            eval_loss: p.eval.1,
            eval_accuracy: p.eval.2,
        };
        let until =
            instant_at(p.deadline_unix_ms).max(tokio::time::Instant::now() + LATE_UPLOAD_WINDOW);
        let (round, deadline, bytes) = (p.round_id, p.deadline_unix_ms, p.payload.len());
        let res = upload(&mut self.client, &header, &p.payload, until).await;
        match res {
            Ok(ack) if ack.accepted || ack.duplicate => {
                test_pause("ack").await;
                if let Some(p) = self.fed.pending.as_mut() {
                    p.acked = true;
                }
                self.fed.join(round);
                self.persist()?;
                add(&self.shared.stats.rounds_joined, 1);
                add(&self.shared.stats.bytes_uploaded, bytes as u64);
                tracing::info!(
                    round,
                    bytes,
                    duplicate = ack.duplicate,
                    updates_in_round = ack.updates_in_round,
                    "update uploaded"
                );
                self.settle_at = Some(instant_at(deadline + OUTCOME_GRACE.as_millis() as u64));
                self.settle_known()
            }
            Ok(ack) => {
                self.finish(Outcome::CountedOut)?;
                Err(Error::Protocol(format!("update refused: {}", ack.reason)))
            }
            Err(e) if e.is_transient() => {
                self.settle_at = Some(tokio::time::Instant::now() + SETTLE_RETRY);
                Err(e)
            }
            Err(e) => {
                self.finish(Outcome::CountedOut)?;
                Err(e)
            }
        }
    }

    async fn handle(&mut self, ev: FederationEvent) -> Result<(), Error> {
        match ev.event {
            Some(federation_event::Event::Published(p)) if p.model == self.shared.model_name => {
                self.latest = self.latest.max(p.version);
                self.settle_known()?;
                self.on_published(p).await
            }
            Some(federation_event::Event::Round(t)) if t.model == self.shared.model_name => {
                let id = t.round_id;
                match self.on_round(t).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        add(&self.shared.stats.rounds_failed, 1);
                        Err(Error::Protocol(format!("round {id}: {e}")))
                    }
                }
            }
            Some(_) => Ok(()), // another model
            None => Err(Error::Protocol("empty federation event".into())),
        }
    }

    async fn on_published(&mut self, p: ModelPublished) -> Result<(), Error> {
        let cur = self.shared.slot.current();
        if cur.global && cur.version >= p.version {
            return Ok(());
        }
        tracing::info!(model = %p.model, version = p.version, "new global model announced");
        self.obtain(p.version, Some(&p.sha256), Some(p.size_bytes))
            .await
            .map(|_| ())
    }

    /// Returns global `version` of the model: the one in use if it matches,
    /// else fetched, verified, loaded, persisted and (if newer) hot-swapped in.
    async fn obtain(
        &mut self,
        version: u64,
        sha256: Option<&str>,
        size: Option<u64>,
    ) -> Result<Arc<Loaded>, Error> {
        let cur = self.shared.slot.current();
        if cur.global && cur.version == version && !cur.distilled {
            return Ok(cur);
        }
        if cur.global && cur.version == version && cur.distilled {
            // The model in use was distilled on the device from `version`: train from the
            // global version itself, stored when it was downloaded.
            let shared = self.shared.clone();
            let name = self.shared.model_name.clone();
            let stored = tokio::task::spawn_blocking(move || -> Result<Option<Loaded>, Error> {
                match shared.state.load_model(&name)? {
                    Some((meta, bytes)) if meta.version == version => {
                        Ok(Some(Loaded::from_bytes(&name, version, true, &bytes)?))
                    }
                    _ => Ok(None),
                }
            })
            .await??;
            if let Some(l) = stored {
                return Ok(Arc::new(l));
            }
        }
        // A distilled model is not the global version's bytes: no delta applies to it.
        let have = if cur.global && !cur.distilled {
            cur.version
        } else {
            0
        };
        let (mut meta, mut bytes, mut signed, delta_base) = fetch_model(
            &mut self.client,
            &self.shared.state,
            &self.shared.model_name,
            version,
            have,
        )
        .await?;
        add(&self.shared.stats.bytes_downloaded, bytes.len() as u64);
        if delta_base != 0 {
            // A coded delta: rebuild the file from the model in use; only a rebuild whose
            // digest is the signed one goes on (to the same checks as a downloaded file).
            let base = cur.clone();
            let want = signed.sha256.clone();
            let rebuilt =
                tokio::task::spawn_blocking(move || rebuild(&base, delta_base, &bytes, &want))
                    .await
                    .map_err(|e| Error::Protocol(format!("rebuild task: {e}")))?;
            match rebuilt {
                Ok(b) => {
                    add(&self.shared.stats.models_from_delta, 1);
                    meta.sha256 = sha256_hex(&b);
                    meta.size_bytes = b.len() as u64;
                    bytes = b;
                }
                Err(why) => {
                    add(&self.shared.stats.delta_fallbacks, 1);
                    tracing::warn!(
                        model = %self.shared.model_name, version,
                        "the coded delta did not rebuild the signed model ({why}): fetching the whole file"
                    );
                    let full = fetch_model(
                        &mut self.client,
                        &self.shared.state,
                        &self.shared.model_name,
                        version,
                        0,
                    )
                    .await?;
                    add(&self.shared.stats.bytes_downloaded, full.1.len() as u64);
                    (meta, bytes, signed) = (full.0, full.1, full.2);
                }
            }
        }
        // Nothing downloaded is stored or used before it verifies.
        let current = if cur.global { cur.version } else { 0 };
        if let Err((reason, detail)) = check_model(
            &self.verifier,
            &self.shared.model_name,
            current,
            &meta,
            &signed,
            (sha256, size),
        ) {
            return Err(self.refuse(reason, meta.version, &cur.tag(), &detail));
        }
        let shared = self.shared.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<Loaded, Error> {
            let mut l = Loaded::from_bytes(&meta.model, meta.version, true, &bytes)?;
            l.check_compatible(&shared.data)?;
            l.adopt(&shared.task)?;
            // Persist only models newer than the one stored, so a restart resumes the latest.
            let cur = shared.slot.current();
            if !cur.global || meta.version > cur.version {
                shared.state.save_model(&meta, &bytes)?;
            }
            Ok(l)
        })
        .await??;
        let loaded = Arc::new(loaded);
        let cur = self.shared.slot.current();
        if !cur.global || loaded.version > cur.version {
            self.shared.install(loaded.clone());
            if let Err(e) = self.shared.publish_meta().await {
                tracing::warn!("could not republish meta: {e}");
            }
        }
        Ok(loaded)
    }

    /// Counts and logs a refused model; the one in use (`keeping`) stays.
    fn refuse(&self, reason: Refusal, version: u64, keeping: &str, detail: &str) -> Error {
        let s = &self.shared.stats;
        add(&s.models_refused, 1);
        add(
            match reason {
                Refusal::Signature => &s.models_refused_signature,
                Refusal::Digest => &s.models_refused_digest,
                Refusal::Lineage => &s.models_refused_lineage,
            },
            1,
        );
        let total = s.models_refused.load(std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            model = %self.shared.model_name, version, reason = reason.as_str(),
            refused_total = total, %keeping,
            "refused a downloaded model: {detail}"
        );
        Error::Integrity(format!(
            "model {} v{version} refused ({}): {detail}",
            self.shared.model_name,
            reason.as_str()
        ))
    }

    async fn on_round(&mut self, t: RoundTask) -> Result<(), Error> {
        if let Some((round, base)) = self
            .fed
            .pending
            .as_ref()
            .map(|p| (p.round_id, p.base_version))
        {
            if t.round_id < round {
                return Ok(());
            }
            // The round of the pending update (still open), or a later one (so it closed):
            // make sure the update arrived, without training again.
            if !self.fed.pending.as_ref().is_some_and(|p| p.acked) {
                self.send_pending().await?;
            }
            if t.round_id == round {
                return Ok(());
            }
            // Rounds of a model run one at a time: a later round on the same base means the
            // earlier one published nothing.
            if self.fed.pending.is_some() {
                self.finish(if t.base_version > base {
                    Outcome::Completed
                } else {
                    Outcome::Failed
                })?;
            }
        }
        if self.fed.joined.contains(&t.round_id) {
            tracing::debug!(round = t.round_id, "round already joined");
            return Ok(());
        }
        if t.not_selected {
            tracing::info!(
                round = t.round_id,
                "not selected for this round: not training"
            );
            return Ok(());
        }
        if t.deadline_unix_ms != 0 && now_unix_ms() >= t.deadline_unix_ms {
            tracing::info!(
                round = t.round_id,
                "round deadline already passed; skipping"
            );
            return Ok(());
        }
        tracing::info!(
            round = t.round_id,
            base = t.base_version,
            epochs = t.local_epochs,
            "joining round: local training"
        );
        let base = self.obtain(t.base_version, None, None).await?;
        // The device's share plus the samples the home labelled (feedback).
        let shared = self.shared.clone();
        let residual = self.fed.residual.clone();
        let seed = round_seed(&self.shared.config.device, t.round_id);
        let holdout_seed = round_seed(&self.shared.config.device, 0);
        let task = t.clone();
        let weight_decay = self.shared.task.weight_decay();
        add(&self.shared.stats.local_trainings, 1);
        // One CPU job at a time (idle distillation waits, and this waits for it).
        let busy = self.shared.cpu.lock().await;
        let update = tokio::task::spawn_blocking(move || {
            local_update(
                &base.onnx,
                &shared.training_data(),
                &task,
                weight_decay,
                residual,
                seed,
                holdout_seed,
            )
        })
        .await??;
        drop(busy);
        tracing::info!(
            round = t.round_id,
            bytes = update.payload.len(),
            samples = update.samples,
            loss = update.loss,
            delta_norm = update.norm,
            eval_samples = update.eval.0,
            eval_accuracy = update.eval.2,
            "local update ready"
        );
        // Saved before the first byte is sent: a restart re-sends these bytes rather than
        // training again, and the residual waits for the round's outcome.
        self.fed.pending = Some(PendingUpdate {
            round_id: t.round_id,
            base_version: t.base_version,
            deadline_unix_ms: t.deadline_unix_ms,
            acked: false,
            num_samples: update.samples as u64,
            train_loss: update.loss,
            payload: update.payload,
            residual: update.residual,
            eval: update.eval,
        });
        self.persist()?;
        self.send_pending().await
    }
}

/// Per-device, per-round seed for training order and stochastic rounding.
fn round_seed(device: &str, round: u64) -> u64 {
    // FNV-1a over the device name, mixed with the round id.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn same_layout(a: &Weights, b: &Weights) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((na, ta), (nb, tb))| na == nb && ta.shape == tb.shape)
}

/// The client optimizer a round task asks for, as (momentum, proximal mu). Unspecified (a
/// coordinator from before the field) is momentum 0.9, what agents always did; values out of
/// range fall back to it (momentum) or to 0 (mu).
fn client_optimizer(t: &RoundTask) -> (f32, f32) {
    let default = TrainConfig::default().momentum;
    let momentum = match ClientOptimizer::try_from(t.client_optimizer) {
        Ok(ClientOptimizer::Sgd) => 0.0,
        Ok(ClientOptimizer::Momentum) if (0.0..1.0).contains(&t.client_momentum) => {
            t.client_momentum
        }
        _ => default,
    };
    let mu = if t.proximal_mu.is_finite() && t.proximal_mu > 0.0 {
        t.proximal_mu
    } else {
        0.0
    };
    (momentum, mu)
}

/// Splits the local data into (training, held-out) for federated evaluation: a fixed
/// per-device draw of `fraction` of the samples (at least one left to train on), the same
/// every round so held-out samples are never trained on. `fraction` 0: all training.
fn split_holdout(data: &Dataset, fraction: f32, seed: u64) -> (Dataset, Option<Dataset>) {
    use rand::seq::SliceRandom;
    let n = data.len();
    let k = if fraction.is_finite() && fraction > 0.0 && fraction < 1.0 {
        ((fraction * n as f32).round() as usize).min(n.saturating_sub(1))
    } else {
        0
    };
    if k == 0 {
        return (data.clone(), None);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let (held, train) = idx.split_at(k);
    let (mut held, mut train) = (held.to_vec(), train.to_vec());
    held.sort_unstable();
    train.sort_unstable();
    (data.subset(&train), Some(data.subset(&held)))
}

/// Mean cross-entropy and accuracy of `model` on `data`.
fn evaluate(model: &OnnxModel, data: &Dataset) -> Result<(f32, f32), Error> {
    let n = data.len();
    let probs = hearth_model::train::forward_probs(model, &data.x, n)?;
    let classes = probs.len() / n.max(1);
    let (mut loss, mut correct) = (0f64, 0usize);
    for (i, &y) in data.y.iter().enumerate() {
        let p = &probs[i * classes..(i + 1) * classes];
        loss -= f64::from(p.get(y as usize).copied().unwrap_or(0.0).max(1e-7)).ln();
        let best = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(c, _)| c);
        correct += usize::from(best == y as usize);
    }
    Ok(((loss / n as f64) as f32, correct as f32 / n as f32))
}

/// Trains on the local share and encodes the clipped, compressed delta (CPU work); with a
/// federated evaluation asked for, first evaluates the base model on the held-out part.
fn local_update(
    base: &OnnxModel,
    data: &Dataset,
    t: &RoundTask,
    weight_decay: f32,
    residual: Option<Weights>,
    seed: u64,
    holdout_seed: u64,
) -> Result<LocalUpdate, Error> {
    let (train_set, held) = split_holdout(data, t.eval_fraction, holdout_seed);
    let eval = match &held {
        Some(h) => {
            let (loss, acc) = evaluate(base, h)?;
            (h.len() as u64, loss, acc)
        }
        None => (0, 0.0, 0.0),
    };
    let data = &train_set;
    let (momentum, proximal_mu) = client_optimizer(t);
    let d = TrainConfig::default();
    let cfg = TrainConfig {
        momentum,
        proximal_mu,
        epochs: t.local_epochs.max(1),
        learning_rate: if t.learning_rate.is_finite() && t.learning_rate > 0.0 {
            t.learning_rate
        } else {
            d.learning_rate
        },
        batch_size: if t.batch_size > 0 {
            t.batch_size as usize
        } else {
            d.batch_size
        },
        seed,
        // The task's model family (task file `[model] weight_decay`).
        weight_decay,
        ..d
    };
    let global = base.weights();
    let (local, report) = train(base, data, &cfg)?;
    let mut delta = sub(&local, &global)?;
    let norm = if t.clip_norm.is_finite() && t.clip_norm > 0.0 {
        clip_l2(&mut delta, t.clip_norm)
    } else {
        l2_norm(&delta)
    };
    let mut residual = match residual {
        Some(r) if same_layout(&r, &delta) => r,
        _ => delta
            .iter()
            .map(|(k, v)| (k.clone(), Tensor::zeros(&v.shape)))
            .collect(),
    };
    let codec = CodecConfig {
        bits: match t.quant_bits {
            0 => 8,
            b => u8::try_from(b).map_err(|_| Error::Protocol(format!("quant_bits {b}")))?,
        },
        topk_fraction: if t.topk_fraction > 0.0 && t.topk_fraction <= 1.0 {
            t.topk_fraction
        } else {
            1.0
        },
        entropy: true,
        compact: true,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.rotate_left(17));
    let payload = encode_update(&delta, &mut residual, &codec, &mut rng)?;
    Ok(LocalUpdate {
        payload,
        residual,
        samples: data.len(),
        loss: report.final_loss,
        norm,
        eval,
    })
}

/// Whether the coordinator holds `version` of `model` (asks for it and drops the stream).
async fn version_exists(client: &mut FedClient, model: &str, version: u64) -> Result<bool, Error> {
    let req = FetchModelRequest {
        model: model.to_string(),
        version,
        offset: 0,
        have_version: 0,
    };
    match tokio::time::timeout(OPEN_TIMEOUT, client.fetch_model(req)).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(s)) if s.code() == Code::NotFound => Ok(false),
        Ok(Err(s)) => Err(rpc_error(s)),
        Err(_) => Err(Error::Unavailable("version check timed out".into())),
    }
}

/// Uploads one update (header, then `CHUNK_SIZE` pieces), retrying transient failures
/// with the same bytes until `until`; the coordinator deduplicates per (round, client).
async fn upload(
    client: &mut FedClient,
    header: &UpdateHeader,
    payload: &[u8],
    until: tokio::time::Instant,
) -> Result<UploadAck, Error> {
    let mut backoff = Backoff::new(Duration::from_millis(300), Duration::from_secs(5));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let parts: Vec<UpdateChunk> = std::iter::once(update_chunk::Part::Header(header.clone()))
            .chain(
                payload
                    .chunks(CHUNK_SIZE)
                    .map(|c| update_chunk::Part::Data(c.to_vec())),
            )
            .map(|p| UpdateChunk { part: Some(p) })
            .collect();
        let err = match tokio::time::timeout(
            UPLOAD_TIMEOUT,
            client.upload_update(tokio_stream::iter(parts)),
        )
        .await
        {
            Ok(Ok(ack)) => return Ok(ack.into_inner()),
            Ok(Err(s)) => {
                let e = rpc_error(s);
                if !e.is_transient() {
                    return Err(e);
                }
                e
            }
            Err(_) => Error::Protocol(format!("upload timed out after {UPLOAD_TIMEOUT:?}")),
        };
        let wait = backoff.next_wait();
        if tokio::time::Instant::now() + wait >= until {
            tracing::warn!(attempt, "upload failed until the round's deadline: {err}");
            return Err(err);
        }
        tracing::warn!(attempt, "upload failed, retrying: {err}");
        tokio::time::sleep(wait).await;
    }
}

/// Why a downloaded model was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Unsigned, or the signature does not verify with the pinned key over this model name,
    /// version, parent and digest.
    Signature,
    /// The bytes do not hash to the signed digest (or differ from the announced digest/size).
    Digest,
    /// Validly signed, but not a successor of the version in use.
    Lineage,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Signature => "signature",
            Refusal::Digest => "digest",
            Refusal::Lineage => "lineage",
        }
    }
}

/// What the coordinator said about a download: the announced digest (the one signed), the
/// signed parent version and the signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Signed {
    sha256: String,
    parent: u64,
    signature: Vec<u8>,
}

/// The checks a downloaded model passes before it is stored or used, in order:
/// 1. it is signed, and the signature verifies with the pinned `key` over (`model` — the name
///    this agent asked for —, the version, the signed parent, the announced digest): a model
///    signed by another key, for another model name, or relabelled as another version fails;
/// 2. its bytes hash to that signed digest (and match what `ModelPublished` announced);
/// 3. lineage: it is strictly newer than `current` (the global version in use, 0 for none),
///    so an older version, however validly signed, is a replay; its signed parent is older
///    than it; and the parent is `current` or later — the agent can account for it: versions
///    form one chain in which each names its predecessor, so a parent ≥ `current` means the
///    model in use is an ancestor (versions in between were merely missed), while a parent
///    older than `current` is a fork away from it.
fn check_model(
    key: &ModelVerifier,
    model: &str,
    current: u64,
    meta: &ModelMeta,
    signed: &Signed,
    announced: (Option<&str>, Option<u64>),
) -> Result<(), (Refusal, String)> {
    let v = meta.version;
    if signed.signature.is_empty() {
        return Err((Refusal::Signature, "the model is not signed".into()));
    }
    let statement = ModelStatement::with_hex_digest(model, v, signed.parent, &signed.sha256)
        .map_err(|e| (Refusal::Digest, e.to_string()))?;
    key.verify(&statement, &signed.signature).map_err(|e| {
        (
            Refusal::Signature,
            format!("{e} (as {model} version {v}, parent {})", signed.parent),
        )
    })?;
    if !meta.sha256.eq_ignore_ascii_case(&signed.sha256) {
        return Err((
            Refusal::Digest,
            format!(
                "the bytes hash to {} but the signed digest is {}",
                meta.sha256, signed.sha256
            ),
        ));
    }
    if let Some(want) = announced.0.filter(|s| !s.is_empty()) {
        if !want.eq_ignore_ascii_case(&meta.sha256) {
            return Err((
                Refusal::Digest,
                format!(
                    "announced sha256 {want} but the download has {}",
                    meta.sha256
                ),
            ));
        }
    }
    if let Some(want) = announced.1.filter(|s| *s > 0) {
        if want != meta.size_bytes {
            return Err((
                Refusal::Digest,
                format!("announced {want} bytes but downloaded {}", meta.size_bytes),
            ));
        }
    }
    if v <= current {
        return Err((
            Refusal::Lineage,
            format!("version {v} is not newer than the version in use, {current} (a replay)"),
        ));
    }
    if signed.parent >= v {
        return Err((
            Refusal::Lineage,
            format!("its signed parent {} is not older than it", signed.parent),
        ));
    }
    if current > 0 && signed.parent < current {
        return Err((
            Refusal::Lineage,
            format!(
                "its signed parent {} is older than the version in use, {current}: \
                 it does not descend from it",
                signed.parent
            ),
        ));
    }
    Ok(())
}

/// Rebuilds version N+1's ONNX file from the model in use (`base`, version `delta_base`)
/// and the coded delta, as the coordinator defined it (`hearth_model::downlink::apply`);
/// refuses a rebuild whose SHA-256 is not `want` (the signed digest).
fn rebuild(base: &Loaded, delta_base: u64, delta: &[u8], want: &str) -> Result<Vec<u8>, String> {
    if !base.global || base.version != delta_base {
        return Err(format!(
            "a delta against version {delta_base}, but version {} is in use",
            base.version
        ));
    }
    let next = hearth_model::downlink::apply(&base.onnx, delta).map_err(|e| e.to_string())?;
    let bytes = next.to_bytes();
    let got = sha256_hex(&bytes);
    if !got.eq_ignore_ascii_case(want) {
        return Err(format!(
            "the rebuilt model hashes to {got}, the signed digest is {want}"
        ));
    }
    Ok(bytes)
}

/// Download progress of one model version, kept across resumed attempts.
#[derive(Default)]
struct Download {
    version: u64,
    total: Option<u64>,
    sha256: Option<String>,
    /// Signed parent and signature, as the chunks of this download carry them.
    signed: Option<(u64, Vec<u8>)>,
    /// The version the agent holds, offered for a coded delta (0: ask for the file).
    have: u64,
    /// What the chunks carry: 0 the ONNX file, else a coded delta against that version
    /// (set by the first chunk; not kept in the state directory, a delta is refetched).
    delta_base: Option<u64>,
    buf: Vec<u8>,
}

impl Download {
    fn complete(&self) -> bool {
        self.total == Some(self.buf.len() as u64)
    }

    fn absorb(&mut self, model: &str, c: ModelChunk) -> Result<(), Error> {
        if c.model != model {
            return Err(Error::Protocol(format!("chunk for model {}", c.model)));
        }
        if self.version == 0 {
            self.version = c.version;
        } else if c.version != self.version {
            return Err(Error::Protocol(format!(
                "chunk of version {} while fetching {}",
                c.version, self.version
            )));
        }
        if c.total_size == 0 || c.total_size > MAX_MODEL_BYTES {
            return Err(Error::Integrity(format!("model size {}", c.total_size)));
        }
        match self.total {
            None => self.total = Some(c.total_size),
            Some(t) if t != c.total_size => {
                return Err(Error::Integrity(
                    "total size changed during the fetch".into(),
                ))
            }
            Some(_) => {}
        }
        match &self.sha256 {
            None => self.sha256 = Some(c.sha256.to_ascii_lowercase()),
            Some(s) if !s.eq_ignore_ascii_case(&c.sha256) => {
                return Err(Error::Integrity("digest changed during the fetch".into()))
            }
            Some(_) => {}
        }
        match self.delta_base {
            None => self.delta_base = Some(c.delta_base),
            Some(d) if d != c.delta_base => {
                return Err(Error::Integrity(
                    "the download switched between file and delta".into(),
                ))
            }
            Some(_) => {}
        }
        if c.delta_base != 0 && c.delta_base != self.have {
            return Err(Error::Integrity(format!(
                "a delta against version {} while holding {}",
                c.delta_base, self.have
            )));
        }
        match &self.signed {
            None => self.signed = Some((c.parent_version, c.signature.clone())),
            Some((p, s)) if *p != c.parent_version || *s != c.signature => {
                return Err(Error::Integrity(
                    "signature changed during the fetch".into(),
                ))
            }
            Some(_) => {}
        }
        if c.offset != self.buf.len() as u64 {
            return Err(Error::Protocol(format!(
                "chunk at offset {} while expecting {}",
                c.offset,
                self.buf.len()
            )));
        }
        if self.buf.len() as u64 + c.data.len() as u64 > c.total_size {
            return Err(Error::Integrity(
                "more bytes than the announced size".into(),
            ));
        }
        self.buf.extend_from_slice(&c.data);
        Ok(())
    }
}

/// One `FetchModel` call from the current offset until the stream ends; every chunk is
/// appended to the download recorded in the state directory, so a restart resumes it.
async fn fetch_pass(
    client: &mut FedClient,
    state: &StateDir,
    model: &str,
    dl: &mut Download,
) -> Result<(), Error> {
    let req = FetchModelRequest {
        model: model.to_string(),
        version: dl.version,
        offset: dl.buf.len() as u64,
        have_version: dl.have,
    };
    let mut stream = client
        .fetch_model(req)
        .await
        .map_err(rpc_error)?
        .into_inner();
    while let Some(c) = stream.message().await.map_err(rpc_error)? {
        let (fresh, before) = (dl.total.is_none(), dl.buf.len());
        dl.absorb(model, c)?;
        let file = dl.delta_base == Some(0);
        if fresh && file {
            let (parent, signature) = dl.signed.clone().unwrap_or_default();
            state.begin_download(&ModelMeta {
                model: model.to_string(),
                version: dl.version,
                sha256: dl.sha256.clone().unwrap_or_default(),
                size_bytes: dl.total.unwrap_or_default(),
                parent_version: parent,
                signature: hex::encode(signature),
            })?;
        }
        if file {
            state.append_download(model, &dl.buf[before..])?;
        }
        if before == 0 && !dl.complete() {
            test_pause("chunk").await;
        }
        if dl.complete() {
            break;
        }
    }
    Ok(())
}

/// Fetches `version` (0 = latest) in chunks, resuming from the last byte received
/// after an error; `have` (0 = none) is the version the agent holds, offered for a coded
/// delta. Returns the bytes, their description (with their own SHA-256), what the
/// coordinator announced and signed, and the version the bytes are a delta against (0: the
/// ONNX file); [`check_model`] decides whether a file is used.
async fn fetch_model(
    client: &mut FedClient,
    state: &StateDir,
    model: &str,
    version: u64,
    have: u64,
) -> Result<(ModelMeta, Vec<u8>, Signed, u64), Error> {
    let mut dl = match state.load_download(model)? {
        Some(p) if version != 0 && p.meta.version == version => {
            tracing::info!(
                version,
                offset = p.bytes.len(),
                "resuming the model download"
            );
            Download {
                version,
                total: Some(p.meta.size_bytes),
                sha256: Some(p.meta.sha256),
                // What the first chunk carried (a download that was complete when the agent
                // stopped is checked without another chunk).
                signed: Some((
                    p.meta.parent_version,
                    hex::decode(&p.meta.signature).unwrap_or_default(),
                )),
                have: 0,
                delta_base: Some(0),
                buf: p.bytes,
            }
        }
        _ => Download {
            version,
            have,
            ..Download::default()
        },
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempt = 0;
    while !dl.complete() {
        attempt += 1;
        let res =
            tokio::time::timeout(FETCH_TIMEOUT, fetch_pass(client, state, model, &mut dl)).await;
        let err = match res {
            Ok(Ok(())) if dl.complete() => break,
            Ok(Ok(())) => Error::Protocol(format!(
                "stream ended at byte {} of {:?}",
                dl.buf.len(),
                dl.total
            )),
            Ok(Err(e @ Error::Rpc { .. })) if !e.is_transient() => return Err(e),
            Ok(Err(e @ Error::Integrity(_))) => {
                state.clear_download(model)?;
                return Err(e);
            }
            Ok(Err(e)) => e,
            Err(_) => Error::Protocol(format!("fetch timed out after {FETCH_TIMEOUT:?}")),
        };
        if attempt >= FETCH_ATTEMPTS {
            return Err(err);
        }
        tracing::warn!(
            attempt,
            offset = dl.buf.len(),
            "model fetch interrupted, resuming: {err}"
        );
        tokio::time::sleep(backoff.next_wait()).await;
    }
    let sha = sha256_hex(&dl.buf);
    state.clear_download(model)?;
    let (parent, signature) = dl.signed.unwrap_or_default();
    let meta = ModelMeta {
        model: model.to_string(),
        version: dl.version,
        sha256: sha,
        size_bytes: dl.buf.len() as u64,
        parent_version: parent,
        signature: hex::encode(&signature),
    };
    let signed = Signed {
        sha256: dl.sha256.unwrap_or_default(),
        parent,
        signature,
    };
    Ok((meta, dl.buf, signed, dl.delta_base.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, data: &[u8], total: u64, sha: &str) -> ModelChunk {
        ModelChunk {
            model: "faces".into(),
            version: 3,
            total_size: total,
            sha256: sha.into(),
            offset,
            data: data.to_vec(),
            ..ModelChunk::default()
        }
    }

    #[test]
    fn download_checks_offsets_sizes_and_digest_changes() {
        let mut dl = Download::default();
        dl.absorb("faces", chunk(0, b"abc", 5, "aa")).unwrap();
        assert_eq!(dl.version, 3);
        assert!(!dl.complete());
        // A resumed stream must continue exactly where the last one stopped.
        assert!(dl.absorb("faces", chunk(2, b"cd", 5, "aa")).is_err());
        assert!(matches!(
            dl.absorb("faces", chunk(3, b"de", 6, "aa")),
            Err(Error::Integrity(_))
        ));
        assert!(matches!(
            dl.absorb("faces", chunk(3, b"de", 5, "bb")),
            Err(Error::Integrity(_))
        ));
        assert!(matches!(
            dl.absorb("faces", chunk(3, b"def", 5, "aa")),
            Err(Error::Integrity(_))
        ));
        assert!(dl.absorb("plaid", chunk(3, b"de", 5, "aa")).is_err());
        dl.absorb("faces", chunk(3, b"de", 5, "aa")).unwrap();
        assert!(dl.complete());
        assert_eq!(dl.buf, b"abcde");
    }

    #[test]
    fn model_checks_signature_digest_and_lineage() {
        use hearth_proto::signing::ModelSigner;
        let signer = ModelSigner::from_secret(&[5u8; 32]);
        let key = ModelVerifier::from_bytes(&signer.public_key()).unwrap();
        let bytes = b"model bytes";
        let case = |version: u64, parent: u64, name: &str| {
            let sig = signer.sign(&ModelStatement::for_bytes(name, version, parent, bytes));
            let meta = ModelMeta {
                model: "faces".into(),
                version,
                sha256: sha256_hex(bytes),
                size_bytes: bytes.len() as u64,
                ..ModelMeta::default()
            };
            let signed = Signed {
                sha256: sha256_hex(bytes),
                parent,
                signature: sig.to_vec(),
            };
            (meta, signed)
        };
        let reason = |current: u64, (meta, signed): &(ModelMeta, Signed)| {
            check_model(&key, "faces", current, meta, signed, (None, None)).map_err(|e| e.0)
        };
        // Successors of the version in use, including ones that skip missed versions.
        assert_eq!(reason(0, &case(1, 0, "faces")), Ok(()));
        assert_eq!(reason(3, &case(4, 3, "faces")), Ok(()));
        assert_eq!(reason(3, &case(6, 5, "faces")), Ok(()));
        // Not newer (a replay), parent not older than the version, a fork below the current.
        assert_eq!(reason(4, &case(4, 3, "faces")), Err(Refusal::Lineage));
        assert_eq!(reason(4, &case(2, 1, "faces")), Err(Refusal::Lineage));
        assert_eq!(reason(0, &case(3, 3, "faces")), Err(Refusal::Lineage));
        assert_eq!(reason(3, &case(5, 2, "faces")), Err(Refusal::Lineage));
        // Another model's signature, an unsigned model, a digest that is not the bytes'.
        assert_eq!(reason(0, &case(1, 0, "plaid")), Err(Refusal::Signature));
        let (meta, mut signed) = case(1, 0, "faces");
        signed.signature.clear();
        assert_eq!(reason(0, &(meta, signed)), Err(Refusal::Signature));
        let (mut meta, signed) = case(1, 0, "faces");
        meta.sha256 = sha256_hex(b"other bytes");
        assert_eq!(reason(0, &(meta, signed)), Err(Refusal::Digest));
        // The announcement must match too.
        let (meta, signed) = case(1, 0, "faces");
        let r = check_model(&key, "faces", 0, &meta, &signed, (Some("00"), None));
        assert_eq!(r.map_err(|e| e.0), Err(Refusal::Digest));
        let r = check_model(&key, "faces", 0, &meta, &signed, (None, Some(3)));
        assert_eq!(r.map_err(|e| e.0), Err(Refusal::Digest));
    }

    #[test]
    fn statuses_become_domain_errors() {
        let e = rpc_error(Status::permission_denied("bad key"));
        assert!(
            matches!(&e, Error::Rpc { code: RpcCode::PermissionDenied, message } if message == "bad key")
        );
        assert!(!e.is_transient());
        assert!(rpc_error(Status::unavailable("down")).is_transient());
        assert_eq!(
            e.to_string(),
            "coordinator call failed: PermissionDenied: bad key"
        );
    }

    /// A TCP relay to `upstream` that can be frozen: it then moves no byte either way but
    /// holds every socket open (no FIN, no RST), like a coordinator whose host lost power
    /// behind a NAT. Returns its address and the switch.
    async fn freezable_relay(
        upstream: std::net::SocketAddr,
    ) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (freeze, frozen) = watch::channel(false);
        tokio::spawn(async move {
            for _ in 0..16 {
                let Ok((mut a, _)) = l.accept().await else {
                    return;
                };
                let mut b = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let mut frozen = frozen.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => return,
                        _ = async {
                            while !*frozen.borrow_and_update() {
                                if frozen.changed().await.is_err() {
                                    return;
                                }
                            }
                        } => {}
                    }
                    // Frozen: hold both sockets until the test ends.
                    std::future::pending::<()>().await;
                    drop((a, b));
                });
            }
        });
        (addr, freeze)
    }

    /// A coordinator (TLS) behind a [`freezable_relay`], and this agent's enrolment there.
    struct Remote {
        coord: hearth_coordinator::CoordinatorHandle,
        url: String,
        ca: String,
        creds: Credentials,
        freeze: watch::Sender<bool>,
        _db: tempfile::TempDir,
    }

    impl Remote {
        async fn start() -> Remote {
            let db = tempfile::tempdir().unwrap();
            let mut cfg = hearth_coordinator::Config {
                db_path: db.path().join("db"),
                data_dir: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data"),
                admin_token: "timeouts-test-admin-token-0123456789".into(),
                enrollment_tokens: vec!["timeouts-test-token-1".into()],
                models: vec![hearth_coordinator::ModelConfig {
                    name: "digits".into(),
                    task: "digits".into(),
                    init: None,
                    eval: false,
                    seed: 7,
                }],
                ..hearth_coordinator::Config::default()
            };
            // The coordinator's own keepalive closes its side of a frozen connection within
            // 2 s (so that it can shut down); the relay keeps the agent's side open.
            cfg.limits.keepalive_interval_secs = 1;
            cfg.limits.keepalive_timeout_secs = 1;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let coord = hearth_coordinator::start(cfg, listener).await.unwrap();
            let ca = coord.ca_pem().expect("TLS by default").to_string();
            let (relay, freeze) = freezable_relay(coord.local_addr()).await;
            let url = format!("https://{relay}");
            let creds = enroll_once(&url, Some(&ca), "timeouts-test-token-1", "plug")
                .await
                .unwrap();
            Remote {
                coord,
                url,
                ca,
                creds,
                freeze,
                _db: db,
            }
        }

        /// The agent's federation client through the relay, with `limits`.
        fn client(&self, limits: &ChannelLimits) -> FedClient {
            let ch = channel_with(&self.url, Some(&self.ca), Some(&self.creds), limits).unwrap();
            FederationClient::with_interceptor(ch, Auth::new(&self.creds).unwrap())
        }

        async fn stop(self) {
            drop(self.freeze);
            self.coord.shutdown().await.unwrap();
        }
    }

    /// The channel's HTTP/2 keepalive is what finds a coordinator that stopped answering
    /// while the `Subscribe` stream is open (no call is in flight, nothing else would
    /// notice): with pings every second and a one-second answer limit, the stream ends
    /// with an error within a few seconds of the freeze and the subscribe loop can
    /// reconnect. The coordinator's own keepalive does not reach the agent through the
    /// frozen relay (it closes only the coordinator's side).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_channel_keepalive_finds_a_coordinator_that_stopped_answering() {
        let r = Remote::start().await;
        let mut client = r.client(&ChannelLimits {
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(1),
            ..CHANNEL_LIMITS
        });
        let mut stream = open_subscription(&mut client, "digits").await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event in time")
            .unwrap();
        assert!(first.is_some(), "the current version is announced");

        r.freeze.send(true).unwrap();
        let frozen_at = std::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .expect("the stream of a coordinator that stopped answering is still open");
        let took = frozen_at.elapsed();
        assert!(end.is_err(), "the stream ends with an error: {end:?}");
        assert!(took < Duration::from_secs(6), "found only after {took:?}");
        r.stop().await;
    }

    /// The agent's client through the relay with the keepalive an hour away (so only the
    /// per-call limits can end a call), its connection up and serving, then frozen.
    async fn frozen_client() -> (Remote, FedClient) {
        let r = Remote::start().await;
        let mut client = r.client(&ChannelLimits {
            keepalive_interval: Duration::from_secs(3600),
            keepalive_timeout: Duration::from_secs(3600),
            ..CHANNEL_LIMITS
        });
        assert!(version_exists(&mut client, "digits", 1).await.unwrap());
        r.freeze.send(true).unwrap();
        (r, client)
    }

    /// Each per-call limit ends its call on a coordinator that stopped answering in about
    /// the limit (3 s in unit tests), instead of waiting forever.
    const CALL_BOUND: Duration = Duration::from_secs(15);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opening_subscribe_on_a_coordinator_that_stopped_answering_times_out() {
        let (r, mut client) = frozen_client().await;
        let t = std::time::Instant::now();
        let e = tokio::time::timeout(CALL_BOUND, open_subscription(&mut client, "digits"))
            .await
            .expect("opening Subscribe waited on")
            .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        r.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_check_on_a_coordinator_that_stopped_answering_times_out() {
        let (r, mut client) = frozen_client().await;
        let t = std::time::Instant::now();
        let e = tokio::time::timeout(CALL_BOUND, version_exists(&mut client, "digits", 1))
            .await
            .expect("the version check waited on")
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        r.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_to_a_coordinator_that_stopped_answering_times_out() {
        let (r, mut client) = frozen_client().await;
        let header = UpdateHeader {
            model: "digits".into(),
            round_id: 1,
            ..UpdateHeader::default()
        };
        let t = std::time::Instant::now();
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        let e = tokio::time::timeout(CALL_BOUND, upload(&mut client, &header, &[1, 2, 3], until))
            .await
            .expect("the upload waited on")
            .unwrap_err();
        assert!(e.to_string().contains("upload timed out"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        r.stop().await;
    }

    #[test]
    fn round_seeds_differ_per_device_and_round() {
        assert_ne!(round_seed("a", 1), round_seed("b", 1));
        assert_ne!(round_seed("a", 1), round_seed("a", 2));
        assert_eq!(round_seed("a", 7), round_seed("a", 7));
    }
}
