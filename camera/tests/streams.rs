//! Cameras on real streams: real `ffmpeg` decoding files, folders, HTTP MJPEG and RTSP served
//! on loopback (by ffmpeg itself, or by a hostile TCP server in the test), the full pipeline
//! (motion gate, BlazeFace in tract, tracker) and the hub's event guard on every event.
//! Skips, saying so, when `ffmpeg` is not installed. Every wait is bounded.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_camera::scene::Shot;
use hearth_camera::testkit::{self, clip, mjpeg_url, skip_without_ffmpeg, Proc};
use hearth_camera::{
    CameraConfig, CameraHandle, Detector, DetectorOptions, SourceConfig, SourceState,
};
use hearth_proto::mqtt::{parse_event, CameraEvent, InboundEvent, TrackPhase};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    testkit::free_port().unwrap()
}

fn ffmpeg(args: &[&str]) -> Proc {
    testkit::ffmpeg(args).unwrap()
}

fn detector() -> Arc<Detector> {
    Arc::new(
        Detector::load(
            &root().join("data/models/face_detection_front_128x128_barracuda.onnx"),
            DetectorOptions::default(),
        )
        .unwrap(),
    )
}

fn frames(dir: &Path, shots: &[Shot]) -> PathBuf {
    clip(&root().join("data"), dir, shots).unwrap()
}

fn config(source: SourceConfig) -> CameraConfig {
    CameraConfig {
        source,
        fps: 10.0,
        model: root().join("data/models/face_detection_front_128x128_barracuda.onnx"),
        max_detect_fps: 10.0,
        backoff_min_ms: 200,
        backoff_max_secs: 1.0,
        stall_secs: 2.0,
        open_timeout_secs: 5.0,
        ..CameraConfig::default()
    }
}

/// ffmpeg children of this process that are camera sources (they write to `pipe:1`), as
/// `pid state` strings.
fn camera_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let p = e.path();
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((head, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = after.split_whitespace();
        let (state, ppid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        if ppid == me && cmd.windows(6).any(|w| w == b"pipe:1") {
            out.push(format!("{head}) {state}"));
        }
    }
    out
}

/// Collects events until `done(events, stats)` or the deadline; checks every event against
/// the hub's guard and that at most one ffmpeg source child runs at any time.
async fn run_until(
    cam: &mut CameraHandle,
    limit: Duration,
    mut done: impl FnMut(&[CameraEvent], &hearth_camera::StatsSnapshot) -> bool,
    events: &mut Vec<CameraEvent>,
) -> bool {
    let end = Instant::now() + limit;
    let stats = cam.stats();
    while Instant::now() < end {
        while let Ok(ev) = cam.events.try_recv() {
            let guarded = parse_event("door-cam", &ev.to_json())
                .unwrap_or_else(|e| panic!("hub guard refused {ev:?}: {e}"));
            // (Times may differ in the last bit: serde_json's float parsing is not exact.)
            assert!(
                matches!(&guarded, InboundEvent::Camera(c) if c.id == ev.id && c.phase == ev.phase && c.bbox == ev.bbox),
                "{guarded:?} vs {ev:?}"
            );
            events.push(ev);
        }
        let children = camera_children();
        assert!(
            children.len() <= 1,
            "more than one ffmpeg source child: {children:?}"
        );
        if done(events, &stats.snapshot()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn phases(ev: &[CameraEvent]) -> Vec<TrackPhase> {
    ev.iter().map(|e| e.phase).collect()
}

fn start(cfg: CameraConfig) -> CameraHandle {
    hearth_camera::start(cfg, "door-cam", "blazeface@1", detector()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_file_one_person_standing_still_is_one_track() {
    if skip_without_ffmpeg("video_file_one_person_standing_still_is_one_track") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = frames(
        tmp.path(),
        &[
            Shot::Idle(10),
            Shot::Face {
                face: 0,
                frames: 40,
            },
            Shot::Idle(25),
        ],
    );
    let clip = tmp.path().join("clip.avi");
    let mut enc = ffmpeg(&[
        "-framerate",
        "10",
        "-i",
        dir.join("frame_%05d.ppm").to_str().unwrap(),
        "-c:v",
        "mjpeg",
        "-q:v",
        "3",
        clip.to_str().unwrap(),
    ]);
    assert!(enc.0.wait().unwrap().success());
    let mut cam = start(config(SourceConfig::File {
        path: clip,
        repeat: false,
    }));
    let mut ev = Vec::new();
    let finished = run_until(
        &mut cam,
        Duration::from_secs(40),
        |_, s| s.state == SourceState::Finished,
        &mut ev,
    )
    .await;
    cam.shutdown().await;
    while let Ok(e) = cam.events.try_recv() {
        ev.push(e);
    }
    let s = cam.stats().snapshot();
    assert!(finished, "file did not finish: {s:?}");
    assert!((70..=80).contains(&s.frames), "{s:?}");
    assert_eq!(phases(&ev), [TrackPhase::New, TrackPhase::End], "{ev:?}");
    assert_eq!(ev[0].id, ev[1].id);
    assert_eq!(ev[0].label, "face");
    assert!(ev[0].top_score >= 0.5);
    // The face sits in the middle of the frame.
    let b = ev[0].bbox;
    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
    assert!((cx - 0.5).abs() < 0.15 && (cy - 0.5).abs() < 0.15, "{b:?}");
    // Motion gating: most frames never reach the detector.
    assert!(
        s.detector_runs * 2 < s.frames,
        "{} runs for {} frames",
        s.detector_runs,
        s.frames
    );
    assert_eq!(s.bad_streams + s.stalls + s.short_reads, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_folder_source() {
    if skip_without_ffmpeg("image_folder_source") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = frames(
        tmp.path(),
        &[
            Shot::Idle(5),
            Shot::Face {
                face: 1,
                frames: 20,
            },
            Shot::Idle(5),
        ],
    );
    let mut cam = start(config(SourceConfig::Folder {
        path: dir,
        glob: "*.ppm".into(),
        repeat: false,
    }));
    let mut ev = Vec::new();
    let finished = run_until(
        &mut cam,
        Duration::from_secs(30),
        |_, s| s.state == SourceState::Finished,
        &mut ev,
    )
    .await;
    cam.shutdown().await;
    while let Ok(e) = cam.events.try_recv() {
        ev.push(e);
    }
    let s = cam.stats().snapshot();
    assert!(finished, "{s:?}");
    assert!((28..=32).contains(&s.frames), "{s:?}");
    assert_eq!(phases(&ev), [TrackPhase::New, TrackPhase::End], "{ev:?}");
}

fn serve_mjpeg(dir: &Path, port: u16) -> Proc {
    testkit::serve_mjpeg(dir, port).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mjpeg_stream_reconnects_after_the_server_dies_and_returns() {
    if skip_without_ffmpeg("http_mjpeg_stream_reconnects_after_the_server_dies_and_returns") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = frames(
        tmp.path(),
        &[Shot::Face {
            face: 2,
            frames: 30,
        }],
    );
    let port = free_port();
    // The camera starts before its server: refused connections, retried with backoff.
    let mut cam = start(config(SourceConfig::Mjpeg {
        url: mjpeg_url(port),
    }));
    let mut ev = Vec::new();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let server = serve_mjpeg(&dir, port);
    let up = run_until(
        &mut cam,
        Duration::from_secs(30),
        |ev, s| s.state == SourceState::Streaming && phases(ev).contains(&TrackPhase::New),
        &mut ev,
    )
    .await;
    let s = cam.stats().snapshot();
    assert!(up, "stream never came up with a track: {s:?} {ev:?}");
    assert!(
        s.bad_streams >= 1,
        "the refused first attempts are counted: {s:?}"
    );
    // The server dies: the stream goes down and the live track ends.
    drop(server);
    let down = run_until(
        &mut cam,
        Duration::from_secs(20),
        |ev, s| s.disconnects >= 1 && phases(ev).contains(&TrackPhase::End),
        &mut ev,
    )
    .await;
    assert!(down, "{:?} {ev:?}", cam.stats().snapshot());
    let frames_before = cam.stats().snapshot().frames;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // …and returns: the camera reconnects by itself, a new track starts.
    let _server = serve_mjpeg(&dir, port);
    let back = run_until(
        &mut cam,
        Duration::from_secs(30),
        |ev, s| {
            s.state == SourceState::Streaming
                && s.frames > frames_before + 10
                && phases(ev).iter().filter(|p| **p == TrackPhase::New).count() == 2
        },
        &mut ev,
    )
    .await;
    let s = cam.stats().snapshot();
    cam.shutdown().await;
    assert!(back, "no reconnect: {s:?} {ev:?}");
    assert!(s.reconnects >= 2 && s.sessions >= 3, "{s:?}");
    assert_ne!(ev[0].id, ev.last().unwrap().id);
    assert_eq!(
        camera_children(),
        Vec::<String>::new(),
        "the source's ffmpeg is reaped at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtsp_stream_pushed_to_a_listening_camera() {
    if skip_without_ffmpeg("rtsp_stream_pushed_to_a_listening_camera") {
        return;
    }
    // ffmpeg alone cannot serve RTSP to a pulling client (that needs an RTSP server such as
    // mediamtx); it can listen for a publisher (`-rtsp_flags listen`), which exercises the
    // same RTSP demuxer: the camera listens, ffmpeg publishes the clip to it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = frames(
        tmp.path(),
        &[Shot::Face {
            face: 3,
            frames: 30,
        }],
    );
    let port = free_port();
    let url = format!("rtsp://127.0.0.1:{port}/cam");
    let mut cam = start(config(SourceConfig::Rtsp {
        url: url.clone(),
        listen: true,
    }));
    let mut publisher = None;
    let mut ev = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    let mut ok = false;
    while Instant::now() < end && !ok {
        if publisher.is_none() {
            tokio::time::sleep(Duration::from_millis(700)).await;
            publisher = Some(ffmpeg(&[
                "-re",
                "-stream_loop",
                "-1",
                "-framerate",
                "10",
                "-i",
                dir.join("frame_%05d.ppm").to_str().unwrap(),
                "-c:v",
                "mpeg4",
                "-q:v",
                "3",
                "-f",
                "rtsp",
                "-rtsp_transport",
                "tcp",
                &url,
            ]));
        }
        ok = run_until(
            &mut cam,
            Duration::from_secs(2),
            |ev, s| s.frames >= 10 && phases(ev).contains(&TrackPhase::New),
            &mut ev,
        )
        .await;
        // A publisher that came too early (before the camera listened) exits: try again.
        if let Some(p) = publisher.as_mut() {
            if p.0.try_wait().unwrap().is_some() {
                publisher = None;
            }
        }
    }
    let s = cam.stats().snapshot();
    cam.shutdown().await;
    assert!(ok, "{s:?} {ev:?}");
}

/// A TCP server on a thread: for each connection, reads the request and calls `serve`.
fn tcp_server(serve: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                serve(s);
            });
        }
    });
    port
}

const MJPEG_HEAD: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=ffmpeg\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_is_detected_killed_and_reconnected() {
    if skip_without_ffmpeg("stalled_stream_is_detected_killed_and_reconnected") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = frames(tmp.path(), &[Shot::Face { face: 0, frames: 1 }]);
    let jpg = tmp.path().join("one.jpg");
    let mut enc = ffmpeg(&[
        "-i",
        dir.join("frame_00000.ppm").to_str().unwrap(),
        "-q:v",
        "5",
        jpg.to_str().unwrap(),
    ]);
    assert!(enc.0.wait().unwrap().success());
    let jpeg = std::fs::read(&jpg).unwrap();
    // Sends two frames, then nothing, holding the connection open for a minute.
    let port = tcp_server(move |mut s| {
        let _ = s.write_all(MJPEG_HEAD);
        for _ in 0..2 {
            let _ = write!(
                s,
                "--ffmpeg\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                jpeg.len()
            );
            let _ = s.write_all(&jpeg);
            let _ = s.write_all(b"\r\n");
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    let mut cam = start(CameraConfig {
        stall_secs: 1.0,
        open_timeout_secs: 1.5,
        ..config(SourceConfig::Mjpeg {
            url: mjpeg_url(port),
        })
    });
    let mut ev = Vec::new();
    let ok = run_until(
        &mut cam,
        Duration::from_secs(25),
        |_, s| s.stalls >= 2 && s.sessions >= 2,
        &mut ev,
    )
    .await;
    let s = cam.stats().snapshot();
    cam.shutdown().await;
    assert!(ok, "stall not detected: {s:?}");
    assert_eq!(camera_children(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_stream_is_counted_and_retried_with_backoff() {
    if skip_without_ffmpeg("garbage_stream_is_counted_and_retried_with_backoff") {
        return;
    }
    // A multipart header, then 64 KiB of noise, then close.
    let port = tcp_server(|mut s| {
        let _ = s.write_all(MJPEG_HEAD);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..65_536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&noise);
    });
    let mut cam = start(CameraConfig {
        backoff_min_ms: 500,
        backoff_max_secs: 4.0,
        ..config(SourceConfig::Mjpeg {
            url: mjpeg_url(port),
        })
    });
    let mut ev = Vec::new();
    // Waits 500 + 1000 + 2000 ms between the first four attempts: ≤ 4 sessions in 4 s.
    run_until(&mut cam, Duration::from_secs(4), |_, _| false, &mut ev).await;
    let s = cam.stats().snapshot();
    cam.shutdown().await;
    assert!(s.bad_streams >= 2, "{s:?}");
    assert_eq!(s.frames, 0, "{s:?}");
    assert!(s.sessions <= 4, "retries are not backed off: {s:?}");
    assert!(ev.is_empty());
    assert!(!s.last_error.is_empty(), "ffmpeg's reason is kept: {s:?}");
    assert_eq!(camera_children(), Vec::<String>::new());
}
