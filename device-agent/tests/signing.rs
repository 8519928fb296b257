//! Signed models, against a hostile coordinator: a real tonic server on 127.0.0.1 that
//! implements `Enrollment` and `Federation` and serves whatever the test scripts — honest
//! signed versions, tampered bytes, models signed by another key, for another model name,
//! relabelled or replayed versions and a forked lineage. The agent must take only the honest
//! ones, keep serving its current model after each refusal and count the refusal by reason.
//! A second test: credentials from before signing (no pinned key) stop federation until a
//! key is pinned in the config, which then wins over the key given at enrolment.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{data_dir, start_broker};
use hearth_agent::state::{Credentials, StateDir};
use hearth_agent::{AgentHandle, Config, Partition};
use hearth_model::{downlink, CodecConfig, OnnxModel, TaskSpec, Weights};
use hearth_proto::signing::{hex_encode, ModelSigner, ModelStatement};
use hearth_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use hearth_proto::v1::federation_server::{Federation, FederationServer};
use hearth_proto::v1::{
    federation_event, EnrollRequest, EnrollResponse, FederationEvent, FetchModelRequest,
    ModelChunk, ModelPublished, RoundTask, SubscribeRequest, UpdateChunk, UploadAck,
};
use hearth_proto::CHUNK_SIZE;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const MODEL: &str = "digits";
const LIMIT: Duration = Duration::from_secs(30);

/// What `FetchModel` serves for one requested version.
#[derive(Clone)]
struct Offer {
    version: u64,
    parent: u64,
    sha256: String,
    signature: Vec<u8>,
    bytes: Vec<u8>,
    /// A coded delta (against `.0`) served instead of `bytes` to a client holding `.0`.
    delta: Option<(u64, Vec<u8>)>,
}

/// Where a subscription's events go.
type EventTx = mpsc::Sender<Result<FederationEvent, Status>>;

/// The hostile coordinator's shared state.
#[derive(Clone, Default)]
struct Hostile {
    enroll_key: Vec<u8>,
    offers: Arc<Mutex<HashMap<u64, Offer>>>,
    subscribers: Arc<Mutex<Vec<EventTx>>>,
    subscribe_calls: Arc<std::sync::atomic::AtomicU64>,
}

impl Hostile {
    fn offer(&self, requested: u64, o: Offer) {
        self.offers.lock().unwrap().insert(requested, o);
    }

    async fn announce(&self, e: federation_event::Event) {
        let subs = self.subscribers.lock().unwrap().clone();
        assert!(!subs.is_empty(), "nobody subscribed");
        for s in subs {
            let _ = s
                .send(Ok(FederationEvent {
                    event: Some(e.clone()),
                }))
                .await;
        }
    }

    /// Offers `o` under its own version and announces it.
    async fn publish(&self, o: Offer) {
        self.offer(o.version, o.clone());
        self.announce(federation_event::Event::Published(ModelPublished {
            model: MODEL.into(),
            version: o.version,
            sha256: o.sha256,
            size_bytes: o.bytes.len() as u64,
            parent_version: o.parent,
            signature: o.signature,
        }))
        .await;
    }

    /// Like `publish`, but the announcement names only the version (no digest, size or
    /// signature): what the agent takes is decided by the download alone.
    async fn publish_bare(&self, o: Offer) {
        let version = o.version;
        self.offer(version, o);
        self.announce(federation_event::Event::Published(ModelPublished {
            model: MODEL.into(),
            version,
            ..ModelPublished::default()
        }))
        .await;
    }
}

#[tonic::async_trait]
impl Enrollment for Hostile {
    async fn enroll(
        &self,
        _req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        Ok(Response::new(EnrollResponse {
            client_id: "c-hostile".into(),
            client_key: "k".repeat(64),
            model_signing_key: self.enroll_key.clone(),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Federation for Hostile {
    type SubscribeStream = ReceiverStream<Result<FederationEvent, Status>>;
    type FetchModelStream = tokio_stream::Iter<std::vec::IntoIter<Result<ModelChunk, Status>>>;

    async fn subscribe(
        &self,
        _req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.subscribe_calls.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        self.subscribers.lock().unwrap().push(tx);
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_model(
        &self,
        req: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let r = req.into_inner();
        let o = self
            .offers
            .lock()
            .unwrap()
            .get(&r.version)
            .cloned()
            .ok_or_else(|| Status::not_found("no such version"))?;
        let mut chunks = Vec::new();
        let mut offset = r.offset as usize;
        let (data, delta_base) = match &o.delta {
            Some((base, d)) if r.have_version != 0 && *base == r.have_version => (d, *base),
            _ => (&o.bytes, 0),
        };
        loop {
            let end = (offset + CHUNK_SIZE).min(data.len());
            chunks.push(Ok(ModelChunk {
                model: MODEL.into(),
                version: o.version,
                total_size: data.len() as u64,
                sha256: o.sha256.clone(),
                offset: offset as u64,
                data: data[offset..end].to_vec(),
                parent_version: o.parent,
                signature: o.signature.clone(),
                delta_base,
            }));
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn upload_update(
        &self,
        _req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<UploadAck>, Status> {
        Err(Status::failed_precondition("not taking updates"))
    }
}

/// Serves `h` on a loopback port; returns its URL.
async fn serve(h: Hostile) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EnrollmentServer::new(h.clone()))
            .add_service(FederationServer::new(h))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

fn sha_hex(b: &[u8]) -> String {
    hex_encode(&Sha256::digest(b))
}

/// A model of the digits task (what the coordinator would build), as ONNX bytes.
fn model_bytes(seed: u64) -> Vec<u8> {
    let spec = TaskSpec::resolve(MODEL, &data_dir()).unwrap().mlp_spec();
    OnnxModel::build_mlp(&spec, seed).to_bytes()
}

/// `bytes` offered as `version` with `parent`, signed by `key` as (`name`, version, parent).
fn signed(key: &ModelSigner, name: &str, version: u64, parent: u64, bytes: &[u8]) -> Offer {
    Offer {
        version,
        parent,
        sha256: sha_hex(bytes),
        signature: key
            .sign(&ModelStatement::for_bytes(name, version, parent, bytes))
            .to_vec(),
        bytes: bytes.to_vec(),
        delta: None,
    }
}

fn agent_config(port: u16, url: &str, state: &Path, pin: Option<String>) -> Config {
    Config {
        device: "signed-plug".into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        coordinator: Some(url.into()),
        enrollment_token: Some("token-for-the-hostile-one".into()),
        model_signing_key: pin,
        task: MODEL.into(),
        data_dir: data_dir(),
        partition: Partition {
            index: 0,
            count: 4,
            alpha: 0.5,
            seed: 5,
        },
        replay_rate_hz: 50.0,
        min_event_score: 0.0,
        state_dir: state.to_path_buf(),
        bootstrap_epochs: 0,
        ..Config::default()
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn refused(a: &AgentHandle) -> (u64, u64, u64, u64) {
    let s = a.stats().snapshot();
    (
        s.models_refused,
        s.models_refused_signature,
        s.models_refused_digest,
        s.models_refused_lineage,
    )
}

/// Waits for the next refusal, then checks it was counted under the expected reason and
/// that the agent still serves `tag` (and keeps classifying samples with it).
async fn expect_refusal(
    what: &str,
    a: &AgentHandle,
    before: (u64, u64, u64, u64),
    reason: usize,
    tag: &str,
) {
    wait_until(&format!("the refusal of {what}"), || {
        refused(a).0 > before.0
    })
    .await;
    let now = refused(a);
    let mut want = before;
    want.0 += 1;
    match reason {
        1 => want.1 += 1,
        2 => want.2 += 1,
        _ => want.3 += 1,
    }
    assert_eq!(
        now, want,
        "{what}: refusals (total, signature, digest, lineage)"
    );
    assert_eq!(a.model_tag(), tag, "the current model stays");
    let replayed = a.stats().samples_replayed.load(Ordering::Relaxed);
    wait_until("inference goes on", || {
        a.stats().samples_replayed.load(Ordering::Relaxed) > replayed + 3
    })
    .await;
    assert_eq!(a.model_tag(), tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_tampered_forged_and_replayed_models() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let key = ModelSigner::from_secret(&[1u8; 32]);
    let stranger = ModelSigner::from_secret(&[2u8; 32]);
    let hostile = Hostile {
        enroll_key: key.public_key().to_vec(),
        ..Hostile::default()
    };
    let url = serve(hostile.clone()).await;
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    let a = hearth_agent::start(agent_config(port, &url, state.path(), None))
        .await
        .unwrap();
    wait_until("the agent subscribes", || {
        !hostile.subscribers.lock().unwrap().is_empty()
    })
    .await;
    // The key handed out at enrolment is pinned in the credentials.
    let creds = StateDir::open(state.path())
        .unwrap()
        .load_credentials()
        .unwrap()
        .unwrap();
    assert_eq!(creds.model_signing_key, Some(hex_encode(&key.public_key())));

    let (v1, v2, v3) = (model_bytes(1), model_bytes(2), model_bytes(3));
    // An honest version 1 is taken.
    hostile.publish(signed(&key, MODEL, 1, 0, &v1)).await;
    wait_until("version 1", || a.model_tag() == "digits@1").await;
    assert_eq!(refused(&a), (0, 0, 0, 0));
    let (stored, _) = StateDir::open(state.path())
        .unwrap()
        .load_model(MODEL)
        .unwrap()
        .unwrap();
    assert_eq!((stored.version, stored.parent_version), (1, 0));
    assert!(!stored.signature.is_empty());

    // (a) Tampered bytes under the genuine digest and signature: the bytes do not hash to
    // the signed digest (announced without a digest, and with the genuine one).
    let mut tampered = signed(&key, MODEL, 2, 1, &v2);
    let mid = tampered.bytes.len() / 2;
    tampered.bytes[mid] ^= 0x40;
    let before = refused(&a);
    hostile.publish_bare(tampered.clone()).await;
    expect_refusal(
        "tampered bytes, bare announcement",
        &a,
        before,
        2,
        "digits@1",
    )
    .await;
    let before = refused(&a);
    hostile.publish(tampered.clone()).await;
    expect_refusal("tampered bytes", &a, before, 2, "digits@1").await;
    // … and with the digest recomputed for the tampered bytes: the signature fails.
    tampered.sha256 = sha_hex(&tampered.bytes);
    let before = refused(&a);
    hostile.publish(tampered).await;
    expect_refusal(
        "tampered bytes with their own digest",
        &a,
        before,
        1,
        "digits@1",
    )
    .await;

    // (b) Signed by another key.
    let before = refused(&a);
    hostile.publish(signed(&stranger, MODEL, 2, 1, &v2)).await;
    expect_refusal("a foreign key", &a, before, 1, "digits@1").await;

    // (c) Validly signed for another model name, served as this one.
    let before = refused(&a);
    hostile.publish(signed(&key, "faces", 2, 1, &v2)).await;
    expect_refusal("another model name", &a, before, 1, "digits@1").await;
    // (c) An old version's genuine signature relabelled as a newer version.
    let mut relabelled = signed(&key, MODEL, 1, 0, &v1);
    relabelled.version = 2;
    let before = refused(&a);
    hostile.publish(relabelled).await;
    expect_refusal("a relabelled old version", &a, before, 1, "digits@1").await;

    // The honest version 2 still gets through after all that.
    hostile.publish(signed(&key, MODEL, 2, 1, &v2)).await;
    wait_until("version 2", || a.model_tag() == "digits@2").await;

    // (c) Replay: a round on the old version 1, served with its genuine signature.
    let before = refused(&a);
    hostile.offer(1, signed(&key, MODEL, 1, 0, &v1));
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    hostile
        .announce(federation_event::Event::Round(RoundTask {
            model: MODEL.into(),
            round_id: 1,
            base_version: 1,
            local_epochs: 1,
            learning_rate: 0.01,
            batch_size: 8,
            deadline_unix_ms: deadline,
            clip_norm: 1.0,
            quant_bits: 8,
            topk_fraction: 1.0,
            ..RoundTask::default()
        }))
        .await;
    expect_refusal("a replayed old version", &a, before, 3, "digits@2").await;
    assert_eq!(a.stats().local_trainings.load(Ordering::Relaxed), 0);

    // A fork: validly signed version 3 whose parent is older than the version in use.
    let before = refused(&a);
    hostile.publish(signed(&key, MODEL, 3, 0, &v3)).await;
    expect_refusal("a fork", &a, before, 3, "digits@2").await;

    // Through every refusal the stored model stayed the last good one.
    let (stored, bytes) = StateDir::open(state.path())
        .unwrap()
        .load_model(MODEL)
        .unwrap()
        .unwrap();
    assert_eq!((stored.version, bytes), (2, v2));
    let s = a.stats().snapshot();
    assert_eq!((s.model_version, s.models_loaded), (2, 2), "{s:?}");
    a.shutdown().await.unwrap();
}

/// The compressed downlink: a version offered as a coded delta against the one in use is
/// rebuilt, checked against the signed digest and used; a delta that decodes but does not
/// rebuild the signed model (here: the previous version's delta, served again) is set aside
/// and the whole file fetched instead — nothing refused, nothing unsigned used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rebuilds_coded_deltas_and_falls_back_to_the_file() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let key = ModelSigner::from_secret(&[1u8; 32]);
    let hostile = Hostile {
        enroll_key: key.public_key().to_vec(),
        ..Hostile::default()
    };
    let url = serve(hostile.clone()).await;
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    let a = hearth_agent::start(agent_config(port, &url, state.path(), None))
        .await
        .unwrap();
    wait_until("the agent subscribes", || {
        !hostile.subscribers.lock().unwrap().is_empty()
    })
    .await;
    let v1 = model_bytes(1);
    hostile.publish(signed(&key, MODEL, 1, 0, &v1)).await;
    wait_until("version 1", || a.model_tag() == "digits@1").await;

    // Version 2 as the coordinator makes it: the rebuild of a coded delta against v1.
    let cfg = CodecConfig::default();
    let mut residual = Weights::new();
    let m1 = OnnxModel::from_bytes(&v1).unwrap();
    let target = |seed| OnnxModel::from_bytes(&model_bytes(seed)).unwrap().weights();
    let (d2, m2) = downlink::code(&m1, &target(2), &mut residual, &cfg, 2).unwrap();
    let v2 = m2.to_bytes();
    let mut o2 = signed(&key, MODEL, 2, 1, &v2);
    o2.delta = Some((1, d2.clone()));
    let before = a.stats().snapshot().bytes_downloaded;
    hostile.publish(o2).await;
    wait_until("version 2", || a.model_tag() == "digits@2").await;
    let s = a.stats().snapshot();
    assert_eq!((s.models_from_delta, s.delta_fallbacks), (1, 0), "{s:?}");
    assert_eq!(s.bytes_downloaded - before, d2.len() as u64);
    assert!(d2.len() * 3 < v2.len());
    assert_eq!(refused(&a), (0, 0, 0, 0));
    let stored = StateDir::open(state.path()).unwrap();
    let (meta, bytes) = stored.load_model(MODEL).unwrap().unwrap();
    assert_eq!((meta.version, &bytes), (2, &v2));

    // Version 3, signed, but offered with a delta that rebuilds something else.
    let (_, m3) = downlink::code(&m2, &target(3), &mut residual, &cfg, 3).unwrap();
    let v3 = m3.to_bytes();
    let mut o3 = signed(&key, MODEL, 3, 2, &v3);
    o3.delta = Some((2, d2.clone()));
    let before = a.stats().snapshot().bytes_downloaded;
    hostile.publish(o3).await;
    wait_until("version 3", || a.model_tag() == "digits@3").await;
    let s = a.stats().snapshot();
    assert_eq!((s.models_from_delta, s.delta_fallbacks), (1, 1), "{s:?}");
    assert_eq!(s.bytes_downloaded - before, (d2.len() + v3.len()) as u64);
    assert_eq!(refused(&a), (0, 0, 0, 0));
    let (meta, bytes) = stored.load_model(MODEL).unwrap().unwrap();
    assert_eq!((meta.version, &bytes), (3, &v3));
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_without_a_pinned_key_stop_federation_until_one_is_configured() {
    let key = ModelSigner::from_secret(&[3u8; 32]);
    let stranger = ModelSigner::from_secret(&[4u8; 32]);
    // This coordinator hands out a key other than its models are signed with: only a key
    // pinned in the config lets the agent take them.
    let hostile = Hostile {
        enroll_key: stranger.public_key().to_vec(),
        ..Hostile::default()
    };
    let url = serve(hostile.clone()).await;
    hostile.offer(1, signed(&key, MODEL, 1, 0, &model_bytes(1)));
    let port = start_broker();
    let state = tempfile::tempdir().unwrap();
    // Credentials stored by an agent from before model signing: no key.
    StateDir::open(state.path())
        .unwrap()
        .save_credentials(&Credentials {
            coordinator: url.clone(),
            client_id: "c-old".into(),
            client_key: "k".repeat(64),
            model_signing_key: None,
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_pem: String::new(),
        })
        .unwrap();
    let a = hearth_agent::start(agent_config(port, &url, state.path(), None))
        .await
        .unwrap();
    // Inference runs on the local model; federation does not start.
    wait_until("inference", || {
        a.stats().samples_replayed.load(Ordering::Relaxed) > 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hostile.subscribe_calls.load(Ordering::Relaxed), 0);
    assert_eq!(a.model_tag(), "digits@0");
    a.shutdown().await.unwrap();

    // With the coordinator's key pinned in the config it runs, and that key wins.
    let pin = Some(hex_encode(&key.public_key()));
    let a = hearth_agent::start(agent_config(port, &url, state.path(), pin))
        .await
        .unwrap();
    wait_until("the agent subscribes", || {
        !hostile.subscribers.lock().unwrap().is_empty()
    })
    .await;
    hostile
        .publish(signed(&key, MODEL, 1, 0, &model_bytes(1)))
        .await;
    wait_until("version 1", || a.model_tag() == "digits@1").await;
    // A version signed with the key handed out at enrolment is not the pinned one.
    let before = refused(&a);
    hostile
        .publish(signed(&stranger, MODEL, 2, 1, &model_bytes(2)))
        .await;
    expect_refusal("the enrolment key", &a, before, 1, "digits@1").await;
    a.shutdown().await.unwrap();
}
