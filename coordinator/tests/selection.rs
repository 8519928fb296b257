//! Rounds like a real FL server, over gRPC with TLS and client certificates (127.0.0.1): the
//! cohort is a seeded random draw from the *available* clients (those holding a `Subscribe`
//! stream), clients left out are told so in their round task and their uploads refused and
//! counted; a round waits (bounded) for `min_available_clients` or is refused with the reason;
//! a refresh can ask for several rounds back to back or until a target accuracy; clients'
//! federated evaluation is aggregated per version; versions list what produced them; a
//! rollback republishes an old version's content as a new signed version.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use hearth_coordinator::{start, Config, CoordinatorHandle, ModelConfig};
use hearth_model::OnnxModel;
use hearth_proto::v1::{
    admin_client::AdminClient, federation_client::FederationClient, federation_event,
    CreateTokenRequest, FederationEvent, FetchModelRequest, RollbackRequest, RoundState, RoundTask,
    StartRoundRequest, SubscribeRequest, UploadAck,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const MODEL: &str = "digits";

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        db_path: dir.join("db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        models: vec![ModelConfig {
            name: MODEL.into(),
            task: "digits".into(),
            init: None,
            eval: true,
            seed: 7,
        }],
        ..Config::default()
    };
    c.round.min_clients = 2;
    c.round.max_clients = 10;
    c.round.deadline_secs = 60;
    // Plain FedAvg: the rounds here are about who takes part, not about robustness.
    c.aggregation.combine = hearth_coordinator::Combine::Mean;
    c
}

/// An enrolled client over TLS.
struct Client {
    id: String,
    ch: Channel,
}

async fn clients(h: &CoordinatorHandle, n: usize) -> Vec<Client> {
    let anon = tls_channel(h, None).await.unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let token = AdminClient::new(anon.clone())
            .create_enrollment_token(with_admin(
                CreateTokenRequest {
                    uses: 1,
                    device_name: format!("dev-{i}"),
                    ttl_secs: 0,
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner()
            .token;
        let creds = enroll_tls(&anon, &token, &format!("dev-{i}"))
            .await
            .unwrap();
        let ch = tls_channel(h, Some(&creds)).await.unwrap();
        out.push(Client { id: creds.id, ch });
    }
    out
}

async fn subscribe(c: &Client) -> Streaming<FederationEvent> {
    FederationClient::new(c.ch.clone())
        .subscribe(SubscribeRequest {
            models: vec![MODEL.into()],
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next round task on `s` (published versions are skipped).
async fn next_task(s: &mut Streaming<FederationEvent>) -> RoundTask {
    loop {
        if let federation_event::Event::Round(t) = next_event(s).await {
            return t;
        }
    }
}

async fn admin_ch(h: &CoordinatorHandle) -> AdminClient<Channel> {
    AdminClient::new(tls_channel(h, None).await.unwrap())
}

async fn start_req(
    h: &CoordinatorHandle,
    req: StartRoundRequest,
) -> Result<hearth_proto::v1::RoundStatus, tonic::Status> {
    admin_ch(h)
        .await
        .start_round(with_admin(req, ADMIN))
        .await
        .map(|r| r.into_inner())
}

async fn wait_available(h: &CoordinatorHandle, n: usize) {
    for _ in 0..200 {
        if h.coordinator().available_count(MODEL).unwrap() == n as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{} clients available, wanted {n}",
        h.coordinator().available_count(MODEL).unwrap()
    );
}

/// The weights of `version`, fetched over the client's TLS channel.
async fn global(c: &Client, version: u64) -> hearth_model::Weights {
    let mut s = FederationClient::new(c.ch.clone())
        .fetch_model(FetchModelRequest {
            model: MODEL.into(),
            version,
            offset: 0,
            have_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    OnnxModel::from_bytes(&bytes).unwrap().weights()
}

/// Uploads a small deterministic update for `t`, with a federated evaluation when given.
async fn upload_for(
    c: &Client,
    t: &RoundTask,
    seed: f32,
    eval: Option<(u64, f32, f32)>,
) -> Result<UploadAck, tonic::Status> {
    let g = global(c, t.base_version).await;
    let payload = encode(&delta(&g, seed, 0.01), 8, seed as u64);
    let mut h = header(MODEL, t.round_id, t.base_version, 100, &payload);
    if let Some((n, loss, acc)) = eval {
        h.eval_samples = n;
        h.eval_loss = loss;
        h.eval_accuracy = acc;
    }
    FederationClient::new(c.ch.clone())
        .upload_update(tokio_stream::iter(framed(h, &payload)))
        .await
        .map(|a| a.into_inner())
}

async fn wait_round(h: &CoordinatorHandle, round: u64, want: RoundState) {
    let admin = admin_ch(h).await;
    for _ in 0..400 {
        let s = admin
            .clone()
            .get_round_status(with_admin(
                hearth_proto::v1::RoundStatusRequest {
                    model: MODEL.into(),
                    round_id: round,
                },
                ADMIN,
            ))
            .await
            .unwrap()
            .into_inner();
        if s.state == want as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("round {round} did not reach {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cohort_is_a_seeded_draw_of_the_available_clients_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.round.clients_per_round = 3;
    c.round.selection_seed = Some(42);
    let h = start(c, listener().await).await.unwrap();
    let cs = clients(&h, 6).await;
    // Five follow the model; the sixth is enrolled but not listening.
    let mut streams = Vec::new();
    for c in &cs[..5] {
        streams.push(subscribe(c).await);
    }
    wait_available(&h, 5).await;

    let mut cohorts = Vec::new();
    for round in 0..4 {
        let st = start_req(
            &h,
            StartRoundRequest {
                model: MODEL.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!((st.cohort_size, st.available_clients), (3, 5), "{st:?}");
        // Selection caps the round at its cohort: it completes when all three are in.
        assert_eq!(st.max_clients, 3);
        let rec = h.coordinator().store().round(st.round_id).unwrap().unwrap();
        let cohort: BTreeSet<String> = rec.cohort.iter().cloned().collect();
        assert_eq!(cohort.len(), 3);
        assert!(
            !cohort.contains(&cs[5].id),
            "an unavailable client is never drawn"
        );

        // Each listening client learns whether it was selected.
        let mut tasks = Vec::new();
        for (c, s) in cs.iter().zip(streams.iter_mut()) {
            let t = next_task(s).await;
            assert_eq!(t.round_id, st.round_id);
            assert_eq!(t.not_selected, !cohort.contains(&c.id), "round {round}");
            tasks.push(t);
        }
        // Those left out answer first, and the unsubscribed one too: all refused, counted,
        // and the round does not count them.
        let before = h.coordinator().metrics().rejections("not_selected");
        let outsiders: Vec<&Client> = cs.iter().filter(|c| !cohort.contains(&c.id)).collect();
        assert_eq!(outsiders.len(), 3);
        for (i, c) in outsiders.iter().enumerate() {
            let ack = upload_for(c, &tasks[0], 1.0 + i as f32, None)
                .await
                .unwrap();
            assert!(!ack.accepted, "{ack:?}");
            assert!(ack.reason.contains("not in the cohort"), "{}", ack.reason);
            assert_eq!(ack.updates_in_round, 0);
        }
        assert_eq!(
            h.coordinator().metrics().rejections("not_selected"),
            before + 3
        );
        for (i, c) in cs.iter().filter(|c| cohort.contains(&c.id)).enumerate() {
            let ack = upload_for(c, &tasks[0], 5.0 + i as f32, None)
                .await
                .unwrap();
            assert!(ack.accepted, "{ack:?}");
        }
        wait_round(&h, st.round_id, RoundState::Completed).await;
        cohorts.push(cohort);
    }
    // A random draw, not the same three every time (the first in id order, or the first to
    // answer): over four rounds of 3 of 5 more than three clients took part.
    let everyone: BTreeSet<&String> = cohorts.iter().flatten().collect();
    assert!(everyone.len() > 3, "cohorts {cohorts:?}");
    assert!(
        cohorts.windows(2).any(|w| w[0] != w[1]),
        "cohorts {cohorts:?}"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_waits_for_min_available_clients_then_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.round.min_available_clients = 3;
    c.round.available_wait_secs = 2;
    let h = start(c, listener().await).await.unwrap();
    let cs = clients(&h, 3).await;
    let _a = subscribe(&cs[0]).await;
    let _b = subscribe(&cs[1]).await;
    wait_available(&h, 2).await;
    let req = StartRoundRequest {
        model: MODEL.into(),
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let e = start_req(&h, req.clone()).await.unwrap_err();
    let waited = t0.elapsed();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("only 2 of the 3 clients"),
        "{}",
        e.message()
    );
    assert!(
        waited >= Duration::from_millis(1900),
        "it waited {waited:?}"
    );
    assert_eq!(
        h.coordinator().metrics().rejections("not_enough_clients"),
        1
    );
    assert!(h
        .coordinator()
        .store()
        .latest_round(MODEL)
        .unwrap()
        .is_none());

    // A third client subscribing while a refresh waits lets the round start.
    let h2 = h.coordinator().clone();
    let waiting = tokio::spawn(async move {
        h2.start_round(hearth_coordinator::rounds::StartRound {
            model: MODEL.into(),
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the round waits for a third client");
    let _c = subscribe(&cs[2]).await;
    let rec = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rec.available_clients, 3);
    // A client that leaves stays available for the window, then is not counted.
    h.shutdown().await.unwrap();
}

/// Drives `c`: uploads an update for every round task it is selected for, with a federated
/// evaluation, until `stop`.
fn participant(
    c: Client,
    mut s: Streaming<FederationEvent>,
    seed: f32,
    eval: (u64, f32, f32),
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let mut rounds = 0;
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_secs(30), s.message()).await
        {
            if let Some(federation_event::Event::Round(t)) = ev.event {
                if !t.not_selected {
                    let ack = upload_for(&c, &t, seed + t.round_id as f32, Some(eval))
                        .await
                        .unwrap();
                    assert!(ack.accepted, "{ack:?}");
                    rounds += 1;
                }
            }
        }
        rounds
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_runs_num_rounds_back_to_back_or_stops_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.round.min_clients = 2;
    c.round.max_clients = 2;
    c.round.deadline_secs = 30;
    let h = start(c, listener().await).await.unwrap();
    let cs = clients(&h, 2).await;
    let mut drivers = Vec::new();
    // Federated evaluations: 30 samples at 0.5 and 10 at 0.9 → 0.6 weighted by samples.
    for (i, (c, eval)) in cs
        .into_iter()
        .zip([(30, 1.5, 0.5), (10, 0.5, 0.9)])
        .enumerate()
    {
        let s = subscribe(&c).await;
        drivers.push(participant(c, s, i as f32, eval));
    }
    wait_available(&h, 2).await;
    let first = start_req(
        &h,
        StartRoundRequest {
            model: MODEL.into(),
            num_rounds: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(first.rounds_left, 2);
    // Three rounds run back to back, then the loop ends.
    let store = h.coordinator().store().clone();
    for _ in 0..400 {
        if store.latest_version(MODEL).unwrap().unwrap().version == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(store.latest_version(MODEL).unwrap().unwrap().version, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rounds = store.rounds_of(MODEL).unwrap();
    assert_eq!(rounds.len(), 3, "exactly num_rounds rounds");
    assert!(store.open_rounds().unwrap().is_empty());
    assert_eq!(
        rounds.iter().map(|r| r.rounds_left).collect::<Vec<_>>(),
        vec![2, 1, 0]
    );
    for w in rounds.windows(2) {
        assert_eq!(
            w[1].base_version, w[0].new_version,
            "each round on the last"
        );
    }

    // Federated evaluation per version, weighted by samples, beside the held-out one.
    let versions = AdminClient::new(tls_channel(&h, None).await.unwrap())
        .list_versions(with_admin(
            hearth_proto::v1::ListVersionsRequest {
                model: MODEL.into(),
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 4);
    for v in &versions[..3] {
        assert!((v.federated_accuracy - 0.6).abs() < 1e-4, "{v:?}");
        assert!((v.federated_loss - 1.25).abs() < 1e-4, "{v:?}");
        assert_eq!(v.federated_samples, 40);
        assert!(v.eval_accuracy > 0.0);
    }
    assert_eq!(versions[3].federated_samples, 0, "nobody evaluated v4 yet");
    assert_eq!(versions[3].federated_accuracy, -1.0);
    for v in &versions[1..] {
        assert_eq!(v.round_clients, 2, "{v:?}");
        assert!(v.uplink_bytes > 0 && v.round_wall_ms > 0, "{v:?}");
    }
    // Each client fetched every base version once.
    assert!(versions[..3]
        .iter()
        .all(|v| v.downlink_bytes >= 2 * v.size_bytes));

    // "Until target accuracy", bounded: the first round already reaches a low target.
    let acc4 = versions[3].eval_accuracy;
    let st = start_req(
        &h,
        StartRoundRequest {
            model: MODEL.into(),
            num_rounds: 5,
            target_accuracy: (acc4 * 0.5).max(0.01),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(st.rounds_left, 4);
    wait_round(&h, st.round_id, RoundState::Completed).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        store.rounds_of(MODEL).unwrap().len(),
        4,
        "the target was reached: no further round"
    );
    assert_eq!(store.latest_version(MODEL).unwrap().unwrap().version, 5);
    // Bounds are checked.
    for (n, t) in [(101, 0.0), (1, 1.5)] {
        let e = start_req(
            &h,
            StartRoundRequest {
                model: MODEL.into(),
                num_rounds: n,
                target_accuracy: t,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    h.shutdown().await.unwrap();
    for d in drivers {
        let joined = d.await.unwrap();
        assert_eq!(joined, 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_federated_evaluations_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()), listener().await).await.unwrap();
    let cs = clients(&h, 1).await;
    let mut s = subscribe(&cs[0]).await;
    let st = start_req(
        &h,
        StartRoundRequest {
            model: MODEL.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let t = next_task(&mut s).await;
    assert_eq!(t.round_id, st.round_id);
    // Served bytes are counted (`downlink`) as the test fetches the base; nothing else moves.
    let snapshot = || {
        let mut s = h.coordinator().store().snapshot().unwrap();
        s.remove("downlink");
        s
    };
    let before = snapshot();
    for eval in [(10, f32::NAN, 0.5), (10, 0.5, 1.5), (10, -1.0, 0.5)] {
        let ack = upload_for(&cs[0], &t, 1.0, Some(eval)).await.unwrap();
        assert!(
            !ack.accepted && ack.reason.contains("federated evaluation"),
            "{ack:?}"
        );
    }
    assert_eq!(h.coordinator().metrics().rejections("invalid_eval"), 3);
    assert!(
        snapshot() == before,
        "a refused evaluation changed stored state"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_republishes_an_old_version_signed_with_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.round.min_clients = 1;
    c.round.max_clients = 1;
    let h = start(c, listener().await).await.unwrap();
    let cs = clients(&h, 1).await;
    let mut s = subscribe(&cs[0]).await;
    for _ in 0..2 {
        let st = start_req(
            &h,
            StartRoundRequest {
                model: MODEL.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let t = next_task(&mut s).await;
        assert!(upload_for(&cs[0], &t, 3.0, None).await.unwrap().accepted);
        wait_round(&h, st.round_id, RoundState::Completed).await;
    }
    let mut admin = admin_ch(&h).await;
    let rollback = |version| {
        with_admin(
            RollbackRequest {
                model: MODEL.into(),
                version,
            },
            ADMIN,
        )
    };
    // While a round is open: refused with the reason.
    let open = start_req(
        &h,
        StartRoundRequest {
            model: MODEL.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = admin.rollback(rollback(1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is open"), "{}", e.message());
    let t = next_task(&mut s).await;
    assert!(upload_for(&cs[0], &t, 4.0, None).await.unwrap().accepted);
    wait_round(&h, open.round_id, RoundState::Completed).await;

    let v1 = h.coordinator().store().version(MODEL, 1).unwrap().unwrap();
    let r = admin.rollback(rollback(1)).await.unwrap().into_inner();
    assert_eq!((r.version, r.parent_version, r.rollback_of), (5, 4, 1));
    assert_eq!(r.sha256, v1.sha256, "the content of version 1");
    assert_eq!(r.eval_accuracy, v1.eval_accuracy.unwrap());
    // Signed over (model, 5, parent 4, digest) with the coordinator's key.
    let key =
        hearth_proto::signing::ModelVerifier::from_bytes(&h.coordinator().model_signing_key())
            .unwrap();
    let st =
        hearth_proto::signing::ModelStatement::with_hex_digest(MODEL, 5, 4, &r.sha256).unwrap();
    key.verify(&st, &r.signature).unwrap();
    // Announced to subscribers like any version, and served with the old bytes.
    loop {
        if let federation_event::Event::Published(p) = next_event(&mut s).await {
            if p.version == 5 {
                assert_eq!(p.parent_version, 4);
                break;
            }
        }
    }
    let bytes5 = h
        .coordinator()
        .store()
        .model_bytes(MODEL, 5)
        .unwrap()
        .unwrap();
    let bytes1 = h
        .coordinator()
        .store()
        .model_bytes(MODEL, 1)
        .unwrap()
        .unwrap();
    assert_eq!(bytes5, bytes1);
    // The next round builds on the rolled-back content.
    let next = start_req(
        &h,
        StartRoundRequest {
            model: MODEL.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(next.base_version, 5);
    // Nonsense is refused.
    for v in [5, 99] {
        let e = admin.rollback(rollback(v)).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition),
            "{e:?}"
        );
    }
    let listed: HashMap<u64, u64> = admin
        .list_versions(with_admin(
            hearth_proto::v1::ListVersionsRequest {
                model: MODEL.into(),
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .map(|v| (v.version, v.rollback_of))
        .collect();
    assert_eq!(listed[&5], 1);
    assert_eq!(listed[&4], 0);
    h.shutdown().await.unwrap();
}
