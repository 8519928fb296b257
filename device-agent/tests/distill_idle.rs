//! Idle distillation in the agent (`[distill] enabled`): while events flow the agent is busy
//! and distils nothing; once it has been quiet for `idle_secs`, one bounded run pseudo-labels
//! the stored unlabelled samples with a larger teacher and the distilled student becomes the
//! model in use (its weights change; the global version stays the training base).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{data_dir, start_broker};
use hearth_agent::distill::DistillConfig;
use hearth_agent::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_distils_only_when_idle_and_the_model_changes() {
    let port = start_broker();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config {
        device: "cam-head".into(),
        mqtt: format!("mqtt://127.0.0.1:{port}"),
        task: "faces-cam".into(),
        data_dir: data_dir(),
        state_dir: tmp.path().join("state"),
        // A weak student: one epoch on its own share.
        bootstrap_epochs: 1,
        replay_rate_hz: 25.0,
        replay_limit: Some(75),
        min_event_score: 0.0,
        distill: DistillConfig {
            enabled: true,
            idle_secs: 1.0,
            every_secs: 1.0,
            min_unlabelled: 20,
            max_unlabelled: 500,
            teacher_hidden: vec![64],
            teacher_epochs: 30,
            epochs: 15,
            ..DistillConfig::default()
        },
        ..Config::default()
    };
    let agent = hearth_agent::start(cfg).await.expect("agent starts");
    let stats = agent.stats();
    let before = agent.model_weights();
    // Busy: events every 40 ms for 3 s, more than enough unlabelled samples after 1 s.
    {
        let replay = agent.replay_finished();
        tokio::pin!(replay);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = &mut replay => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            assert_eq!(
                stats.distill_runs.load(Ordering::Relaxed),
                0,
                "distilled while events were flowing"
            );
            assert!(tokio::time::Instant::now() < deadline, "replay did not end");
        }
    }
    assert_eq!(stats.samples_stored.load(Ordering::Relaxed), 75);
    // Idle: one run within a few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats.distill_runs.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no idle distillation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = stats.snapshot();
    eprintln!(
        "idle distillation: {} run(s), {} pseudo-labelled, {} installed, {} ms",
        s.distill_runs, s.distill_pseudo_labelled, s.distill_installed, s.distill_millis
    );
    assert_eq!(s.distill_pseudo_labelled % 75, 0);
    assert!(s.distill_pseudo_labelled >= 75);
    assert!(
        s.distill_installed >= 1,
        "the distilled student was not kept"
    );
    assert!(agent.model_distilled());
    assert_ne!(agent.model_weights(), before, "the model in use changed");
    tokio::time::timeout(Duration::from_secs(20), agent.shutdown())
        .await
        .unwrap()
        .unwrap();
}
