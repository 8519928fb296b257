//! `bench/scale`: many light simulated clients against real coordinator processes, one table.
//!
//! Every client is a tokio task in this process with an identity of its own, enrolled through
//! the real `Enroll` call (insecure mode: a shared key per client; see the caveats) and
//! uploading over real gRPC on loopback TCP (clients share a few HTTP/2 connections per
//! instance). The updates are real: local training of the digits MLP 64-32-10 (1 epoch, lr
//! 0.1, batch 32) on a few non-IID shares, coded with the agents' codec, precomputed once and
//! reused (each client sends one of them against the round's base version).
//!
//! Runs (`--only`):
//! - `sled`: one coordinator on sled; rounds of 100, 250, 500 and 1,000 clients (issue 10's
//!   scale run): accepted updates/s, round time, RSS after each round, a plot of RSS against
//!   clients (`bench/results/scale-memory.svg`).
//! - `pg1`, `pg2`, `pg2-kill`: PostgreSQL made by `initdb` in a temp dir (fsync on), 10,000
//!   clients; one round against one instance, one against two, and one against two where one
//!   is SIGKILLed when half the updates are in (its clients retry on the survivor, as agents
//!   do): accepted updates/s, round time, database commits and row writes per round
//!   (`pg_stat_database`), WAL bytes, RSS per instance; the killed round is checked: exactly
//!   one marker per client, every acknowledged update among them, the round completed.
//!
//! Writes `bench/results/scale.{md,json}` and prints the table.
#![forbid(unsafe_code)]

#[path = "../../coordinator/tests/common/pg.rs"]
mod pg_cluster;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hearth_model::{
    clip_l2, encode_update, sub, train, CodecConfig, OnnxModel, Split, TaskSpec, TrainConfig,
    Weights,
};
use hearth_proto::v1::{
    admin_client::AdminClient, enrollment_client::EnrollmentClient,
    federation_client::FederationClient, update_chunk, CreateTokenRequest, EnrollRequest,
    FetchModelRequest, ListVersionsRequest, RoundState, RoundStatus, RoundStatusRequest,
    StartRoundRequest, UpdateChunk, UpdateHeader,
};
use hearth_proto::{CHUNK_SIZE, CLIENT_ID_HEADER, CLIENT_KEY_HEADER};
use rand::SeedableRng;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tonic::Request;

const MODEL: &str = "digits";
const ADMIN: &str = "scale-bench-admin-token-0123456789abcdef";

#[derive(Parser, Debug)]
#[command(
    about = "Many simulated clients over real gRPC against coordinator processes (sled, \
                   and one or two instances on PostgreSQL); writes bench/results/scale.{md,json}."
)]
struct Args {
    /// The hearth-coordinator binary.
    #[arg(long)]
    coordinator: PathBuf,
    /// Round sizes of the sled run.
    #[arg(long, value_delimiter = ',', default_value = "100,250,500,1000")]
    sled_clients: Vec<usize>,
    /// Clients of the PostgreSQL runs.
    #[arg(long, default_value_t = 10_000)]
    pg_clients: usize,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// HTTP/2 connections per coordinator instance the clients share.
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// Distinct real updates precomputed (clients reuse them).
    #[arg(long, default_value_t = 8)]
    updates: usize,
    /// Runs: sled; pg1, pg2 (one accept at a time per instance); pg1-slots, pg2-slots,
    /// pg2-slots-kill (`--slots` accepts at once per instance).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sled,pg1,pg2,pg1-slots,pg2-slots,pg2-slots-kill"
    )]
    only: Vec<String>,
    /// `store.accept_slots` of the `-slots` runs.
    #[arg(long, default_value_t = 8)]
    slots: u32,
    /// Data directory (the digits task).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Where scale.{md,json} and the memory plot go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// PostgreSQL with fsync off (faster, not durable; the default keeps fsync on).
    #[arg(long)]
    pg_no_fsync: bool,
}

/// One row of the table.
#[derive(Clone, Debug, Default, Serialize)]
struct Row {
    run: String,
    backend: String,
    instances: usize,
    clients: usize,
    accepted: usize,
    duplicates: usize,
    refused: usize,
    retries: usize,
    updates_in_round: u32,
    upload_secs: f64,
    accepted_per_sec: f64,
    round_ms: u64,
    /// RSS after the round, MiB, per instance (the killed one: at its death).
    rss_mib: Vec<f64>,
    /// Peak RSS so far, MiB, per instance.
    peak_rss_mib: Vec<f64>,
    db_commits: Option<i64>,
    db_rows_inserted: Option<i64>,
    db_rows_updated: Option<i64>,
    db_rows_deleted: Option<i64>,
    wal_mib: Option<f64>,
    check: String,
}

#[derive(Clone, Debug)]
struct Creds {
    id: String,
    key: String,
}

/// A coordinator process started by the bench; killed and reaped on drop.
struct Instance {
    child: Option<Child>,
    pid: u32,
    chans: Vec<Channel>,
}

impl Instance {
    async fn start(bin: &Path, config: &Path, log: &Path, channels: usize) -> Result<Instance> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg(addr.to_string())
            .env("RUST_LOG", "warn")
            .env_remove("HEARTH_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut inst = Instance {
            child: Some(child),
            pid,
            chans: Vec::new(),
        };
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = inst
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "coordinator exited at start-up ({st}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if Instant::now() > until {
                bail!("coordinator did not serve on {addr} within 120 s");
            }
            if let Ok(ch) = connect(addr).await {
                if versions(&ch).await.is_ok() {
                    inst.chans.push(ch);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        while inst.chans.len() < channels.max(1) {
            inst.chans.push(connect(addr).await?);
        }
        Ok(inst)
    }

    fn admin(&self) -> Channel {
        self.chans[0].clone()
    }

    /// (VmRSS, VmHWM) in MiB.
    fn rss(&self) -> (f64, f64) {
        rss_of(self.pid)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

fn rss_of(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Coded updates (payload, sample count), made once and shared by the simulated clients.
type CodedUpdates = Option<Arc<Vec<(Vec<u8>, u64)>>>;

async fn connect(addr: SocketAddr) -> Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN}").parse().expect("ascii"),
    );
    r
}

fn as_client<T>(msg: T, c: &Creds) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(CLIENT_ID_HEADER, c.id.parse().expect("ascii id"));
    r.metadata_mut()
        .insert(CLIENT_KEY_HEADER, c.key.parse().expect("ascii key"));
    r
}

async fn versions(ch: &Channel) -> Result<Vec<hearth_proto::v1::ModelVersion>> {
    Ok(AdminClient::new(ch.clone())
        .list_versions(admin(ListVersionsRequest {
            model: MODEL.into(),
        }))
        .await?
        .into_inner()
        .versions)
}

async fn status(ch: &Channel, round: u64) -> Result<RoundStatus> {
    Ok(AdminClient::new(ch.clone())
        .get_round_status(admin(RoundStatusRequest {
            model: MODEL.into(),
            round_id: round,
        }))
        .await?
        .into_inner())
}

/// The coordinator config: insecure (shared keys), no rate limit (10,000 enrolments come
/// from one address), FedAvg (`combine = "mean"`: the O(model) path), no held-out evaluation.
fn write_config(dir: &Path, name: &str, data: &Path, store: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let text = format!(
        "db_path = {db:?}\ndata_dir = {data:?}\nadmin_token = {ADMIN:?}\ninsecure = true\n\
         signing_key_file = {key:?}\n\
         [rate_limit]\ncalls_per_minute = 0\n\
         [limits]\nmax_connections = 1024\nmax_streams_per_connection = 256\n\
         [round]\nmin_clients = 1\nmax_clients = 100000\ndeadline_secs = 900\n\
         [aggregation]\ncombine = \"mean\"\n\
         [[model]]\nname = {MODEL:?}\ntask = \"digits\"\neval = false\nseed = 7\n{store}",
        db = dir.join("state").join("coordinator.db"),
        key = dir.join("state").join("signing.key"),
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Enrols `n` clients through the real `Enroll` call, spread over instances and tokens.
async fn enroll_all(insts: &[&Instance], n: usize, concurrency: usize) -> Result<Vec<Creds>> {
    let tokens = 16.min(n.max(1));
    let mut toks = Vec::new();
    for _ in 0..tokens {
        let t = AdminClient::new(insts[0].admin())
            .create_enrollment_token(admin(CreateTokenRequest {
                uses: n.div_ceil(tokens) as u32,
                device_name: String::new(),
                ttl_secs: 3600,
            }))
            .await?
            .into_inner()
            .token;
        toks.push(t);
    }
    let sem = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for i in 0..n {
        let inst = insts[i % insts.len()];
        let ch = inst.chans[i % inst.chans.len()].clone();
        let token = toks[i % tokens].clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let r = EnrollmentClient::new(ch)
                .enroll(EnrollRequest {
                    token,
                    device_name: format!("sim-{i}"),
                    csr_pem: String::new(),
                })
                .await?
                .into_inner();
            Ok::<_, tonic::Status>(Creds {
                id: r.client_id,
                key: r.client_key,
            })
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Version 1 as a client fetches it.
async fn fetch_v1(ch: &Channel, c: &Creds) -> Result<Vec<u8>> {
    let mut s = FederationClient::new(ch.clone())
        .fetch_model(as_client(
            FetchModelRequest {
                model: MODEL.into(),
                version: 1,
                offset: 0,
                have_version: 0,
            },
            c,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

/// `count` real updates: one local epoch of the digits MLP on non-IID shares of the train
/// split, clipped and coded as an agent does. Returns (payload, samples).
fn real_updates(onnx: &[u8], data: &Path, count: usize) -> Result<Vec<(Vec<u8>, u64)>> {
    let model = OnnxModel::from_bytes(onnx)?;
    let task = TaskSpec::resolve("digits", data)?;
    let train_set = task.load(Split::Train)?;
    let base = model.weights();
    let mut out = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..count {
        let share = train_set.partition(i, count, 0.5, 42);
        if share.is_empty() {
            continue;
        }
        let cfg = TrainConfig {
            epochs: 1,
            learning_rate: 0.1,
            batch_size: 32,
            seed: i as u64,
            ..TrainConfig::default()
        };
        let (local, _) = train(&model, &share, &cfg)?;
        let mut delta = sub(&local, &base)?;
        clip_l2(&mut delta, 10.0);
        let mut residual = Weights::new();
        let payload = encode_update(&delta, &mut residual, &CodecConfig::default(), &mut rng)?;
        out.push((payload, share.len() as u64));
    }
    if out.is_empty() {
        bail!("no update could be made");
    }
    Ok(out)
}

fn framed(round: u64, base: u64, payload: &[u8], samples: u64) -> Vec<UpdateChunk> {
    let header = UpdateHeader {
        model: MODEL.into(),
        round_id: round,
        base_version: base,
        num_samples: samples,
        train_loss: 0.5,
        payload_size: payload.len() as u64,
        payload_sha256: hex::encode(Sha256::digest(payload)),
        ..UpdateHeader::default()
    };
    let mut parts = vec![UpdateChunk {
        part: Some(update_chunk::Part::Header(header)),
    }];
    for c in payload.chunks(CHUNK_SIZE) {
        parts.push(UpdateChunk {
            part: Some(update_chunk::Part::Data(c.to_vec())),
        });
    }
    parts
}

/// How a round's uploads ended.
#[derive(Default)]
struct Tally {
    accepted: AtomicUsize,
    duplicates: AtomicUsize,
    refused: AtomicUsize,
    retries: AtomicUsize,
    /// Clients whose update was acknowledged as accepted.
    acked: Mutex<Vec<String>>,
    reasons: Mutex<Vec<String>>,
}

/// One round: opened on the first instance with `clients.len()` as min and max, every client
/// uploads once (to instance `i % live`, retrying on another instance when the call fails),
/// and with `kill` the second instance is SIGKILLed when half the updates are acknowledged.
/// Returns the tally, the seconds from the first upload to the last acknowledgement, the
/// round's final status and its id.
async fn run_round(
    insts: &mut [Instance],
    clients: &[Creds],
    updates: &Arc<Vec<(Vec<u8>, u64)>>,
    concurrency: usize,
    kill: bool,
) -> Result<(Arc<Tally>, f64, RoundStatus, Vec<(f64, f64)>)> {
    let n = clients.len() as u32;
    let st = AdminClient::new(insts[0].admin())
        .start_round(admin(StartRoundRequest {
            model: MODEL.into(),
            min_clients: n,
            max_clients: n,
            deadline_secs: 900,
            reason: "bench".into(),
            ..StartRoundRequest::default()
        }))
        .await?
        .into_inner();
    let (round, base) = (st.round_id, st.base_version);
    let chans: Arc<Vec<Vec<Channel>>> = Arc::new(insts.iter().map(|i| i.chans.clone()).collect());
    // Instances a client may still use (the killed one drops out).
    let alive: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(vec![true; insts.len()]));
    let tally = Arc::new(Tally::default());
    let sem = Arc::new(Semaphore::new(concurrency));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, chans, alive, tally, sem, updates) = (
            c.clone(),
            chans.clone(),
            alive.clone(),
            tally.clone(),
            sem.clone(),
            updates.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.expect("semaphore");
            let (payload, samples) = &updates[i % updates.len()];
            let parts = framed(round, base, payload, *samples);
            for attempt in 0..50usize {
                let inst = {
                    let a = alive.lock().expect("alive");
                    let live: Vec<usize> = (0..a.len()).filter(|k| a[*k]).collect();
                    live[(i + attempt) % live.len()]
                };
                let ch = chans[inst][i % chans[inst].len()].clone();
                let call = FederationClient::new(ch)
                    .upload_update(as_client(tokio_stream::iter(parts.clone()), &c))
                    .await;
                match call {
                    Ok(ack) => {
                        let ack = ack.into_inner();
                        if ack.accepted {
                            tally.accepted.fetch_add(1, Ordering::SeqCst);
                            tally.acked.lock().expect("acked").push(c.id.clone());
                        } else if ack.duplicate {
                            tally.duplicates.fetch_add(1, Ordering::SeqCst);
                        } else {
                            tally.refused.fetch_add(1, Ordering::SeqCst);
                            tally.reasons.lock().expect("reasons").push(ack.reason);
                        }
                        return;
                    }
                    Err(_) => {
                        // The instance died under the call (or refused it): as an agent does,
                        // retry, on another instance.
                        tally.retries.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            tally.refused.fetch_add(1, Ordering::SeqCst);
            tally
                .reasons
                .lock()
                .expect("reasons")
                .push("gave up after 50 attempts".into());
        }));
    }
    let mut killed_rss = None;
    if kill && insts.len() > 1 {
        let until = Instant::now() + Duration::from_secs(600);
        while tally.accepted.load(Ordering::SeqCst) < clients.len() / 2 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        killed_rss = Some(insts[1].rss());
        alive.lock().expect("alive")[1] = false;
        insts[1].kill();
        eprintln!(
            "  SIGKILLed instance 2 at {} acknowledged updates",
            tally.accepted.load(Ordering::SeqCst)
        );
    }
    for t in tasks {
        t.await?;
    }
    let upload_secs = t0.elapsed().as_secs_f64();
    let survivor = insts[0].admin();
    let until = Instant::now() + Duration::from_secs(300);
    let fin = loop {
        let s = status(&survivor, round).await?;
        if s.state != RoundState::Open as i32 || Instant::now() > until {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss = insts
        .iter()
        .enumerate()
        .map(|(k, inst)| match (k, killed_rss) {
            (1, Some(r)) => r,
            _ => inst.rss(),
        })
        .collect();
    Ok((tally, upload_secs, fin, rss))
}

/// The published version's round wall time (opening to close), ms.
async fn round_wall_ms(ch: &Channel, round: u64) -> Result<u64> {
    Ok(versions(ch)
        .await?
        .iter()
        .find(|v| v.from_round == round)
        .map_or(0, |v| v.round_wall_ms))
}

#[allow(clippy::too_many_arguments)]
fn row_of(
    run: &str,
    backend: &str,
    instances: usize,
    clients: usize,
    tally: &Tally,
    upload_secs: f64,
    fin: &RoundStatus,
    round_ms: u64,
    rss: &[(f64, f64)],
) -> Row {
    let accepted = tally.accepted.load(Ordering::SeqCst);
    Row {
        run: run.into(),
        backend: backend.into(),
        instances,
        clients,
        accepted,
        duplicates: tally.duplicates.load(Ordering::SeqCst),
        refused: tally.refused.load(Ordering::SeqCst),
        retries: tally.retries.load(Ordering::SeqCst),
        updates_in_round: fin.updates,
        upload_secs,
        accepted_per_sec: fin.updates as f64 / upload_secs.max(1e-9),
        round_ms,
        rss_mib: rss.iter().map(|r| r.0).collect(),
        peak_rss_mib: rss.iter().map(|r| r.1).collect(),
        ..Row::default()
    }
}

async fn sled_run(
    args: &Args,
    updates_out: &mut CodedUpdates,
) -> Result<(Vec<Row>, Vec<(f64, f64, f64)>)> {
    let dir = tempfile::tempdir()?;
    let data = std::fs::canonicalize(&args.data_dir)?;
    let config = write_config(dir.path(), "coordinator.toml", &data, "")?;
    let mut insts = vec![
        Instance::start(
            &args.coordinator,
            &config,
            &dir.path().join("coordinator.log"),
            args.channels,
        )
        .await?,
    ];
    let idle = insts[0].rss();
    let most = args.sled_clients.iter().copied().max().unwrap_or(0);
    let t = Instant::now();
    let clients = enroll_all(&[&insts[0]], most, args.concurrency).await?;
    eprintln!(
        "sled: {most} clients enrolled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let onnx = fetch_v1(&insts[0].chans[0], &clients[0]).await?;
    let (data, count) = (args.data_dir.clone(), args.updates);
    let updates =
        Arc::new(tokio::task::spawn_blocking(move || real_updates(&onnx, &data, count)).await??);
    *updates_out = Some(updates.clone());
    let mut rows = Vec::new();
    let mut memory = vec![(0.0, idle.0, idle.1)];
    for &n in &args.sled_clients {
        let (tally, secs, fin, rss) =
            run_round(&mut insts, &clients[..n], &updates, args.concurrency, false).await?;
        let ms = round_wall_ms(&insts[0].admin(), fin.round_id).await?;
        let mut row = row_of("sled", "sled", 1, n, &tally, secs, &fin, ms, &rss);
        row.check = check_simple(&fin, n);
        eprintln!(
            "  {n} clients: {:.0} accepted/s, round {ms} ms, RSS {:.1} MiB",
            row.accepted_per_sec, rss[0].0
        );
        memory.push((n as f64, rss[0].0, rss[0].1));
        rows.push(row);
    }
    Ok((rows, memory))
}

fn check_simple(fin: &RoundStatus, n: usize) -> String {
    if fin.state == RoundState::Completed as i32 && fin.updates as usize == n {
        format!("completed, {n} updates")
    } else {
        format!(
            "NOT completed: state {} with {} updates",
            fin.state, fin.updates
        )
    }
}

/// Cumulative counters of the database: commits, rows inserted/updated/deleted, WAL bytes.
async fn db_counters(db: &tokio_postgres::Client) -> Result<(i64, i64, i64, i64, i64)> {
    // Other backends report their counters when idle (at most every second or so).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.execute("SELECT pg_stat_clear_snapshot()", &[]).await?;
    let r = db
        .query_one(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, \
             (SELECT wal_bytes FROM pg_stat_wal)::int8 \
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

async fn pg_run(args: &Args, updates: CodedUpdates) -> Result<Vec<Row>> {
    let Some(cluster) = pg_cluster::PgCluster::start_with(!args.pg_no_fsync) else {
        bail!("no PostgreSQL binaries: apt-get install -y postgresql");
    };
    let url = cluster.database("scale");
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let dir = tempfile::tempdir()?;
    let data = std::fs::canonicalize(&args.data_dir)?;
    let store = |slots: u32| {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = {url:?}\npool_size = {}\naccept_slots = {slots}\n",
            slots + 8
        )
    };
    let configs = [
        write_config(dir.path(), "coordinator.toml", &data, &store(1))?,
        write_config(
            dir.path(),
            "coordinator-slots.toml",
            &data,
            &store(args.slots),
        )?,
    ];
    let mut started = 0usize;
    let mut start = |slotted: bool| {
        started += 1;
        let log = dir.path().join(format!("instance-{started}.log"));
        let config = configs[usize::from(slotted)].clone();
        let (bin, channels) = (args.coordinator.clone(), args.channels);
        async move { Instance::start(&bin, &config, &log, channels).await }
    };
    let mut insts = vec![start(false).await?];
    let mut slotted = false;
    let n = args.pg_clients;
    let t = Instant::now();
    let clients = enroll_all(&[&insts[0]], n, args.concurrency).await?;
    eprintln!(
        "postgres: {n} clients enrolled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let updates = match updates {
        Some(u) => u,
        None => {
            let onnx = fetch_v1(&insts[0].chans[0], &clients[0]).await?;
            let (data, count) = (args.data_dir.clone(), args.updates);
            Arc::new(tokio::task::spawn_blocking(move || real_updates(&onnx, &data, count)).await??)
        }
    };
    let mut rows = Vec::new();
    for run in ["pg1", "pg2", "pg1-slots", "pg2-slots", "pg2-slots-kill"] {
        if !args.only.iter().any(|o| o == run) {
            continue;
        }
        let want = if run.starts_with("pg1") { 1 } else { 2 };
        let slots = run.contains("slots");
        if slots != slotted {
            // Another config: every instance restarts with it.
            insts.clear();
            slotted = slots;
        }
        while insts.len() > want {
            insts.pop();
        }
        while insts.len() < want {
            let next = start(slotted).await?;
            insts.push(next);
        }
        let before = db_counters(&db).await?;
        let kill = run.ends_with("kill");
        let (tally, secs, fin, rss) =
            run_round(&mut insts, &clients, &updates, args.concurrency, kill).await?;
        let ms = round_wall_ms(&insts[0].admin(), fin.round_id).await?;
        let after = db_counters(&db).await?;
        let backend = if slots {
            format!("postgres, accept_slots {}", args.slots)
        } else {
            "postgres".to_string()
        };
        let mut row = row_of(run, &backend, want, n, &tally, secs, &fin, ms, &rss);
        row.db_commits = Some(after.0 - before.0);
        row.db_rows_inserted = Some(after.1 - before.1);
        row.db_rows_updated = Some(after.2 - before.2);
        row.db_rows_deleted = Some(after.3 - before.3);
        row.wal_mib = Some((after.4 - before.4) as f64 / (1024.0 * 1024.0));
        // Every update counted once: one marker per client, each acknowledged one among them.
        let id = fin.round_id as i64;
        let m = db
            .query_one(
                "SELECT count(*), count(DISTINCT client_id) FROM markers WHERE round = $1",
                &[&id],
            )
            .await?;
        let (markers, distinct): (i64, i64) = (m.get(0), m.get(1));
        let stored: HashSet<String> = db
            .query("SELECT client_id FROM markers WHERE round = $1", &[&id])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let acked = tally.acked.lock().expect("acked").clone();
        let lost = acked.iter().filter(|c| !stored.contains(*c)).count();
        let completed = fin.state == RoundState::Completed as i32;
        row.check = format!(
            "{}; {markers} markers ({distinct} distinct) for {n} clients; {lost} acknowledged updates missing",
            if completed { "completed" } else { "NOT completed" }
        );
        if !(completed && markers == n as i64 && distinct == n as i64 && lost == 0) {
            row.check = format!("FAILED: {}", row.check);
        }
        if insts.len() > 1 && kill {
            // The killed instance is gone; the next run starts a fresh second instance.
            insts.truncate(1);
        }
        eprintln!(
            "  {run}: {:.0} accepted/s, round {ms} ms, {} commits, check: {}",
            row.accepted_per_sec,
            row.db_commits.unwrap_or(0),
            row.check
        );
        let reasons = tally.reasons.lock().expect("reasons").clone();
        if !reasons.is_empty() {
            eprintln!(
                "  refusals (first 3): {:?}",
                &reasons[..reasons.len().min(3)]
            );
        }
        rows.push(row);
    }
    drop(insts);
    drop(cluster);
    Ok(rows)
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| run | backend | instances | clients | accepted/s | upload s | round ms | updates | dup / retries / refused | RSS MiB (per instance) | peak RSS MiB | DB commits | rows ins / upd / del | WAL MiB | check |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let opt = |v: Option<i64>| v.map_or("–".to_string(), |x| x.to_string());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {} | {} | {} / {} / {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
            r.run,
            r.backend,
            r.instances,
            r.clients,
            r.accepted_per_sec,
            r.upload_secs,
            r.round_ms,
            r.updates_in_round,
            r.duplicates,
            r.retries,
            r.refused,
            fmt_list(&r.rss_mib),
            fmt_list(&r.peak_rss_mib),
            opt(r.db_commits),
            opt(r.db_rows_inserted),
            opt(r.db_rows_updated),
            opt(r.db_rows_deleted),
            r.wal_mib.map_or("–".to_string(), |w| format!("{w:.1}")),
            r.check,
        ));
    }
    s
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let load_before = loadavg();
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    let mut updates = None;
    if args.only.iter().any(|o| o == "sled") {
        let (r, m) = sled_run(&args, &mut updates).await?;
        rows.extend(r);
        memory = m;
    }
    if args.only.iter().any(|o| o.starts_with("pg")) {
        rows.extend(pg_run(&args, updates.clone()).await?);
    }
    let load_after = loadavg();
    let payload = updates
        .as_ref()
        .map(|u| u.iter().map(|x| x.0.len()).sum::<usize>() / u.len().max(1))
        .unwrap_or(0);
    std::fs::create_dir_all(&args.out)?;
    if !memory.is_empty() {
        let series = vec![
            (
                "RSS after the round".to_string(),
                memory.iter().map(|m| (m.0, m.1)).collect(),
            ),
            (
                "peak RSS so far".to_string(),
                memory.iter().map(|m| (m.0, m.2)).collect(),
            ),
        ];
        hearth_coordinator::plot::write_lines(
            "coordinator memory against clients per round (sled, FedAvg)",
            "clients in the round (0 = idle after start)",
            "MiB",
            &series,
            &args.out.join("scale-memory.svg"),
        )?;
    }
    let table = table(&rows);
    let md = format!(
        "# bench/scale\n\n{table}\n\
         Load average before / after: {load_before} / {load_after}; {:.0} s in all. \
         Concurrency {} uploads in flight over {} HTTP/2 connections per instance; \
         mean update payload {payload} bytes (digits MLP 64-32-10, int8 codec). \
         PostgreSQL fsync {}.\n",
        t0.elapsed().as_secs_f64(),
        args.concurrency,
        args.channels,
        if args.pg_no_fsync { "off" } else { "on" },
    );
    println!("{md}");
    std::fs::write(args.out.join("scale.md"), &md)?;
    let json = serde_json::json!({
        "rows": rows,
        "memory_mib": memory.iter().map(|m| serde_json::json!({"clients": m.0, "rss": m.1, "peak": m.2})).collect::<Vec<_>>(),
        "load_before": load_before,
        "load_after": load_after,
        "concurrency": args.concurrency,
        "channels": args.channels,
        "update_payload_bytes": payload,
        "pg_fsync": !args.pg_no_fsync,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    std::fs::write(
        args.out.join("scale.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
