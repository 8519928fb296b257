//! Nothing refused changes stored state: over real gRPC on 127.0.0.1, a series of refused calls
//! (bad and used enrolment tokens, a wrong key, an update against the wrong base, above the hard
//! norm bound, undecodable, claiming no samples, for a closed round, for another model's round,
//! and calls over the rate limit) leaves every sled tree byte for byte as it was, and each
//! refusal is counted under its reason. An accepted upload afterwards does change the snapshot,
//! so the comparison would see a change.

mod common;

use common::*;
use hearth_coordinator::{start, Config, ModelConfig};
use hearth_model::OnnxModel;
use hearth_proto::v1::RoundState;
use tonic::Code;

const TOKENS: [&str; 4] = ["rej-token-1", "rej-token-2", "rej-token-3", "rej-token-4"];
const BURST: u32 = 12;

fn model(name: &str) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        task: "digits".into(),
        init: None,
        eval: false,
        seed: 9,
    }
}

on_both_backends! {
    async fn refused_calls_leave_the_store_unchanged_and_are_counted(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config {
        db_path: dir.path().join("db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        enrollment_tokens: TOKENS.iter().map(|t| t.to_string()).collect(),
        models: vec![model("digits"), model("other")],
        ..Config::default()
    };
    cfg.rate_limit.calls_per_minute = 60;
    cfg.rate_limit.burst = BURST;
    let server = start(b.configure(cfg), listener().await).await.unwrap();
    let coord = server.coordinator().clone();
    let tls = Tls::connect(&server).await;
    let ch = tls.ch.clone();
    let a = tls.enroll(TOKENS[0], "a").await.unwrap();
    let b = tls.enroll(TOKENS[1], "b").await.unwrap();
    let c = tls.enroll(TOKENS[2], "c").await.unwrap();

    // State to protect: a closed round of "other", an open round of "digits" with one update.
    let (bytes, _, _, _) = fetch(&ch, &a, "digits", 1, 0).await.unwrap();
    let g = OnnxModel::from_bytes(&bytes).unwrap().weights();
    let ok = encode(&delta(&g, 0.3, 0.01), 8, 1);
    let closed = start_round(&ch, "other", 1, 1, 300).await;
    assert!(
        upload(&ch, &a, "other", closed.round_id, 1, 10, &ok)
            .await
            .unwrap()
            .accepted
    );
    wait_state(&ch, "other", closed.round_id, RoundState::Completed).await;
    let open = start_round(&ch, "digits", 3, 3, 300).await;
    assert!(
        upload(&ch, &a, "digits", open.round_id, 1, 10, &ok)
            .await
            .unwrap()
            .accepted
    );

    let m = coord.metrics();
    let reasons = [
        "bad_token",
        "no_client_cert",
        "wrong_base",
        "norm_bound",
        "undecodable",
        "zero_samples",
        "round_not_open",
        "wrong_model",
        "rate_limited",
    ];
    let before_counts: Vec<u64> = reasons.iter().map(|r| m.rejections(r)).collect();
    // `downlink` counts the bytes of successful fetches (the rate-limit series below spends a
    // burst of them): served, not refused, calls; every other tree must stay as it was.
    let snapshot = || {
        let mut s = coord.store().snapshot().unwrap();
        s.remove("downlink");
        s
    };
    let before = snapshot();
    assert!(
        before.values().map(Vec::len).sum::<usize>() > 10,
        "{:?}",
        before.keys()
    );

    // Enrolment with an unknown token and with one already used.
    for t in ["no-such-token", TOKENS[0]] {
        let e = tls.enroll(t, "intruder").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // No client certificate (a's id and a key in the metadata of insecure mode instead).
    let forged = Creds {
        id: a.id.clone(),
        key: "0".repeat(64),
        tls: None,
    };
    let e = fetch(&ch, &forged, "digits", 1, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Uploads the round refuses.
    let huge = encode(&delta(&g, 1.0, 5.0), 8, 2);
    // (model, round, base version, samples, payload, what the refusal says)
    type Refused<'a> = (&'a str, u64, u64, u64, &'a [u8], &'a str);
    let refused: [Refused; 6] = [
        ("digits", open.round_id, 7, 10, &ok, "against version 7"),
        ("digits", open.round_id, 1, 10, &huge, "exceeds the bound"),
        (
            "digits",
            open.round_id,
            1,
            10,
            b"not an update at all",
            "undecodable",
        ),
        ("digits", open.round_id, 1, 0, &ok, "num_samples"),
        ("other", closed.round_id, 1, 10, &ok, "not open"),
        ("other", open.round_id, 1, 10, &ok, "is for model"),
    ];
    for (model, round, base, n, payload, want) in refused {
        let ack = upload(&ch, &b, model, round, base, n, payload)
            .await
            .unwrap();
        assert!(
            !ack.accepted && ack.reason.contains(want),
            "{want}: {ack:?}"
        );
        assert_eq!(ack.updates_in_round, 1, "{want}: {ack:?}");
    }
    // Over the rate limit: client c spends its burst, then fetches and uploads are refused.
    let mut limited = 0u32;
    for _ in 0..BURST + 3 {
        match fetch(&ch, &c, "digits", 1, 0).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                limited += 1;
            }
        }
    }
    assert!(limited >= 3, "{limited}");
    let e = upload(&ch, &c, "digits", open.round_id, 1, 10, &ok)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Others are not limited by c's calls.
    fetch(&ch, &b, "digits", 1, 0).await.unwrap();

    let after = snapshot();
    for (tree, kvs) in &before {
        assert_eq!(Some(kvs), after.get(tree), "tree {tree} changed");
    }
    assert_eq!(before, after, "stored state changed");
    let counted: Vec<u64> = reasons
        .iter()
        .zip(&before_counts)
        .map(|(r, b)| m.rejections(r) - b)
        .collect();
    let want = [2, 1, 1, 1, 1, 1, 1, 1, u64::from(limited) + 1];
    assert_eq!(
        counted,
        want,
        "rejections by reason {reasons:?}:\n{}",
        m.render()
    );

    // The snapshot does see an accepted update.
    assert!(
        upload(&ch, &b, "digits", open.round_id, 1, 10, &ok)
            .await
            .unwrap()
            .accepted
    );
    assert_ne!(snapshot(), after);
    server.shutdown().await.unwrap();
    }
}
