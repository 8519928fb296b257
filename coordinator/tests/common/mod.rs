//! Helpers shared by the coordinator's integration tests: a gRPC client side of the real wire
//! protocol (enroll, fetch, upload, admin calls), deterministic deltas encoded like the agent
//! encodes them, and an independent FedAvg to check published models against.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_model::{decode_update, encode_update, CodecConfig, Tensor, Weights};
use hearth_proto::v1::{
    admin_client::AdminClient, enrollment_client::EnrollmentClient,
    federation_client::FederationClient, federation_event, update_chunk, EnrollRequest,
    FederationEvent, FetchModelRequest, ListVersionsRequest, ModelVersion, RoundState, RoundStatus,
    RoundStatusRequest, StartRoundRequest, UpdateChunk, UpdateHeader, UploadAck,
};
use hearth_proto::{CHUNK_SIZE, CLIENT_ID_HEADER, CLIENT_KEY_HEADER};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

#[cfg(unix)]
pub mod pg;

/// Admin token of every test coordinator.
pub const ADMIN: &str = "admin-token-for-tests-0123456789";

pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// A free loopback port: bound, read and released, to hand to a child process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

pub async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// An enrolled client. In insecure mode `id` and `key` go in the metadata of every call
/// (`with_client`) on a shared channel; over TLS (`tls` set, `key` empty) the client calls on
/// its own channel, which presents the certificate issued at enrolment.
#[derive(Clone, Debug, Default)]
pub struct Creds {
    pub id: String,
    pub key: String,
    pub tls: Option<ClientTls>,
}

/// A TLS client's certificate and its mutually authenticated channel (made once per client
/// and test: every call reuses it).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub cert: TlsCreds,
    pub ch: Channel,
}

impl Creds {
    /// The channel `c`'s calls go on: its own over TLS, `shared` in insecure mode.
    pub fn channel(&self, shared: &Channel) -> Channel {
        match &self.tls {
            Some(t) => t.ch.clone(),
            None => shared.clone(),
        }
    }
}

/// `msg` with the shared-key metadata of insecure mode (none for a TLS client, whose
/// certificate is its identity).
pub fn with_client<T>(msg: T, c: &Creds) -> Request<T> {
    let mut r = Request::new(msg);
    if c.tls.is_none() {
        r.metadata_mut()
            .insert(CLIENT_ID_HEADER, c.id.parse().unwrap());
        r.metadata_mut()
            .insert(CLIENT_KEY_HEADER, c.key.parse().unwrap());
    }
    r
}

pub fn with_admin<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub async fn enroll(ch: &Channel, token: &str, name: &str) -> Result<Creds, Status> {
    let r = EnrollmentClient::new(ch.clone())
        .enroll(EnrollRequest {
            token: token.into(),
            device_name: name.into(),
            ..EnrollRequest::default()
        })
        .await?
        .into_inner();
    Ok(Creds {
        id: r.client_id,
        key: r.client_key,
        tls: None,
    })
}

pub async fn start_round(
    ch: &Channel,
    model: &str,
    min: u32,
    max: u32,
    deadline: u32,
) -> RoundStatus {
    AdminClient::new(ch.clone())
        .start_round(with_admin(
            StartRoundRequest {
                model: model.into(),
                min_clients: min,
                max_clients: max,
                deadline_secs: deadline,
                reason: "test".into(),
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
}

pub async fn status(ch: &Channel, model: &str, round: u64) -> RoundStatus {
    AdminClient::new(ch.clone())
        .get_round_status(with_admin(
            RoundStatusRequest {
                model: model.into(),
                round_id: round,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The published versions of `model` (Admin `ListVersions`).
pub async fn versions(ch: &Channel, model: &str) -> Result<Vec<ModelVersion>, Status> {
    Ok(AdminClient::new(ch.clone())
        .list_versions(with_admin(
            ListVersionsRequest {
                model: model.into(),
            },
            ADMIN,
        ))
        .await?
        .into_inner()
        .versions)
}

/// Fetches a whole model (from `offset`) and checks chunk framing; returns (bytes, sha256, total).
pub async fn fetch(
    ch: &Channel,
    c: &Creds,
    model: &str,
    version: u64,
    offset: u64,
) -> Result<(Vec<u8>, String, u64, usize), Status> {
    let mut s = FederationClient::new(c.channel(ch))
        .fetch_model(with_client(
            FetchModelRequest {
                model: model.into(),
                version,
                offset,
                have_version: 0,
            },
            c,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    let mut sha = String::new();
    let mut total = 0;
    let mut chunks = 0;
    while let Some(ch) = s.message().await? {
        assert_eq!(
            ch.offset,
            offset + out.len() as u64,
            "chunks are contiguous"
        );
        assert!(ch.data.len() <= CHUNK_SIZE);
        sha = ch.sha256;
        total = ch.total_size;
        out.extend_from_slice(&ch.data);
        chunks += 1;
    }
    Ok((out, sha, total, chunks))
}

pub fn header(model: &str, round: u64, base: u64, n: u64, payload: &[u8]) -> UpdateHeader {
    UpdateHeader {
        model: model.into(),
        round_id: round,
        base_version: base,
        num_samples: n,
        train_loss: 0.5,
        payload_size: payload.len() as u64,
        payload_sha256: hex::encode(Sha256::digest(payload)),
        ..Default::default()
    }
}

pub async fn upload_raw(
    ch: &Channel,
    c: &Creds,
    parts: Vec<UpdateChunk>,
) -> Result<UploadAck, Status> {
    Ok(FederationClient::new(c.channel(ch))
        .upload_update(with_client(tokio_stream::iter(parts), c))
        .await?
        .into_inner())
}

pub fn framed(h: UpdateHeader, payload: &[u8]) -> Vec<UpdateChunk> {
    let mut parts = vec![UpdateChunk {
        part: Some(update_chunk::Part::Header(h)),
    }];
    for c in payload.chunks(CHUNK_SIZE / 4) {
        parts.push(UpdateChunk {
            part: Some(update_chunk::Part::Data(c.to_vec())),
        });
    }
    parts
}

pub async fn upload(
    ch: &Channel,
    c: &Creds,
    model: &str,
    round: u64,
    base: u64,
    n: u64,
    payload: &[u8],
) -> Result<UploadAck, Status> {
    upload_raw(
        ch,
        c,
        framed(header(model, round, base, n, payload), payload),
    )
    .await
}

/// A deterministic delta shaped like `global`.
pub fn delta(global: &Weights, seed: f32, scale: f32) -> Weights {
    global
        .iter()
        .map(|(k, t)| {
            let data = (0..t.data.len())
                .map(|i| scale * ((i as f32) * 0.37 + seed).sin())
                .collect();
            (k.clone(), Tensor::new(t.shape.clone(), data))
        })
        .collect()
}

pub fn encode(d: &Weights, bits: u8, seed: u64) -> Vec<u8> {
    let mut residual = Weights::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    encode_update(
        d,
        &mut residual,
        &CodecConfig {
            bits,
            topk_fraction: 1.0,
            entropy: true,
            compact: false,
        },
        &mut rng,
    )
    .unwrap()
}

/// global + Σ nᵢ·decode(pᵢ) / Σ nᵢ, computed independently of the coordinator.
pub fn fedavg(global: &Weights, updates: &[(&[u8], u64)]) -> Weights {
    let total: f64 = updates.iter().map(|u| u.1 as f64).sum();
    let decoded: Vec<(Weights, f64)> = updates
        .iter()
        .map(|(p, n)| (decode_update(p).unwrap(), *n as f64))
        .collect();
    map_weights(global, |k, i, g| {
        let s: f64 = decoded
            .iter()
            .map(|(d, n)| n * f64::from(d[k].data[i]))
            .sum();
        (f64::from(g) + s / total) as f32
    })
}

/// Weights shaped like `like` whose value at (tensor `k`, index `i`) is `f(k, i, like[k][i])`.
pub fn map_weights(like: &Weights, f: impl Fn(&str, usize, f32) -> f32) -> Weights {
    like.iter()
        .map(|(k, t)| {
            let data = t
                .data
                .iter()
                .enumerate()
                .map(|(i, v)| f(k, i, *v))
                .collect();
            (k.clone(), Tensor::new(t.shape.clone(), data))
        })
        .collect()
}

pub fn max_abs_diff(a: &Weights, b: &Weights) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, t)| t.data.iter().zip(&b[k].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

pub async fn next_event(s: &mut Streaming<FederationEvent>) -> federation_event::Event {
    tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("event within 20 s")
        .unwrap()
        .expect("stream open")
        .event
        .unwrap()
}

pub async fn wait_state(ch: &Channel, model: &str, round: u64, want: RoundState) -> RoundStatus {
    for _ in 0..200 {
        let s = status(ch, model, round).await;
        if s.state == want as i32 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("round {round} did not reach {want:?}");
}

// ---------------------------------------------------------------- TLS

/// A client identity issued by the coordinator's CA: (client id, certificate PEM, key PEM).
#[derive(Clone, Debug)]
pub struct TlsCreds {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A TLS channel to the coordinator of `h`, trusting its CA and presenting `id` if given.
pub async fn tls_channel(
    h: &hearth_coordinator::CoordinatorHandle,
    id: Option<&TlsCreds>,
) -> Result<Channel, tonic::transport::Error> {
    hearth_coordinator::client::connect(
        &h.endpoint(),
        h.ca_pem(),
        id.map(|c| (c.cert_pem.as_str(), c.key_pem.as_str())),
    )
    .await
}

/// A fresh key and a CSR for it, as an agent makes them: (key PEM, CSR PEM).
pub fn key_and_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key.serialize_pem(), csr)
}

/// Enrols over TLS by CSR (`ch` needs no client certificate).
pub async fn enroll_tls(ch: &Channel, token: &str, name: &str) -> Result<TlsCreds, Status> {
    let (key_pem, csr_pem) = key_and_csr();
    let r = EnrollmentClient::new(ch.clone())
        .enroll(EnrollRequest {
            token: token.into(),
            device_name: name.into(),
            csr_pem,
        })
        .await?
        .into_inner();
    assert!(r.client_key.is_empty(), "no shared key over TLS");
    Ok(TlsCreds {
        id: r.client_id,
        cert_pem: r.client_cert_pem,
        key_pem,
    })
}

/// The client side of a TLS test coordinator: `ch` trusts its CA and presents no certificate
/// (enrolment and admin calls); clients enrolled through [`Tls::enroll`] get channels of
/// their own with their certificate.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ch: Channel,
    pub endpoint: String,
    pub ca_pem: String,
}

impl Tls {
    /// Connects to the (TLS) coordinator of `h`.
    pub async fn connect(h: &hearth_coordinator::CoordinatorHandle) -> Tls {
        let ca = h.ca_pem().expect("a TLS coordinator (insecure = false)");
        Tls::to(&h.endpoint(), ca).await.unwrap()
    }

    /// Connects to `endpoint` (`https://…`) trusting `ca_pem`.
    pub async fn to(endpoint: &str, ca_pem: &str) -> Result<Tls, tonic::transport::Error> {
        let ch = hearth_coordinator::client::connect(endpoint, Some(ca_pem), None).await?;
        Ok(Tls {
            ch,
            endpoint: endpoint.into(),
            ca_pem: ca_pem.into(),
        })
    }

    /// Enrols `name` by CSR with `token` and connects it with the certificate it received.
    pub async fn enroll(&self, token: &str, name: &str) -> Result<Creds, Status> {
        let cert = enroll_tls(&self.ch, token, name).await?;
        Ok(self.client(&cert).await)
    }

    /// A client presenting `cert` on a channel of its own.
    pub async fn client(&self, cert: &TlsCreds) -> Creds {
        let ch = hearth_coordinator::client::connect(
            &self.endpoint,
            Some(&self.ca_pem),
            Some((&cert.cert_pem, &cert.key_pem)),
        )
        .await
        .unwrap();
        Creds {
            id: cert.id.clone(),
            key: String::new(),
            tls: Some(ClientTls {
                cert: cert.clone(),
                ch,
            }),
        }
    }

    /// `c` (a TLS client of another coordinator process on the same CA, e.g. before a
    /// restart) connected to this one with the same certificate.
    pub async fn rebind(&self, c: &Creds) -> Creds {
        self.client(&c.tls.as_ref().expect("a TLS client").cert)
            .await
    }
}

/// Waits (≤ 60 s) until a coordinator starting on `addr` with its PKI in `pki_dir` (another
/// thread or process) has written its CA and answers TLS handshakes.
pub async fn tls_when_ready(addr: std::net::SocketAddr, pki_dir: &Path) -> Tls {
    let ca_path = pki_dir.join(hearth_coordinator::pki::CA_CERT_FILE);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ca) = std::fs::read_to_string(&ca_path) {
            if let Ok(t) = Tls::to(&format!("https://{addr}"), &ca).await {
                return t;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS coordinator on {addr} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a test coordinator keeps its state: sled (in the test's temp dir) or a database of
/// a PostgreSQL cluster started for the test (see [`pg::PgCluster`]).
pub struct Backend {
    pub pg: Option<(pg::PgCluster, String)>,
}

impl Backend {
    pub fn sled() -> Backend {
        Backend { pg: None }
    }

    /// A fresh cluster and database; `None` (the test is skipped, with a message) without
    /// PostgreSQL binaries.
    pub fn postgres() -> Option<Backend> {
        let cluster = pg::PgCluster::start()?;
        let url = cluster.database("hearth");
        Some(Backend {
            pg: Some((cluster, url)),
        })
    }

    /// Points `c` at this backend (the same database at every call).
    pub fn configure(&self, mut c: hearth_coordinator::Config) -> hearth_coordinator::Config {
        if let Some((_, url)) = &self.pg {
            c.store.backend = hearth_coordinator::StoreBackend::Postgres;
            c.store.url = url.clone();
            c.store.poll_ms = 200;
        }
        c
    }

    /// The `[store]` section of a config file for this backend (empty for sled).
    pub fn toml(&self) -> String {
        match &self.pg {
            Some((_, url)) => {
                format!("[store]\nbackend = \"postgres\"\nurl = {url:?}\npoll_ms = 200\n")
            }
            None => String::new(),
        }
    }
}

/// `async fn name(b: Backend) { .. }` becomes the tests `name::sled` and `name::postgres`:
/// the same body on both storage backends (the latter skipped without PostgreSQL binaries).
#[macro_export]
macro_rules! on_both_backends {
    ($(#[$m:meta])* async fn $name:ident($b:ident: Backend) $body:block) => {
        $(#[$m])*
        mod $name {
            use super::*;

            async fn case($b: Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                case(Backend::sled()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(b) = Backend::postgres() {
                    case(b).await
                }
            }
        }
    };
}
