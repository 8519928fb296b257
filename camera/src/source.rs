//! Frame sources: an `ffmpeg` child process decodes the stream and writes raw 128×128 RGB
//! frames (letterboxed, at the configured rate) to a pipe, as Frigate does.
//!
//! Watchdogs, each counted in [`CameraStats`]:
//! - *stall*: no complete frame within `stall_secs` (`open_timeout_secs` for the first) →
//!   the child is killed and reaped, the source reconnects;
//! - *short read*: the pipe ends inside a frame → the partial frame is discarded;
//! - *bad stream*: ffmpeg exits with an error before any frame (refused connection,
//!   garbage bytes, unknown format); its last stderr line is kept (bounded) for the report;
//! - every session end is followed by a reconnect after the [`Backoff`] wait (reset once a
//!   session delivered frames); finite sources (file, folder without `repeat`) end instead.
//!
//! Memory: frames live in a fixed [`FramePool`] of `pool_frames` buffers allocated at start,
//! plus one scratch buffer; when the consumer holds them all, new frames are read into the
//! scratch buffer and dropped (counted). The child's stdout is the only pipe read in full;
//! stderr is read line by line, each line cut at 256 bytes, only the last one kept.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_edge::Backoff;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::config::{CameraConfig, SourceConfig};
use crate::detector::{FRAME_BYTES, INPUT_SIZE};
use crate::stats::{CameraStats, SourceState};

/// A fixed set of frame buffers; a [`Frame`] returns its buffer when dropped.
#[derive(Debug, Clone)]
pub struct FramePool {
    free: Arc<Mutex<Vec<Box<[u8]>>>>,
}

impl FramePool {
    /// `n` buffers of [`FRAME_BYTES`], allocated now.
    pub fn new(n: usize) -> FramePool {
        FramePool {
            free: Arc::new(Mutex::new(
                (0..n)
                    .map(|_| vec![0u8; FRAME_BYTES].into_boxed_slice())
                    .collect(),
            )),
        }
    }

    /// A free buffer, if any, as a frame that returns it to the pool when dropped (also
    /// when a read into it fails half-way).
    pub fn take(&self) -> Option<Frame> {
        let b = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Frame {
            buf: Some(b),
            pool: self.clone(),
            seq: 0,
        })
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn give_back(&self, b: Box<[u8]>) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(b);
    }
}

/// One decoded 128×128 RGB frame, on loan from the pool.
#[derive(Debug)]
pub struct Frame {
    buf: Option<Box<[u8]>>,
    pool: FramePool,
    /// Sequence number since the camera started.
    pub seq: u64,
}

impl Frame {
    /// The RGB bytes (`FRAME_BYTES`).
    pub fn rgb(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }

    fn rgb_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give_back(b);
        }
    }
}

/// What the source sends to the frame consumer.
#[derive(Debug)]
pub enum SourceMsg {
    Frame(Frame),
    /// The stream went down (tracks should end).
    Down,
    /// A finite source reached its end.
    Finished,
}

/// The ffmpeg command line for `cfg`.
pub fn ffmpeg_args(cfg: &CameraConfig) -> Vec<String> {
    let mut a: Vec<String> = ["-hide_banner", "-loglevel", "error", "-nostdin"]
        .map(String::from)
        .to_vec();
    let s = |v: &str| v.to_string();
    match &cfg.source {
        SourceConfig::Rtsp { url, listen } => {
            a.extend([s("-rtsp_transport"), s("tcp")]);
            if *listen {
                a.extend([s("-rtsp_flags"), s("listen")]);
            }
            a.extend([s("-i"), url.clone()]);
        }
        SourceConfig::Mjpeg { url } => a.extend([s("-f"), s("mpjpeg"), s("-i"), url.clone()]),
        SourceConfig::V4l2 { device } => {
            a.extend([s("-f"), s("v4l2"), s("-i"), device.display().to_string()])
        }
        SourceConfig::Folder { path, glob, repeat } => {
            a.push(s("-re"));
            if *repeat {
                a.extend([s("-stream_loop"), s("-1")]);
            }
            a.extend([
                s("-f"),
                s("image2"),
                s("-framerate"),
                format!("{}", cfg.fps),
                s("-pattern_type"),
                s("glob"),
                s("-i"),
                path.join(glob).display().to_string(),
            ]);
        }
        SourceConfig::File { path, repeat } => {
            a.push(s("-re"));
            if *repeat {
                a.extend([s("-stream_loop"), s("-1")]);
            }
            a.extend([s("-i"), path.display().to_string()]);
        }
    }
    let n = INPUT_SIZE;
    a.extend([
        s("-an"),
        s("-vf"),
        format!(
            "fps={},scale={n}:{n}:force_original_aspect_ratio=decrease,pad={n}:{n}:(ow-iw)/2:(oh-ih)/2",
            cfg.fps
        ),
        s("-pix_fmt"),
        s("rgb24"),
        s("-f"),
        s("rawvideo"),
        s("pipe:1"),
    ]);
    a
}

/// Reads until `buf` is full or the pipe ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// How one ffmpeg session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    Eof,
    Stall,
    ShortRead,
    Io,
    Stopped,
    ConsumerGone,
}

/// Runs the source until `stop` turns true (or a finite source ends): spawns ffmpeg,
/// reads frames into the pool and sends them on `tx`, reconnecting with backoff.
pub async fn run_source(
    cfg: CameraConfig,
    pool: FramePool,
    tx: mpsc::Sender<SourceMsg>,
    stats: Arc<CameraStats>,
    mut stop: watch::Receiver<bool>,
) {
    let args = ffmpeg_args(&cfg);
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.backoff_min_ms),
        Duration::from_secs_f64(cfg.backoff_max_secs),
    );
    let mut scratch = vec![0u8; FRAME_BYTES].into_boxed_slice();
    let mut seq = 0u64;
    let kind = cfg.source.kind();
    loop {
        if *stop.borrow() {
            break;
        }
        stats.set_state(SourceState::Connecting);
        CameraStats::inc(&stats.sessions);
        let spawned = Command::new(&cfg.ffmpeg)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                CameraStats::inc(&stats.bad_streams);
                stats.set_last_error(&format!("cannot start {}: {e}", cfg.ffmpeg.display()));
                tracing::warn!(ffmpeg = %cfg.ffmpeg.display(), error = %e, "camera: cannot start ffmpeg");
                stats.set_state(SourceState::Down);
                if wait_or_stop(backoff.next_wait(), &mut stop).await {
                    break;
                }
                continue;
            }
        };
        let stderr_task = child.stderr.take().map(|e| {
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(e);
                let mut line = Vec::with_capacity(256);
                // Bounded: each line is read in pieces and cut at 256 bytes.
                loop {
                    line.clear();
                    let mut buf = (&mut lines).take(256);
                    match buf.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line);
                            let text = text.trim();
                            if !text.is_empty() {
                                stats.set_last_error(text);
                            }
                        }
                    }
                }
            })
        });
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut frames_this_session = 0u64;
        let end = loop {
            let limit = if frames_this_session == 0 {
                cfg.open_timeout_secs
            } else {
                cfg.stall_secs
            };
            let mut frame = pool.take();
            let target: &mut [u8] = match frame.as_mut() {
                Some(f) => f.rgb_mut(),
                None => &mut scratch,
            };
            let read = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs_f64(limit), read_full(&mut stdout, target)) => r,
                _ = stop.changed() => break SessionEnd::Stopped,
            };
            match read {
                Err(_) => break SessionEnd::Stall,
                Ok(Err(_)) => break SessionEnd::Io,
                Ok(Ok(0)) => break SessionEnd::Eof,
                Ok(Ok(n)) if n < FRAME_BYTES => break SessionEnd::ShortRead,
                Ok(Ok(_)) => {}
            }
            frames_this_session += 1;
            if frames_this_session == 1 {
                stats.set_state(SourceState::Streaming);
                backoff.reset();
                tracing::info!(source = kind, "camera: stream up");
            }
            CameraStats::inc(&stats.frames);
            seq += 1;
            let Some(mut frame) = frame else {
                CameraStats::inc(&stats.frames_dropped);
                continue;
            };
            frame.seq = seq;
            if tx.send(SourceMsg::Frame(frame)).await.is_err() {
                break SessionEnd::ConsumerGone;
            }
        };
        let status = reap(&mut child).await;
        if let Some(t) = stderr_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        let failed = !matches!(status, Some(0));
        match end {
            SessionEnd::Stall => {
                CameraStats::inc(&stats.stalls);
                tracing::warn!(
                    source = kind,
                    frames = frames_this_session,
                    "camera: stream stalled, ffmpeg killed"
                );
            }
            SessionEnd::ShortRead => {
                CameraStats::inc(&stats.short_reads);
                tracing::warn!(
                    source = kind,
                    "camera: stream ended inside a frame (short read)"
                );
            }
            _ => {}
        }
        if frames_this_session == 0
            && end != SessionEnd::Stopped
            && (failed || end == SessionEnd::ShortRead)
        {
            CameraStats::inc(&stats.bad_streams);
            tracing::warn!(source = kind, status = ?status, last_error = %stats.last_error(), "camera: stream failed before its first frame");
        }
        if frames_this_session > 0 {
            CameraStats::inc(&stats.disconnects);
            let _ = tx.send(SourceMsg::Down).await;
        }
        if matches!(end, SessionEnd::Stopped | SessionEnd::ConsumerGone) || *stop.borrow() {
            break;
        }
        if end == SessionEnd::Eof && !failed && cfg.source.finite() {
            stats.set_state(SourceState::Finished);
            let _ = tx.send(SourceMsg::Finished).await;
            return;
        }
        stats.set_state(SourceState::Down);
        CameraStats::inc(&stats.reconnects);
        if wait_or_stop(backoff.next_wait(), &mut stop).await {
            break;
        }
    }
    stats.set_state(SourceState::Stopped);
}

/// Kills the child if it still runs and waits for it (bounded); its exit code, if any.
async fn reap(child: &mut Child) -> Option<i32> {
    if let Ok(Some(s)) = child.try_wait() {
        return s.code();
    }
    // Give a child that is exiting by itself a moment before killing it.
    if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
        return s.code();
    }
    let _ = child.start_kill();
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(s)) => s.code(),
        _ => None,
    }
}

/// Sleeps `d` unless `stop` turns true first; returns whether to stop.
async fn wait_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_fixed() {
        let p = FramePool::new(2);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert!(p.take().is_none());
        assert_eq!(a.rgb().len(), FRAME_BYTES);
        drop(a);
        assert_eq!(p.available(), 1);
        drop(b);
        assert_eq!(p.available(), 2);
        assert!(p.take().is_some());
    }

    #[test]
    fn args_name_the_source() {
        let mut c = CameraConfig::default();
        let a = ffmpeg_args(&c);
        assert!(a.windows(2).any(|w| w == ["-f", "mpjpeg"]));
        assert_eq!(a.last().unwrap(), "pipe:1");
        c.source = SourceConfig::Rtsp {
            url: "rtsp://127.0.0.1:8554/cam".into(),
            listen: true,
        };
        assert!(ffmpeg_args(&c)
            .windows(2)
            .any(|w| w == ["-rtsp_flags", "listen"]));
    }
}
