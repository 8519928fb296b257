//! The coordinator's shared state and its domain operations that are not about rounds:
//! start-up of the served models (version 1, held-out sets), the PKI, enrollment (CSR →
//! client certificate), authentication (client certificate or, insecure, shared key),
//! revocation,
//! model lookup, the event broadcast, the tracker of background tasks, and which clients are
//! available for a model (holding a `Subscribe` stream for it, or recently), which client
//! selection draws a round's cohort from.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_model::{Dataset, OnnxModel, Split, TaskSpec, Weights};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use hearth_proto::signing::ModelSigner;

use crate::config::{Config, ModelConfig};
use crate::metrics::Metrics;
use crate::pki::Pki;
use crate::store::{
    now_unix_ms, ClientRecord, MarkAvailable, RoundRecord, Store, StoreError, TokenRecord,
    VersionMeta,
};
use crate::Error;

/// Something subscribers are told about.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A round opened (or, on a resync, is open).
    RoundOpened(RoundRecord),
    /// A model version was published.
    Published(VersionMeta),
}

/// Authentication failures.
#[derive(thiserror::Error, Debug, PartialEq)]
pub enum AuthError {
    /// Credentials missing.
    #[error("missing credentials")]
    Missing,
    /// Credentials wrong.
    #[error("invalid credentials")]
    Invalid,
    /// TLS: the call came without a client certificate.
    #[error("no client certificate: this call needs the certificate issued at enrolment (hearth-agent enroll --token ...)")]
    NoCertificate,
    /// TLS: a certificate of this CA, but not the one issued last to an enrolled client.
    #[error("client certificate {0:?} is not enrolled here (or was replaced)")]
    NotEnrolled(String),
    /// The client was revoked.
    #[error("client {0} was revoked")]
    Revoked(String),
}

impl AuthError {
    /// The metrics reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_credentials",
            AuthError::Invalid => "bad_credentials",
            AuthError::NoCertificate => "no_client_cert",
            AuthError::NotEnrolled(_) => "not_enrolled",
            AuthError::Revoked(_) => "revoked",
        }
    }
}

/// Enrollment failures.
#[derive(thiserror::Error, Debug)]
pub enum EnrollError {
    /// Token unknown or used up.
    #[error("enrollment token unknown or already used")]
    Token,
    /// Token expired.
    #[error("enrollment token expired; make a new one (hearth-coordinator enroll-token)")]
    TokenExpired,
    /// Token made for another device.
    #[error("enrollment token was issued for device {0:?}")]
    TokenDevice(String),
    /// Bad device name.
    #[error("device_name must be 1-128 printable characters")]
    DeviceName,
    /// TLS: no usable certificate signing request.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// Storage failure.
    #[error(transparent)]
    Store(StoreError),
}

impl EnrollError {
    /// The metrics reason.
    pub fn reason(&self) -> &'static str {
        match self {
            EnrollError::Token => "bad_token",
            EnrollError::TokenExpired => "token_expired",
            EnrollError::TokenDevice(_) => "token_device",
            EnrollError::DeviceName => "bad_device_name",
            EnrollError::Csr(_) => "bad_csr",
            EnrollError::Store(_) => "storage",
        }
    }
}

/// A new client identity.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// Client id (the CN of its certificate).
    pub client_id: String,
    /// Insecure mode: the shared key; empty with TLS.
    pub client_key: String,
    /// TLS: the client certificate (PEM); empty in insecure mode.
    pub cert_pem: String,
    /// TLS: the CA certificate (PEM).
    pub ca_pem: String,
}

/// A token made by [`Coordinator::create_token`].
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The token.
    pub token: String,
    /// Expiry, Unix ms.
    pub expires_unix_ms: u64,
}

/// Hex sha256.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `n` random bytes from the OS, hex encoded.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Shared coordinator state.
pub struct Coordinator {
    pub(crate) config: Config,
    pub(crate) store: Store,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) eval_sets: HashMap<String, Arc<Dataset>>,
    /// Per open round: `Store::accept_concurrency` permits; an accept holds one, closing
    /// holds them all.
    pub(crate) round_locks: Mutex<HashMap<u64, Arc<tokio::sync::Semaphore>>>,
    pub(crate) global_cache: Mutex<HashMap<String, (u64, Arc<Weights>)>>,
    pub(crate) tasks: Mutex<JoinSet<()>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Arc<Metrics>,
    /// Signs every published version (`crate::signing`).
    pub(crate) signer: Arc<ModelSigner>,
    /// The CA and server identity; `None` in insecure mode.
    pub(crate) pki: Option<Arc<Pki>>,
    /// Bumped at every revocation, so open streams re-check their client.
    pub(crate) revocations: watch::Sender<u64>,
    /// Which clients follow which model (client selection's "available").
    pub(crate) presence: Arc<Mutex<Presence>>,
    /// Home aggregator mode: the upstream coordinator ([`crate::upstream`]).
    pub(crate) upstream: Option<Arc<crate::upstream::Upstream>>,
}

/// How long this instance counts as alive after a heartbeat (`Store::heartbeat`, every third
/// of it): the clients of its live `Subscribe` streams are available while it is, so those of
/// an instance that died drop out within this.
pub const PRESENCE_LEASE_MS: u64 = 30_000;

/// This instance's live `Subscribe` streams, per client and model (the store holds the
/// availability every instance draws from; this counts streams so the store hears of a
/// client's first and last one here). Holds entries only for clients with a stream open here.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    by_client: HashMap<String, HashMap<String, u32>>,
}

/// Held by a `Subscribe` stream: the client is available for its models until it is dropped,
/// and for `available_window_secs` after.
#[derive(Debug)]
pub struct PresenceGuard {
    presence: Arc<Mutex<Presence>>,
    store: Store,
    window_ms: u64,
    client: String,
    models: Vec<String>,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let mut ended = Vec::new();
        {
            let mut p = self.presence.lock().expect("presence lock");
            if let Some(m) = p.by_client.get_mut(&self.client) {
                for model in &self.models {
                    if let Some(n) = m.get_mut(model) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            m.remove(model);
                            ended.push(model.clone());
                        }
                    }
                }
                if m.is_empty() {
                    p.by_client.remove(&self.client);
                }
            }
        }
        let until = MarkAvailable::Until(now_unix_ms().saturating_add(self.window_ms));
        for model in ended {
            let c = [self.client.clone()];
            if let Err(e) = self.store.mark_available(&model, &c, until) {
                tracing::warn!(client = %self.client, error = %e, "cannot record the end of a subscription");
            }
        }
    }
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("models", &self.config.models.len())
            .finish_non_exhaustive()
    }
}

/// Capacity of the event broadcast; slower subscribers get `Lagged` and resync.
const EVENT_CAPACITY: usize = 256;

/// Resolves once `rx` reads `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Runs CPU or disk work on the blocking pool.
pub(crate) async fn blocking_task<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    blocking_task(f).await?
}

impl Coordinator {
    /// Opens the store, seeds tokens, creates version 1 of every model that has none and loads
    /// the held-out sets. `config` must be valid. With `upstream` (a home aggregator) no
    /// version is made or signed here: versions come from upstream with its signatures, and
    /// the key clients pin at enrolment is the upstream's.
    pub async fn new(
        config: Config,
        shutdown: watch::Receiver<bool>,
        upstream: Option<Arc<crate::upstream::Upstream>>,
    ) -> Result<Arc<Self>, Error> {
        let store = open_store(&config).await?;
        let pki = if config.insecure {
            tracing::warn!("insecure = true: plaintext gRPC, shared-key client credentials");
            None
        } else {
            let (dir, names) = (config.pki_dir(), config.server_names());
            let pki = blocking(move || {
                Pki::load_or_create(&dir, &names)
                    .map_err(|e| Error::Init(format!("PKI in {}: {e}", dir.display())))
            })
            .await?;
            tracing::info!(ca = %pki.ca_path().display(), ca_sha256 = pki.ca_sha256(), "TLS with the coordinator CA");
            Some(Arc::new(pki))
        };
        for t in &config.enrollment_tokens {
            if store.seed_token(t, 1)? {
                tracing::info!("seeded an enrollment token from the config");
            }
        }
        let key_path = config.signing_key_path();
        let names: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
        let st = store.clone();
        let signer = if upstream.is_some() {
            // Never used: a home aggregator publishes nothing of its own (no key file).
            let mut secret = [0u8; hearth_proto::signing::SECRET_KEY_LEN];
            rand::rngs::OsRng.fill_bytes(&mut secret);
            Arc::new(ModelSigner::from_secret(&secret))
        } else {
            Arc::new(
                blocking(move || {
                    let signer = crate::signing::load_or_create(&key_path, &st, &names)?;
                    crate::signing::sign_unsigned(&signer, &st, &names)?;
                    Ok(signer)
                })
                .await?,
            )
        };
        let mut eval_sets = HashMap::new();
        let mut loaded: HashMap<String, Arc<Dataset>> = HashMap::new();
        let own_models = if upstream.is_some() {
            &[][..]
        } else {
            &config.models[..]
        };
        for m in own_models {
            let task = parse_task(m, &config.data_dir)?;
            if m.eval {
                let ds = match loaded.get(&m.task) {
                    Some(ds) => ds.clone(),
                    None => {
                        let spec = task.clone();
                        let ds = blocking(move || {
                            spec.load(Split::Test).map_err(|e| {
                                Error::Init(format!(
                                    "cannot load held-out set of {} from {}: {e}",
                                    spec.name,
                                    spec.path.display()
                                ))
                            })
                        })
                        .await?;
                        let ds = Arc::new(ds);
                        loaded.insert(m.task.clone(), ds.clone());
                        ds
                    }
                };
                tracing::info!(model = %m.name, samples = ds.len(), "held-out set loaded");
                eval_sets.insert(m.name.clone(), ds);
            }
            ensure_initial_version(&store, &signer, m, task, eval_sets.get(&m.name).cloned())
                .await?;
        }
        store.flush().await?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(Arc::new(Coordinator {
            config,
            store,
            events,
            eval_sets,
            round_locks: Mutex::new(HashMap::new()),
            global_cache: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            shutdown,
            metrics: Arc::new(Metrics::default()),
            signer,
            pki,
            revocations: watch::channel(0).0,
            presence: Arc::new(Mutex::new(Presence::default())),
            upstream,
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters (rejections, accepted updates, published versions).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The public key every published version is signed with (agents pin it at enrolment):
    /// the upstream coordinator's for a home aggregator, which re-serves its versions with
    /// their signatures unchanged.
    pub fn model_signing_key(&self) -> [u8; 32] {
        match &self.upstream {
            Some(u) => u.model_signing_key(),
            None => self.signer.public_key(),
        }
    }

    /// Home aggregator mode: the upstream link (`None` for an ordinary coordinator).
    pub fn upstream(&self) -> Option<&Arc<crate::upstream::Upstream>> {
        self.upstream.as_ref()
    }

    /// The CA and server identity (`None` in insecure mode).
    pub fn pki(&self) -> Option<&Arc<Pki>> {
        self.pki.as_ref()
    }

    /// A receiver that changes at every revocation.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A receiver of live events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// A receiver that turns `true` when the server shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    pub(crate) fn publish(&self, e: Event) {
        // No subscribers is fine.
        let _ = self.events.send(e);
    }

    /// Runs `fut` as a tracked background task (awaited at shutdown).
    pub(crate) fn spawn_task(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.tasks.lock().expect("task set lock");
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }

    /// Waits up to `limit` for background tasks, then aborts what is left.
    pub(crate) async fn join_tasks(&self, limit: Duration) {
        let mut set = std::mem::take(&mut *self.tasks.lock().expect("task set lock"));
        let drained =
            tokio::time::timeout(limit, async { while set.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = set.len(),
                "aborting background tasks after the drain limit"
            );
            set.shutdown().await;
        }
    }

    /// Marks `client` available for `models` while the returned guard lives (a `Subscribe`
    /// stream) and this instance is alive ([`Coordinator::renew_presence`]), and for
    /// `available_window_secs` after: in the store, where every instance's client selection
    /// draws from.
    pub fn subscribed(&self, client: &str, models: &[String]) -> PresenceGuard {
        let first: Vec<&String> = {
            let mut p = self.presence.lock().expect("presence lock");
            let m = p.by_client.entry(client.to_string()).or_default();
            models
                .iter()
                .filter(|model| {
                    let n = m.entry((*model).clone()).or_insert(0);
                    *n += 1;
                    *n == 1
                })
                .collect()
        };
        let c = [client.to_string()];
        for model in first {
            if let Err(e) = self.store.mark_available(model, &c, MarkAvailable::Live) {
                tracing::warn!(client, error = %e, "cannot record a subscription");
            }
        }
        PresenceGuard {
            presence: self.presence.clone(),
            store: self.store.clone(),
            window_ms: self.config.round.available_window_secs.saturating_mul(1000),
            client: client.to_string(),
            models: models.to_vec(),
        }
    }

    /// Keeps this instance alive in the store (a heartbeat now, then every third of
    /// [`PRESENCE_LEASE_MS`] until shutdown), which keeps its live streams' clients available:
    /// one write per instance, whatever the number of clients.
    pub fn renew_presence(self: &Arc<Self>) -> Result<(), Error> {
        self.store
            .heartbeat(now_unix_ms().saturating_add(PRESENCE_LEASE_MS))?;
        let me = self.clone();
        let mut shutdown = self.shutdown.clone();
        self.spawn_task(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(PRESENCE_LEASE_MS / 3)) => {}
                    _ = stopped(&mut shutdown) => return,
                }
                let store = me.store.clone();
                let beat = blocking_task(move || {
                    store.heartbeat(now_unix_ms().saturating_add(PRESENCE_LEASE_MS))
                })
                .await;
                let failed = match beat {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(e) = failed {
                    tracing::warn!(error = %e, "cannot renew this instance's heartbeat");
                }
            }
        });
        Ok(())
    }

    /// How many clients are available for `model` now, in the store (every instance's
    /// subscribers): holding a `Subscribe` stream for it, or holding one until less than
    /// `available_window_secs` ago; revoked clients are not counted.
    pub fn available_count(&self, model: &str) -> Result<u64, StoreError> {
        Ok(self
            .store
            .sample_available(model, now_unix_ms(), 0, 0)?
            .available)
    }

    /// Whether `model` is served.
    pub fn has_model(&self, model: &str) -> bool {
        self.config.model(model).is_some()
    }

    /// Names of all served models, in config order.
    pub fn model_names(&self) -> Vec<String> {
        self.config.models.iter().map(|m| m.name.clone()).collect()
    }

    // ------------------------------------------------------------ auth

    /// Trades a one-time token for a new client identity. With TLS, `csr_pem` (a CSR for a key
    /// made on the device) is required and a client certificate with CN = client id is issued;
    /// in insecure mode a shared key is issued instead.
    pub fn enroll(
        &self,
        token: &str,
        device_name: &str,
        csr_pem: &str,
    ) -> Result<Enrolled, EnrollError> {
        if device_name.is_empty()
            || device_name.chars().count() > 128
            || device_name.chars().any(char::is_control)
        {
            return Err(EnrollError::DeviceName);
        }
        let client_id = format!("c-{}", random_hex(12));
        let mut out = Enrolled {
            client_id: client_id.clone(),
            client_key: String::new(),
            cert_pem: String::new(),
            ca_pem: String::new(),
        };
        let mut rec = ClientRecord {
            client_id: client_id.clone(),
            device_name: device_name.to_string(),
            key_sha256: String::new(),
            enrolled_unix_ms: now_unix_ms(),
            cert_sha256: String::new(),
            revoked_unix_ms: None,
        };
        match &self.pki {
            Some(pki) => {
                if csr_pem.trim().is_empty() {
                    return Err(EnrollError::Csr(
                        "required over TLS (the agent makes its key and sends a CSR)".into(),
                    ));
                }
                // A token must be usable before anything is signed.
                self.check_token(token, device_name, rec.enrolled_unix_ms)?;
                let days = u64::from(self.config.client_cert_days);
                let cert = pki
                    .sign_client(csr_pem, &client_id, Duration::from_secs(days * 86_400))
                    .map_err(|e| EnrollError::Csr(e.to_string()))?;
                let der = crate::pki::pem_to_der(&cert)
                    .ok_or_else(|| EnrollError::Csr("issued certificate unreadable".into()))?;
                rec.cert_sha256 = crate::pki::fingerprint(&der);
                out.cert_pem = cert;
                out.ca_pem = pki.ca_pem().to_string();
            }
            None => {
                let key = random_hex(32);
                rec.key_sha256 = sha256_hex(key.as_bytes());
                out.client_key = key;
            }
        }
        match self.store.enroll(token, &rec) {
            Ok(()) => {
                tracing::info!(%client_id, device_name, "client enrolled");
                Ok(out)
            }
            Err(e) => Err(token_error(e)),
        }
    }

    /// Refuses an unknown, used, expired or other-device token early (the store checks again
    /// atomically when it consumes it).
    fn check_token(&self, token: &str, device: &str, now_ms: u64) -> Result<(), EnrollError> {
        match self.store.token(token).map_err(EnrollError::Store)? {
            None => Err(EnrollError::Token),
            Some(t) if t.uses == 0 => Err(EnrollError::Token),
            Some(t) if t.expires_unix_ms != 0 && now_ms >= t.expires_unix_ms => {
                Err(EnrollError::TokenExpired)
            }
            Some(t) if !t.device.is_empty() && t.device != device => {
                Err(EnrollError::TokenDevice(t.device))
            }
            Some(_) => Ok(()),
        }
    }

    /// Makes a new enrollment token allowing `uses` enrollments (0 means 1), for `device`
    /// only when not empty, valid for `ttl` (`None`: `enrollment_token_ttl_secs`).
    pub fn create_token(
        &self,
        uses: u32,
        device: &str,
        ttl: Option<Duration>,
    ) -> Result<NewToken, StoreError> {
        let ttl = ttl.unwrap_or_else(|| Duration::from_secs(self.config.enrollment_token_ttl_secs));
        let token = format!("hearth-{}", random_hex(16));
        let expires_unix_ms = now_unix_ms().saturating_add(ttl.as_millis() as u64);
        self.store.add_token(
            &token,
            &TokenRecord {
                uses: uses.max(1),
                expires_unix_ms,
                device: device.to_string(),
            },
        )?;
        Ok(NewToken {
            token,
            expires_unix_ms,
        })
    }

    /// Revokes every client enrolled as `device` (device name or client id); open streams
    /// of those clients end. Returns their ids (empty: nothing matched).
    pub fn revoke(&self, device: &str) -> Result<Vec<String>, StoreError> {
        let ids = self.store.revoke(device, now_unix_ms())?;
        if !ids.is_empty() {
            tracing::warn!(device, clients = ?ids, "revoked");
            self.revocations.send_modify(|g| *g += 1);
        }
        Ok(ids)
    }

    /// Whether `client_id` is revoked (or unknown).
    pub fn is_revoked(&self, client_id: &str) -> bool {
        !matches!(self.store.client(client_id), Ok(Some(r)) if r.revoked_unix_ms.is_none())
    }

    /// Checks a client's id and key (insecure mode).
    pub fn authenticate_client(
        &self,
        client_id: Option<&str>,
        key: Option<&str>,
    ) -> Result<ClientRecord, AuthError> {
        let (Some(id), Some(key)) = (client_id, key) else {
            return Err(AuthError::Missing);
        };
        let rec = self
            .store
            .client(id)
            .ok()
            .flatten()
            .ok_or(AuthError::Invalid)?;
        let digest = sha256_hex(key.as_bytes());
        if !constant_time_eq(digest.as_bytes(), rec.key_sha256.as_bytes()) {
            return Err(AuthError::Invalid);
        }
        if rec.revoked_unix_ms.is_some() {
            return Err(AuthError::Revoked(rec.client_id));
        }
        Ok(rec)
    }

    /// Checks a client certificate (DER) the TLS layer already verified against the CA: its
    /// CN names an enrolled client, it is the certificate issued to that client, and the client
    /// is not revoked.
    pub fn authenticate_cert(&self, der: Option<&[u8]>) -> Result<ClientRecord, AuthError> {
        let der = der.ok_or(AuthError::NoCertificate)?;
        let id = crate::pki::common_name(der).unwrap_or_default();
        let rec = self
            .store
            .client(&id)
            .ok()
            .flatten()
            .ok_or_else(|| AuthError::NotEnrolled(id.clone()))?;
        let fp = crate::pki::fingerprint(der);
        if !constant_time_eq(fp.as_bytes(), rec.cert_sha256.as_bytes()) {
            return Err(AuthError::NotEnrolled(id));
        }
        if rec.revoked_unix_ms.is_some() {
            return Err(AuthError::Revoked(rec.client_id));
        }
        Ok(rec)
    }

    /// Checks the value of an `authorization` header against the admin token.
    pub fn authenticate_admin(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let Some(v) = authorization else {
            return Err(AuthError::Missing);
        };
        let Some(token) = v.strip_prefix("Bearer ") else {
            return Err(AuthError::Invalid);
        };
        if constant_time_eq(token.trim().as_bytes(), self.config.admin_token.as_bytes()) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }

    // ------------------------------------------------------------ models

    /// Weights of a stored version, parsed once and cached (one version per model).
    pub(crate) async fn global_weights(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Arc<Weights>, Error> {
        if let Some((v, w)) = self.global_cache.lock().expect("cache lock").get(model) {
            if *v == version {
                return Ok(w.clone());
            }
        }
        let bytes = self
            .store
            .model_bytes(model, version)?
            .ok_or_else(|| Error::Internal(format!("version {version} of {model} is missing")))?;
        let w = blocking(move || Ok(Arc::new(OnnxModel::from_bytes(&bytes)?.weights()))).await?;
        self.global_cache
            .lock()
            .expect("cache lock")
            .insert(model.to_string(), (version, w.clone()));
        Ok(w)
    }
}

/// The configured backend: sled at `db_path`, or PostgreSQL (migrated on connect).
async fn open_store(config: &Config) -> Result<Store, Error> {
    let path = config.db_path.clone();
    let sc = config.store.clone();
    blocking(move || match sc.backend {
        crate::config::StoreBackend::Sled => Ok(Store::open(&path)?),
        crate::config::StoreBackend::Postgres => {
            let instance = if sc.instance.is_empty() {
                format!("i-{}", random_hex(6))
            } else {
                sc.instance.clone()
            };
            let store = Store::connect_postgres(&crate::store::pg::PgOptions {
                url: sc.url.clone(),
                pool_size: sc.pool_size,
                instance: instance.clone(),
                accept_slots: sc.accept_slots,
            })?;
            tracing::info!(%instance, pool_size = sc.pool_size, "state in PostgreSQL");
            Ok(store)
        }
    })
    .await
}

fn parse_task(m: &ModelConfig, data_dir: &std::path::Path) -> Result<TaskSpec, Error> {
    TaskSpec::resolve(&m.task, data_dir)
        .map_err(|e| Error::Init(format!("model {}: unknown task {:?}: {e}", m.name, m.task)))
}

/// Held-out accuracy of `model`, or `None` (logged) when evaluation fails.
pub(crate) fn evaluate(name: &str, model: &OnnxModel, ds: &Dataset) -> Option<f32> {
    let r = hearth_model::Classifier::new(model).and_then(|c| hearth_model::accuracy(&c, ds));
    match r {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(model = name, error = %e, "evaluation failed");
            None
        }
    }
}

async fn ensure_initial_version(
    store: &Store,
    signer: &ModelSigner,
    m: &ModelConfig,
    task: TaskSpec,
    eval: Option<Arc<Dataset>>,
) -> Result<(), Error> {
    if store.latest_version(&m.name)?.is_some() {
        return Ok(());
    }
    let cfg = m.clone();
    let (bytes, acc) = blocking(move || {
        let (model, bytes) = match &cfg.init {
            Some(p) => {
                let bytes = read_init(p)?;
                (OnnxModel::from_bytes(&bytes)?, bytes)
            }
            None => {
                // With a feature front end (MiniRocket), its fitted state goes into the
                // model's metadata, so agents and tools need only the model.
                let model = task.build_model(cfg.seed).map_err(|e| {
                    Error::Init(format!("cannot build the initial {} model: {e}", cfg.name))
                })?;
                let bytes = model.to_bytes();
                (model, bytes)
            }
        };
        let acc = eval.and_then(|ds| evaluate(&cfg.name, &model, &ds));
        Ok((bytes, acc))
    })
    .await?;
    let mut meta = VersionMeta {
        model: m.name.clone(),
        version: 1,
        sha256: sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
        eval_accuracy: acc,
        created_unix_ms: now_unix_ms(),
        from_round: 0,
        parent_version: 0,
        signature: String::new(),
        ..VersionMeta::default()
    };
    crate::signing::sign(signer, &mut meta)?;
    store.put_version(&meta, &bytes)?;
    tracing::info!(model = %m.name, size = bytes.len(), accuracy = ?acc, "created version 1");
    Ok(())
}

fn read_init(p: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|e| Error::Init(format!("cannot read {}: {e}", p.display())))
}

/// The domain error of a refused token.
fn token_error(e: StoreError) -> EnrollError {
    match e {
        StoreError::TokenRejected => EnrollError::Token,
        StoreError::TokenExpired => EnrollError::TokenExpired,
        StoreError::TokenDevice(d) => EnrollError::TokenDevice(d),
        e => EnrollError::Store(e),
    }
}
