//! Home aggregator mode (`[upstream]`): a coordinator that serves one home's agents exactly
//! like an ordinary one — its own CA and enrolment, `Subscribe`, `FetchModel`, `UploadUpdate`
//! with the same validation, norm bounds, sample-count caps and folding ([`crate::rounds`],
//! [`crate::aggregate`], [`crate::robust`]) — but whose models and rounds belong to an
//! upstream coordinator, to which it is one client:
//!
//! - **Identity**: at first start it enrols upstream with `upstream.enrollment_token` (a key
//!   made here, a CSR, the certificate back) and keeps the identity and the upstream's
//!   model-signing key in `credentials_file` (0600). The key its own clients pin at
//!   enrolment is the upstream's.
//! - **Versions**: it follows the upstream's `Subscribe` stream; a published version is
//!   fetched, checked like an agent checks it (signature with the pinned upstream key,
//!   digest, lineage) and stored with the upstream's metadata and signature unchanged, then
//!   announced to the local clients, who verify the same signature.
//! - **Rounds**: an upstream round task opens a local round with the same task and base
//!   version; it closes `upload_margin_secs` before the upstream deadline (or when
//!   `round.max_clients` local updates are in) and its combination — the weighted mean of
//!   the running sum, or the robust combination, exactly as a coordinator computes it before
//!   its server step — is coded with the update codec (the task's bits, dense) and uploaded
//!   to the upstream round as *one* update whose sample count is the round's total weight.
//!   The upstream therefore never receives a single device's update.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_edge::Backoff;
use hearth_model::update::CodecConfig;
use hearth_model::{OnnxModel, Weights};
use hearth_proto::signing::{hex_encode, ModelStatement, ModelVerifier};
use hearth_proto::v1::{
    self, enrollment_client::EnrollmentClient, federation_client::FederationClient,
    federation_event, update_chunk, FetchModelRequest, RoundTask, SubscribeRequest, UpdateChunk,
    UpdateHeader, UploadAck,
};
use hearth_proto::{CHUNK_SIZE, CLIENT_ID_HEADER, CLIENT_KEY_HEADER};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::Code;

use crate::config::{ClientOptimizer, ClientTraining, Config};
use crate::metrics::labels;
use crate::rounds::{Mirror, StartRound};
use crate::state::{blocking_task, sha256_hex, stopped, Coordinator, Event};
use crate::store::{now_unix_ms, RoundRecord, RoundState, TaskParams, VersionMeta};
use crate::Error;

/// Time allowed for the enrolment call.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for one model download.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Time allowed for one upload attempt.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest model accepted from upstream.
const MAX_MODEL_BYTES: u64 = 64 * 1024 * 1024;

/// The aggregator's identity at the upstream coordinator, as stored (0600).
#[derive(Clone, Serialize, Deserialize)]
struct Identity {
    /// The upstream URL it was issued by.
    url: String,
    client_id: String,
    /// Insecure upstream only: the shared key.
    #[serde(default)]
    client_key: String,
    #[serde(default)]
    cert_pem: String,
    #[serde(default)]
    key_pem: String,
    #[serde(default)]
    ca_pem: String,
    /// The upstream's model-signing key as it returned it at enrolment (hex).
    #[serde(default)]
    model_signing_key: String,
}

/// The link to the upstream coordinator: a lazily connecting channel with the aggregator's
/// client certificate, and the pinned upstream model-signing key.
pub struct Upstream {
    url: String,
    client_id: String,
    channel: Channel,
    /// Insecure upstream: (client id, key) sent as metadata.
    id_key: Option<(MetadataValue<Ascii>, MetadataValue<Ascii>)>,
    verifier: ModelVerifier,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn unreachable_at(url: &str, e: impl std::fmt::Display) -> Error {
    Error::Upstream(format!("{url}: {e}"))
}

/// Whether a refused call may succeed when tried again.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}

/// A key pair made here (ECDSA P-256) and a CSR for it: (key PEM, CSR PEM).
fn key_and_csr(device: &str) -> Result<(String, String), Error> {
    let fail = |e: rcgen::Error| Error::Init(format!("cannot make the aggregator's key: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device);
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok((key.serialize_pem(), csr.pem().map_err(fail)?))
}

fn read_identity(path: &Path) -> Result<Option<Identity>, Error> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::Init(format!(
                "upstream credentials {} are unreadable: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Init(format!("{}: {e}", path.display()))),
    }
}

fn write_identity(path: &Path, ident: &Identity) -> Result<(), Error> {
    use hearth_edge::fsutil::{write_atomic, PRIVATE};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Init(format!("{}: {e}", dir.display())))?;
    }
    let bytes = serde_json::to_vec_pretty(ident).expect("identity serialises");
    write_atomic(path, &bytes, PRIVATE)
        .map_err(|e| Error::Init(format!("cannot write {}: {e}", path.display())))
}

/// One enrolment at `url`: trades `token` for an identity (over TLS: a CSR for a key made
/// here). An unreachable upstream is [`Error::Upstream`]; a refusal is [`Error::Init`].
async fn enroll(url: &str, ca: Option<&str>, token: &str, device: &str) -> Result<Identity, Error> {
    let tls = url.starts_with("https://");
    let (key_pem, csr_pem) = if tls {
        key_and_csr(device)?
    } else {
        (String::new(), String::new())
    };
    let ep = crate::client::endpoint(url, ca, None)
        .map_err(|e| Error::Init(format!("upstream.url {url:?}: {e}")))?
        .timeout(ENROLL_TIMEOUT);
    let channel = tokio::time::timeout(ENROLL_TIMEOUT, ep.connect())
        .await
        .map_err(|_| unreachable_at(url, "connection timed out"))?
        .map_err(|e| unreachable_at(url, e))?;
    let r = EnrollmentClient::new(channel)
        .enroll(v1::EnrollRequest {
            token: token.to_string(),
            device_name: device.to_string(),
            csr_pem,
        })
        .await
        .map_err(|s| {
            if transient(s.code()) {
                unreachable_at(url, format!("{:?}: {}", s.code(), s.message()))
            } else {
                Error::Init(format!(
                    "the upstream coordinator refused the enrolment: {:?}: {}",
                    s.code(),
                    s.message()
                ))
            }
        })?
        .into_inner();
    let complete = if tls {
        !r.client_cert_pem.is_empty()
    } else {
        !r.client_key.is_empty()
    };
    if r.client_id.is_empty() || !complete {
        return Err(Error::Init(
            "the upstream enrolment returned an empty identity".into(),
        ));
    }
    Ok(Identity {
        url: url.to_string(),
        client_id: r.client_id,
        client_key: r.client_key,
        cert_pem: r.client_cert_pem,
        key_pem,
        ca_pem: if r.ca_cert_pem.is_empty() {
            ca.unwrap_or_default().to_string()
        } else {
            r.ca_cert_pem
        },
        model_signing_key: hex_encode(&r.model_signing_key),
    })
}

impl Upstream {
    /// Loads the stored upstream identity, or enrols with `upstream.enrollment_token` and
    /// stores it; then pins the upstream's model-signing key (the configured one wins; both
    /// present and different is an error). Needs a valid config with `[upstream]`.
    pub async fn connect(config: &Config) -> Result<Upstream, Error> {
        let u = config
            .upstream
            .as_ref()
            .ok_or_else(|| Error::Init("no [upstream] section".into()))?;
        let path = config.upstream_credentials_path();
        let ca = match &u.ca_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| Error::Init(format!("upstream.ca_file {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let ident = match read_identity(&path)? {
            Some(i) if i.url == u.url => i,
            stored => {
                if let Some(i) = stored {
                    tracing::info!(old = %i.url, new = %u.url, "stored upstream identity is for another URL: enrolling again");
                }
                let token = u.enrollment_token.as_deref().ok_or_else(|| {
                    Error::Init(format!(
                        "no upstream identity in {} and no upstream.enrollment_token to enrol \
                         with (make one on the upstream coordinator: hearth-coordinator \
                         enroll-token)",
                        path.display()
                    ))
                })?;
                let ident = enroll(&u.url, ca.as_deref(), token, &u.device_name).await?;
                write_identity(&path, &ident)?;
                tracing::info!(client_id = %ident.client_id, upstream = %u.url, "enrolled with the upstream coordinator");
                ident
            }
        };
        let enrolled = (!ident.model_signing_key.is_empty())
            .then(|| ModelVerifier::from_hex(&ident.model_signing_key))
            .transpose()
            .map_err(|e| Error::Init(format!("stored upstream signing key: {e}")))?;
        let configured = u
            .model_signing_key
            .as_deref()
            .map(ModelVerifier::from_hex)
            .transpose()
            .map_err(|e| Error::Init(format!("upstream.model_signing_key: {e}")))?;
        let verifier = match (configured, enrolled) {
            (Some(c), Some(e)) if c != e => {
                return Err(Error::Init(
                    "upstream.model_signing_key differs from the key the upstream coordinator \
                     gave at enrolment"
                        .into(),
                ))
            }
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) => {
                return Err(Error::Init(
                    "no upstream model-signing key: set upstream.model_signing_key".into(),
                ))
            }
        };
        let tls = u.url.starts_with("https://");
        let ca_pem = ca.unwrap_or_else(|| ident.ca_pem.clone());
        let identity = (tls && !ident.cert_pem.is_empty())
            .then_some((ident.cert_pem.as_str(), ident.key_pem.as_str()));
        let channel = crate::client::endpoint(&u.url, tls.then_some(ca_pem.as_str()), identity)
            .map_err(|e| Error::Init(format!("upstream.url {:?}: {e}", u.url)))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let id_key = if ident.client_key.is_empty() {
            None
        } else {
            let v = |s: &str| {
                MetadataValue::try_from(s).map_err(|_| {
                    Error::Init("stored upstream identity is not valid metadata".into())
                })
            };
            Some((v(&ident.client_id)?, v(&ident.client_key)?))
        };
        tracing::info!(
            upstream = %u.url, client_id = %ident.client_id, key = %verifier.to_hex(),
            "home aggregator: versions must be signed with the upstream's key"
        );
        Ok(Upstream {
            url: u.url.clone(),
            client_id: ident.client_id,
            channel,
            id_key,
            verifier,
        })
    }

    /// The upstream's model-signing public key (what local clients pin at enrolment).
    pub fn model_signing_key(&self) -> [u8; 32] {
        self.verifier.to_bytes()
    }

    /// The aggregator's client id at the upstream coordinator.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn federation(&self) -> FederationClient<Channel> {
        FederationClient::new(self.channel.clone())
            .max_decoding_message_size(4 * CHUNK_SIZE)
            .max_encoding_message_size(4 * CHUNK_SIZE)
    }

    /// `msg` with the insecure-mode credentials (over TLS the certificate is the identity).
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some((id, key)) = &self.id_key {
            req.metadata_mut().insert(CLIENT_ID_HEADER, id.clone());
            req.metadata_mut().insert(CLIENT_KEY_HEADER, key.clone());
        }
        req
    }

    fn status(&self, s: tonic::Status) -> Error {
        Error::Upstream(format!("{}: {:?}: {}", self.url, s.code(), s.message()))
    }

    /// Downloads version `version` of `model` (the whole file) and checks it as an agent
    /// does: size, offsets, the signed digest and the signature with the pinned key. Returns
    /// the metadata (signature and lineage unchanged) and the bytes.
    async fn fetch(&self, model: &str, version: u64) -> Result<(VersionMeta, Vec<u8>), Error> {
        let call = async {
            let mut stream = self
                .federation()
                .fetch_model(self.request(FetchModelRequest {
                    model: model.to_string(),
                    version,
                    offset: 0,
                    have_version: 0,
                }))
                .await
                .map_err(|s| self.status(s))?
                .into_inner();
            let mut bytes = Vec::new();
            let mut head: Option<v1::ModelChunk> = None;
            while let Some(mut c) = stream.message().await.map_err(|s| self.status(s))? {
                let bad = |m: String| Error::Upstream(format!("download of {model}: {m}"));
                if c.model != model || c.delta_base != 0 || c.total_size > MAX_MODEL_BYTES {
                    return Err(bad("unexpected chunk (model, delta or size)".into()));
                }
                if c.offset != bytes.len() as u64
                    || bytes.len() as u64 + c.data.len() as u64 > c.total_size
                {
                    return Err(bad(format!("chunk at offset {} does not fit", c.offset)));
                }
                match &head {
                    None => bytes.reserve(c.total_size as usize),
                    Some(h)
                        if (
                            h.version,
                            h.total_size,
                            &h.sha256,
                            h.parent_version,
                            &h.signature,
                        ) != (
                            c.version,
                            c.total_size,
                            &c.sha256,
                            c.parent_version,
                            &c.signature,
                        ) =>
                    {
                        return Err(bad("chunks of different versions".into()));
                    }
                    Some(_) => {}
                }
                bytes.append(&mut c.data);
                head = Some(c);
            }
            let h = head.ok_or_else(|| Error::Upstream(format!("empty download of {model}")))?;
            if bytes.len() as u64 != h.total_size {
                return Err(Error::Upstream(format!(
                    "download of {model} v{} ended at {} of {} bytes",
                    h.version,
                    bytes.len(),
                    h.total_size
                )));
            }
            Ok((h, bytes))
        };
        let (h, bytes) = tokio::time::timeout(FETCH_TIMEOUT, call)
            .await
            .map_err(|_| Error::Upstream(format!("download of {model} timed out")))??;
        let statement = ModelStatement::for_bytes(model, h.version, h.parent_version, &bytes);
        if hex_encode(&statement.sha256) != h.sha256.to_ascii_lowercase() {
            return Err(Error::Upstream(format!(
                "{model} v{}: the bytes do not hash to the signed digest",
                h.version
            )));
        }
        self.verifier
            .verify(&statement, &h.signature)
            .map_err(|e| Error::Upstream(format!("{model} v{}: {e}", h.version)))?;
        let meta = VersionMeta {
            model: model.to_string(),
            version: h.version,
            sha256: h.sha256.to_ascii_lowercase(),
            size_bytes: h.total_size,
            eval_accuracy: None,
            created_unix_ms: now_unix_ms(),
            from_round: 0,
            parent_version: h.parent_version,
            signature: hex_encode(&h.signature),
            rollback_of: 0,
        };
        Ok((meta, bytes))
    }

    /// Uploads one update (header, then `CHUNK_SIZE` pieces), retrying transient failures
    /// with the same bytes until `until_unix_ms`; the upstream deduplicates per (round,
    /// client).
    async fn upload(
        &self,
        header: &UpdateHeader,
        payload: &[u8],
        until_unix_ms: u64,
    ) -> Result<UploadAck, Error> {
        let mut backoff = Backoff::new(Duration::from_millis(300), Duration::from_secs(5));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let parts: Vec<UpdateChunk> =
                std::iter::once(update_chunk::Part::Header(header.clone()))
                    .chain(
                        payload
                            .chunks(CHUNK_SIZE)
                            .map(|c| update_chunk::Part::Data(c.to_vec())),
                    )
                    .map(|p| UpdateChunk { part: Some(p) })
                    .collect();
            let mut client = self.federation();
            let call = client.upload_update(self.request(tokio_stream::iter(parts)));
            let err = match tokio::time::timeout(UPLOAD_TIMEOUT, call).await {
                Ok(Ok(ack)) => return Ok(ack.into_inner()),
                Ok(Err(s)) if !transient(s.code()) => return Err(self.status(s)),
                Ok(Err(s)) => self.status(s),
                Err(_) => Error::Upstream(format!("{}: upload timed out", self.url)),
            };
            let wait = backoff.next_wait();
            if now_unix_ms() + wait.as_millis() as u64 >= until_unix_ms {
                return Err(err);
            }
            tracing::warn!(attempt, error = %err, "upstream upload failed, retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// The task of an upstream round as a local round carries it. An unspecified client
/// optimizer is what agents then do (momentum 0.9), said explicitly.
fn task_params(t: &RoundTask) -> TaskParams {
    let client = match t.client_optimizer() {
        v1::ClientOptimizer::Sgd => ClientTraining {
            optimizer: ClientOptimizer::Sgd,
            momentum: t.client_momentum,
            proximal_mu: t.proximal_mu,
        },
        v1::ClientOptimizer::Momentum => ClientTraining {
            optimizer: ClientOptimizer::Momentum,
            momentum: t.client_momentum,
            proximal_mu: t.proximal_mu,
        },
        v1::ClientOptimizer::Unspecified => ClientTraining {
            proximal_mu: t.proximal_mu,
            ..ClientTraining::default()
        },
    };
    TaskParams {
        local_epochs: t.local_epochs,
        learning_rate: t.learning_rate,
        batch_size: t.batch_size,
        clip_norm: t.clip_norm,
        quant_bits: t.quant_bits,
        topk_fraction: t.topk_fraction,
        client,
        eval_fraction: t.eval_fraction,
    }
}

/// Follows the upstream's `Subscribe` stream until shutdown, reconnecting with the edge
/// [`Backoff`] (reset once a session delivered something): versions are imported, round
/// tasks mirrored.
pub(crate) async fn follow(coord: Arc<Coordinator>) {
    let Some(up) = coord.upstream().cloned() else {
        return;
    };
    let mut stop = coord.shutdown_signal();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        if *stop.borrow() {
            return;
        }
        let (handled, err) = tokio::select! {
            r = session(&coord, &up) => r,
            _ = stopped(&mut stop) => return,
        };
        tracing::warn!(upstream = %up.url, error = ?err, "upstream stream ended; reconnecting");
        if handled > 0 {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_wait()) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// One subscription: how many events it handled, and the error that ended it.
async fn session(coord: &Arc<Coordinator>, up: &Upstream) -> (u64, Option<Error>) {
    let req = up.request(SubscribeRequest {
        models: coord.model_names(),
    });
    let mut stream = match up.federation().subscribe(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => return (0, Some(up.status(s))),
    };
    tracing::info!(upstream = %up.url, "home aggregator following the upstream coordinator");
    let mut handled = 0u64;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return (handled, None),
            Err(s) => return (handled, Some(up.status(s))),
        };
        handled += 1;
        let r = match ev.event {
            Some(federation_event::Event::Published(p)) => {
                coord.import_version(&p.model, p.version).await.map(|_| ())
            }
            Some(federation_event::Event::Round(t)) => coord.mirror_round(&t).await,
            None => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "home aggregator: an upstream event could not be followed");
        }
    }
}

impl Coordinator {
    /// Fetches, checks and stores version `version` of `model` from upstream (unless it
    /// is not newer than the local latest), then announces it to local clients. Returns the
    /// stored metadata. A refused version is logged and counted, and nothing is stored.
    pub(crate) async fn import_version(
        self: &Arc<Self>,
        model: &str,
        version: u64,
    ) -> Result<Option<VersionMeta>, Error> {
        let Some(up) = self.upstream.clone() else {
            return Ok(None);
        };
        if !self.has_model(model) {
            return Ok(None);
        }
        let latest = self.store.latest_version(model)?.map_or(0, |v| v.version);
        if version <= latest {
            return Ok(None);
        }
        let (meta, bytes) = match up.fetch(model, version).await {
            Ok(v) => v,
            Err(e) => {
                self.metrics
                    .reject("import", "upstream_model", &up.client_id, &e);
                return Err(e);
            }
        };
        // Lineage as an agent checks it: a successor of the version held.
        if !(meta.parent_version < meta.version && meta.parent_version >= latest) {
            let e = Error::Upstream(format!(
                "{model} v{} (parent {}) is not a successor of the local v{latest}",
                meta.version, meta.parent_version
            ));
            self.metrics.reject("import", "lineage", &up.client_id, &e);
            return Err(e);
        }
        let check = bytes.clone();
        if let Err(e) = blocking_task(move || OnnxModel::from_bytes(&check).map(|_| ())).await? {
            self.metrics
                .reject("import", "upstream_model", &up.client_id, &e);
            return Err(e.into());
        }
        self.store.put_version(&meta, &bytes)?;
        self.store.flush().await?;
        tracing::info!(
            model,
            version = meta.version,
            parent = meta.parent_version,
            "upstream version verified, stored and announced"
        );
        self.metrics.inc(
            "hearth_aggregator_versions_imported_total",
            labels(&[("model", model)]),
        );
        self.publish(Event::Published(meta.clone()));
        Ok(Some(meta))
    }

    /// Opens the local round of upstream round task `t` (once per upstream round): the
    /// same task and base version, closing `upload_margin_secs` before the upstream
    /// deadline. A local round of an earlier upstream round still open is failed: the
    /// upstream moved on and its aggregate could not be counted any more.
    pub(crate) async fn mirror_round(self: &Arc<Self>, t: &RoundTask) -> Result<(), Error> {
        if !self.has_model(&t.model) {
            return Ok(());
        }
        if let Some(r) = self.store.latest_round(&t.model)? {
            if r.upstream_round >= t.round_id {
                return Ok(());
            }
            if r.state == RoundState::Open {
                self.abandon_round(
                    r.id,
                    &format!(
                        "the upstream opened round {} before this round's aggregate was sent",
                        t.round_id
                    ),
                )
                .await?;
            }
        }
        if t.not_selected {
            tracing::info!(model = %t.model, upstream_round = t.round_id, "the upstream did not select this home for its round");
            return Ok(());
        }
        if self.store.version(&t.model, t.base_version)?.is_none() {
            self.import_version(&t.model, t.base_version).await?;
            if self.store.version(&t.model, t.base_version)?.is_none() {
                return Err(Error::Upstream(format!(
                    "base version {} of {} is not available",
                    t.base_version, t.model
                )));
            }
        }
        let margin = self
            .config
            .upstream
            .as_ref()
            .map_or(0, |u| u64::from(u.upload_margin_secs) * 1000);
        let close = t.deadline_unix_ms.saturating_sub(margin);
        if close <= now_unix_ms() + 1000 {
            tracing::warn!(
                model = %t.model, upstream_round = t.round_id,
                "too late to run a local round before the upstream deadline: skipped"
            );
            return Ok(());
        }
        let rec = self
            .open_round(
                StartRound {
                    model: t.model.clone(),
                    reason: "upstream".into(),
                    ..StartRound::default()
                },
                Some(Mirror {
                    upstream_round: t.round_id,
                    base_version: t.base_version,
                    upstream_deadline_unix_ms: t.deadline_unix_ms,
                    close_unix_ms: close,
                    task: task_params(t),
                }),
            )
            .await
            .map_err(|e| Error::Internal(format!("cannot open the local round: {e}")))?;
        tracing::info!(
            model = %rec.model, round = rec.id, upstream_round = t.round_id,
            base = rec.base_version, "local round opened for the upstream round"
        );
        Ok(())
    }

    /// Fails open round `id` with `detail` (under the round's locks).
    async fn abandon_round(self: &Arc<Self>, id: u64, detail: &str) -> Result<(), Error> {
        let lock = self.round_lock(id);
        // Every accept permit: no upload is being folded while the round fails.
        let _guard = lock
            .acquire_many(self.store.accept_concurrency())
            .await
            .map_err(|e| Error::Internal(format!("round lock: {e}")))?;
        let _closing = self.store.lock_round(id)?;
        if self
            .store
            .round(id)?
            .is_some_and(|r| r.state == RoundState::Open)
        {
            self.store.fail_round(id, detail)?;
            self.store.flush().await?;
            tracing::warn!(round = id, detail, "local round abandoned");
        }
        drop(_closing);
        drop(_guard);
        self.drop_round_lock(id);
        Ok(())
    }

    /// Sends the closing round `rec`'s aggregate upstream as one update — the combination a
    /// coordinator would apply its server step to, coded with the update codec — with the
    /// round's total weight as its sample count, and closes the round: completed when the
    /// upstream accepted it, failed otherwise. The caller holds the round's locks.
    pub(crate) async fn forward(self: &Arc<Self>, rec: &RoundRecord) -> Result<(), Error> {
        let up = self
            .upstream
            .clone()
            .ok_or_else(|| Error::Internal("not a home aggregator".into()))?;
        let (delta, how) = self.round_delta(rec).await?;
        // Dense at the round's bits, compact: the same form an agent's upload takes.
        let cfg = CodecConfig::dense(rec.task.quant_bits as u8);
        let seed = rec.id ^ rec.upstream_round.rotate_left(32);
        let payload = blocking_task(move || {
            let mut residual = Weights::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            hearth_model::encode_update(&delta, &mut residual, &cfg, &mut rng)
        })
        .await??;
        let markers = self.store.markers(rec.id)?;
        let weight: f64 = markers.iter().map(|m| m.num_samples as f64).sum();
        let train_loss = if weight > 0.0 {
            markers
                .iter()
                .map(|m| f64::from(m.train_loss) * m.num_samples as f64)
                .sum::<f64>()
                / weight
        } else {
            0.0
        } as f32;
        let n = rec.fed_eval_samples;
        let (eval_loss, eval_accuracy) = if n > 0 {
            (
                (rec.fed_eval_loss_sum / n as f64) as f32,
                ((rec.fed_eval_correct / n as f64) as f32).clamp(0.0, 1.0),
            )
        } else {
            (0.0, 0.0)
        };
        let header = UpdateHeader {
            model: rec.model.clone(),
            round_id: rec.upstream_round,
            base_version: rec.base_version,
            num_samples: rec.total_samples,
            train_loss,
            payload_size: payload.len() as u64,
            payload_sha256: sha256_hex(&payload),
            eval_samples: n,
            eval_loss,
            eval_accuracy,
        };
        let outcome = up
            .upload(&header, &payload, rec.upstream_deadline_unix_ms)
            .await;
        let count = |o: &str| {
            self.metrics.inc(
                "hearth_aggregator_upstream_uploads_total",
                labels(&[("model", &rec.model), ("outcome", o)]),
            )
        };
        match outcome {
            Ok(ack) if ack.accepted => {
                let detail = format!(
                    "{how} of {} local updates ({} samples) sent to upstream round {} as one \
                     update of {} bytes{}",
                    rec.updates,
                    rec.total_samples,
                    rec.upstream_round,
                    payload.len(),
                    if ack.duplicate {
                        " (already received)"
                    } else {
                        ""
                    }
                );
                self.store.forward_round(rec.id, &detail)?;
                self.store.flush().await?;
                count("accepted");
                self.metrics.add(
                    "hearth_aggregator_updates_folded_total",
                    labels(&[("model", &rec.model)]),
                    u64::from(rec.updates),
                );
                tracing::info!(model = %rec.model, round = rec.id, upstream_round = rec.upstream_round, %detail, "home aggregate accepted upstream");
            }
            Ok(ack) => {
                let detail = format!("the upstream refused the home's aggregate: {}", ack.reason);
                self.store.fail_round(rec.id, &detail)?;
                self.store.flush().await?;
                count("refused");
                tracing::warn!(model = %rec.model, round = rec.id, %detail, "round failed");
            }
            Err(e) => {
                let detail = format!("the home's aggregate could not be sent upstream: {e}");
                self.store.fail_round(rec.id, &detail)?;
                self.store.flush().await?;
                count("failed");
                tracing::warn!(model = %rec.model, round = rec.id, %detail, "round failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_keeps_the_upstream_optimizer_and_names_the_default() {
        let mut t = RoundTask {
            quant_bits: 8,
            client_optimizer: v1::ClientOptimizer::Sgd as i32,
            proximal_mu: 0.5,
            ..RoundTask::default()
        };
        let p = task_params(&t);
        assert_eq!(p.client.optimizer, ClientOptimizer::Sgd);
        assert_eq!(p.client.proximal_mu, 0.5);
        t.client_optimizer = v1::ClientOptimizer::Unspecified as i32;
        let p = task_params(&t);
        assert_eq!(
            (p.client.optimizer, p.client.momentum),
            (ClientOptimizer::Momentum, 0.9)
        );
    }
}
