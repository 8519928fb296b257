//! The coordinator's shared state and its domain operations that are not about rounds:
//! start-up of the served models (version 1, held-out sets), enrollment and authentication,
//! model lookup, the event broadcast and the tracker of background tasks.

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
use crate::store::{now_unix_ms, ClientRecord, RoundRecord, Store, StoreError, VersionMeta};
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
}

/// Enrollment failures.
#[derive(thiserror::Error, Debug)]
pub enum EnrollError {
    /// Token unknown or used up.
    #[error("enrollment token unknown or already used")]
    Token,
    /// Bad device name.
    #[error("device_name must be 1-128 printable characters")]
    DeviceName,
    /// Storage failure.
    #[error(transparent)]
    Store(StoreError),
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
    pub(crate) round_locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) global_cache: Mutex<HashMap<String, (u64, Arc<Weights>)>>,
    pub(crate) tasks: Mutex<JoinSet<()>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Arc<Metrics>,
    /// Signs every published version (`crate::signing`).
    pub(crate) signer: Arc<ModelSigner>,
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
    /// the held-out sets. `config` must be valid.
    pub async fn new(config: Config, shutdown: watch::Receiver<bool>) -> Result<Arc<Self>, Error> {
        let path = config.db_path.clone();
        let store = blocking(move || Ok(Store::open(&path)?)).await?;
        for t in &config.enrollment_tokens {
            if store.seed_token(t, 1)? {
                tracing::info!("seeded an enrollment token from the config");
            }
        }
        let key_path = config.signing_key_path();
        let names: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
        let st = store.clone();
        let signer = Arc::new(
            blocking(move || {
                let signer = crate::signing::load_or_create(&key_path, &st, &names)?;
                crate::signing::sign_unsigned(&signer, &st, &names)?;
                Ok(signer)
            })
            .await?,
        );
        let mut eval_sets = HashMap::new();
        let mut loaded: HashMap<String, Arc<Dataset>> = HashMap::new();
        for m in &config.models {
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

    /// The public key every published version is signed with (agents pin it at enrolment).
    pub fn model_signing_key(&self) -> [u8; 32] {
        self.signer.public_key()
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

    /// Whether `model` is served.
    pub fn has_model(&self, model: &str) -> bool {
        self.config.model(model).is_some()
    }

    /// Names of all served models, in config order.
    pub fn model_names(&self) -> Vec<String> {
        self.config.models.iter().map(|m| m.name.clone()).collect()
    }

    // ------------------------------------------------------------ auth

    /// Trades a one-time token for a new client identity; returns (client_id, client_key).
    pub fn enroll(&self, token: &str, device_name: &str) -> Result<(String, String), EnrollError> {
        if device_name.is_empty()
            || device_name.chars().count() > 128
            || device_name.chars().any(char::is_control)
        {
            return Err(EnrollError::DeviceName);
        }
        let client_id = format!("c-{}", random_hex(12));
        let key = random_hex(32);
        let rec = ClientRecord {
            client_id: client_id.clone(),
            device_name: device_name.to_string(),
            key_sha256: sha256_hex(key.as_bytes()),
            enrolled_unix_ms: now_unix_ms(),
        };
        match self.store.enroll(token, &rec) {
            Ok(()) => {
                tracing::info!(%client_id, device_name, "client enrolled");
                Ok((client_id, key))
            }
            Err(StoreError::TokenRejected) => Err(EnrollError::Token),
            Err(e) => Err(EnrollError::Store(e)),
        }
    }

    /// Makes a new enrollment token allowing `uses` enrollments (0 means 1).
    pub fn create_token(&self, uses: u32) -> Result<String, StoreError> {
        let token = format!("hearth-{}", random_hex(16));
        self.store.seed_token(&token, uses.max(1))?;
        Ok(token)
    }

    /// Checks a client's id and key.
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
        if constant_time_eq(digest.as_bytes(), rec.key_sha256.as_bytes()) {
            Ok(rec)
        } else {
            Err(AuthError::Invalid)
        }
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
                let model = OnnxModel::build_mlp(&task.mlp_spec(), cfg.seed);
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
    };
    crate::signing::sign(signer, &mut meta)?;
    store.put_version(&meta, &bytes)?;
    tracing::info!(model = %m.name, size = bytes.len(), accuracy = ?acc, "created version 1");
    Ok(())
}

fn read_init(p: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(p).map_err(|e| Error::Init(format!("cannot read {}: {e}", p.display())))
}
