//! Learning on the camera, end to end over loopback with real parts: ffmpeg decodes a folder of
//! frames composed from the repo's faces (128×128, so the decoded pixels are exactly the
//! files'), the camera agent (task `faces-cam`: a head on BlazeFace's frozen backbone) tracks
//! the face, classifies each track's crop embedding with its head (`sub_label` on the event),
//! the home labels a track through `hearth/<device>/feedback`, and a federated round over gRPC
//! (a real coordinator, plaintext behind a recording proxy) trains the head on it and
//! publishes version 2.
//!
//! The raw-data invariant, checked on everything that left the agent: no run of frame pixels
//! and no stored embedding appears in any MQTT payload (a `#` subscriber from the start) or in
//! any byte of the gRPC traffic (both directions, recorded by the proxy). The metrics endpoint
//! reports the camera's fps, detector latency, motion-gated ratio and stalls.
//! Skips when ffmpeg is missing.

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{data_dir, CameraHome, Sub};
use hearth_agent::samples::{SampleStore, StoreConfig};
use hearth_agent::Config;
use hearth_camera::scene::{compose, load_crops, FACE_SIZE, SCENE_SIZE};
use hearth_camera::{CameraConfig, EMBED_DIM};
use hearth_coordinator::{Config as CoordConfig, ModelConfig, RoundDefaults};
use hearth_proto::mqtt::{parse_event, InboundEvent, TrackPhase};
use hearth_proto::v1::admin_client::AdminClient;
use hearth_proto::v1::StartRoundRequest;
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-secret-token-camlearn-0001";
const WAIT: Duration = Duration::from_secs(60);
const SIDE: usize = 128;

/// A 256×256 grey scene halved to 128×128 RGB (2×2 means): what ffmpeg will hand over unchanged.
fn halve(grey: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIDE * SIDE * 3);
    for y in 0..SIDE {
        for x in 0..SIDE {
            let p = |dx: usize, dy: usize| u32::from(grey[(2 * y + dy) * SCENE_SIZE + 2 * x + dx]);
            let v = ((p(0, 0) + p(1, 0) + p(0, 1) + p(1, 1) + 2) / 4) as u8;
            out.extend_from_slice(&[v, v, v]);
        }
    }
    out
}

/// Writes the clip (idle, a face standing still, idle) as 128×128 PPM frames; returns the
/// distinct frames.
fn write_frames(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let csv = data_dir().join("faces/test.csv");
    let faces = load_crops(&csv, 1).unwrap();
    let bg = load_crops(&csv, 0).unwrap();
    let c = (SCENE_SIZE - FACE_SIZE) / 2;
    let empty = halve(&compose(&bg[0], None));
    let face = halve(&compose(&bg[0], Some((&faces[3], c, c))));
    std::fs::create_dir_all(dir).unwrap();
    let mut i = 0;
    for (frame, n) in [(&empty, 10), (&face, 60), (&empty, 25)] {
        for _ in 0..n {
            let mut b = format!("P6\n{SIDE} {SIDE}\n255\n").into_bytes();
            b.extend_from_slice(frame);
            std::fs::write(dir.join(format!("frame_{i:05}.ppm")), b).unwrap();
            i += 1;
        }
    }
    vec![empty, face]
}

/// 24-byte runs of each frame's textured rows (the face and the background around it).
fn pixel_needles(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in frames {
        for y in (36..92).step_by(6) {
            for x in (36..88).step_by(12) {
                let at = (y * SIDE + x) * 3;
                let run = f[at..at + 24].to_vec();
                // Runs with texture only (a flat run could match anything).
                let mut distinct = run.clone();
                distinct.sort_unstable();
                distinct.dedup();
                if distinct.len() >= 4 {
                    out.push(run);
                }
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A TCP proxy to `target` recording every byte in both directions.
async fn recording_proxy(target: std::net::SocketAddr) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = log.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            let (a, b) = (rec.clone(), rec.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = ri.read(&mut buf).await {
                    if n == 0 || wo.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    a.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = wo.shutdown().await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = ro.read(&mut buf).await {
                    if n == 0 || wi.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    b.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = wi.shutdown().await;
            });
        }
    });
    (port, log)
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .unwrap()
        .unwrap();
    body
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_camera_head_learns_from_feedback_in_a_round_and_no_pixel_leaves() {
    // (Its own 128×128 frames, so the decoded pixels are exactly the files'.)
    let Some(home) = CameraHome::new("a_camera_head_learns_from_feedback", &[]) else {
        return;
    };
    let (port, tmp) = (home.port, home.tmp.path());
    let frames = write_frames(&home.frames);

    // Everything published on the broker, from before the agent starts.
    let mut spy = Sub::connect(port, "spy", &["#"]).await;
    let mut events = Sub::connect(port, "home", &["hearth/door-cam/event/#"]).await;

    let coord_cfg = CoordConfig {
        db_path: tmp.join("coord.db"),
        data_dir: data_dir(),
        admin_token: ADMIN.into(),
        insecure: true,
        enrollment_tokens: vec!["token-camlearn-0001".into()],
        round: RoundDefaults {
            min_clients: 1,
            max_clients: 1,
            deadline_secs: 60,
            local_epochs: 5,
            ..RoundDefaults::default()
        },
        models: vec![ModelConfig {
            name: "faces-cam".into(),
            task: "faces-cam".into(),
            init: None,
            eval: true,
            seed: 1,
        }],
        ..CoordConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord_addr = listener.local_addr().unwrap();
    let coord = hearth_coordinator::start(coord_cfg, listener)
        .await
        .expect("coordinator starts");
    let (proxy_port, grpc) = recording_proxy(coord_addr).await;

    let state = tmp.join("agent");
    let cfg = Config {
        coordinator: Some(format!("http://127.0.0.1:{proxy_port}")),
        enrollment_token: Some("token-camlearn-0001".into()),
        task: "faces-cam".into(),
        state_dir: state.clone(),
        bootstrap_epochs: 5,
        metrics_listen: Some("127.0.0.1:0".into()),
        ..home.agent(
            "door-cam",
            CameraConfig {
                source: home.folder(),
                fps: 10.0,
                ..CameraConfig::default()
            },
        )
    };
    let agent = hearth_agent::start(cfg).await.expect("agent starts");
    let stats = agent.stats();
    wait_until("global version 1", || {
        stats.model_version.load(Ordering::Relaxed) == 1
    })
    .await;

    // A track's `new` carries the head's verdict on its crop.
    let new = events
        .wait_for(WAIT, |m| {
            matches!(parse_event("door-cam", &m.payload),
                Ok(InboundEvent::Camera(e)) if e.phase == TrackPhase::New && e.sub_label.is_some())
        })
        .await
        .expect("a new track with the head's verdict");
    let InboundEvent::Camera(ev) = parse_event("door-cam", &new.payload).unwrap() else {
        unreachable!()
    };
    assert!(["none", "person"].contains(&ev.sub_label.as_deref().unwrap()));
    assert!(stats.head_verdicts.load(Ordering::Relaxed) >= 1);

    // The home says what it was; a feedback for an unknown track changes nothing.
    for body in [
        format!(r#"{{"event":"{}","label":"none"}}"#, ev.id),
        r#"{"event":"1-1","label":"none"}"#.to_string(),
    ] {
        events
            .client
            .publish("hearth/door-cam/feedback", QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
    }
    wait_until("the label applied", || {
        stats.feedback_applied.load(Ordering::Relaxed) == 1
            && stats.feedback_refused.load(Ordering::Relaxed) == 1
    })
    .await;

    // A federated round trains the head on it; version 2 reaches the camera.
    let weights_v1 = agent.model_weights();
    let ch = hearth_coordinator::client::connect(&coord.endpoint(), None, None)
        .await
        .unwrap();
    let mut req = tonic::Request::new(StartRoundRequest {
        model: "faces-cam".into(),
        reason: "camera learning test".into(),
        ..StartRoundRequest::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    AdminClient::new(ch)
        .start_round(req)
        .await
        .expect("round starts");
    wait_until("version 2 in use", || {
        stats.model_version.load(Ordering::Relaxed) == 2
    })
    .await;
    assert!(stats.rounds_joined.load(Ordering::Relaxed) >= 1);
    assert_ne!(agent.model_weights(), weights_v1, "the head changed");

    // Metrics: the camera's fps, detector latency, gated ratio and stalls.
    let addr = agent.metrics_addr().expect("metrics endpoint bound");
    let text = scrape(addr).await;
    assert!(metric(&text, "hearth_camera_fps") > 1.0, "{text}");
    assert!(metric(&text, "hearth_camera_detector_latency_seconds") > 0.0);
    let gated = metric(&text, "hearth_camera_motion_gated_ratio");
    assert!((0.0..=1.0).contains(&gated));
    assert_eq!(metric(&text, "hearth_camera_stalls_total"), 0.0);
    assert!(metric(&text, "hearth_agent_head_verdicts_total") >= 1.0);
    assert!(metric(&text, "hearth_camera_embed_runs_total") >= 1.0);

    tokio::time::timeout(Duration::from_secs(20), agent.shutdown())
        .await
        .unwrap()
        .unwrap();

    // The labelled embedding is on the device, behind the track's id.
    let store = SampleStore::open(&state, StoreConfig::default()).unwrap();
    let labelled = store.labelled().unwrap();
    assert_eq!(labelled.len(), 1);
    assert_eq!(labelled[0].label, Some(0), "none");
    let stored = store.all().unwrap();
    assert!(stored.iter().all(|s| s.input.len() == EMBED_DIM));
    drop(store);

    // The invariant: nothing of a frame or an embedding left the agent.
    let mut mqtt = Vec::new();
    while let Some(m) = spy.next(Duration::from_millis(300)).await {
        mqtt.push(m);
    }
    assert!(mqtt
        .iter()
        .any(|m| m.topic == "hearth/door-cam/event/detection"));
    let grpc = grpc.lock().unwrap().clone();
    assert!(grpc.len() > 1000, "the agent talked to the coordinator");
    let needles = pixel_needles(&frames);
    assert!(needles.len() > 20, "{} needles", needles.len());
    for n in &needles {
        assert!(!contains(&grpc, n), "frame pixels in the gRPC traffic");
        for m in &mqtt {
            assert!(!contains(&m.payload, n), "frame pixels on {}", m.topic);
        }
    }
    for s in &stored {
        // Four consecutive non-zero values, as bytes and as text.
        let Some(i) = (0..EMBED_DIM - 4).find(|&i| s.input[i..i + 4].iter().all(|v| *v != 0.0))
        else {
            continue;
        };
        let bytes: Vec<u8> = s.input[i..i + 4]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let text = format!("{},{}", s.input[i], s.input[i + 1]);
        assert!(!contains(&grpc, &bytes), "an embedding in the gRPC traffic");
        for m in &mqtt {
            assert!(!contains(&m.payload, &bytes), "an embedding on {}", m.topic);
            assert!(!m.text().contains(&text), "an embedding on {}", m.topic);
        }
    }
    // Device payloads are small, and events pass the hub's guard.
    for m in mqtt
        .iter()
        .filter(|m| m.topic.starts_with("hearth/door-cam/"))
    {
        assert!(
            m.payload.len() < 1024,
            "{}: {} bytes",
            m.topic,
            m.payload.len()
        );
        if m.topic.starts_with("hearth/door-cam/event/") {
            parse_event("door-cam", &m.payload).expect("hub guard");
        }
    }
    coord.shutdown().await.unwrap();
}
