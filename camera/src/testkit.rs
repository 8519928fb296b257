//! Running cameras on this machine's `ffmpeg` outside a home — the tests of this crate and of
//! the agent and the demo share these: whether ffmpeg is installed (tests skip
//! without it, saying so), a child process killed and reaped when dropped, ffmpeg serving a
//! clip's frames as HTTP MJPEG on loopback, a free loopback port, and a clip's frames written
//! from the repo's faces ([`crate::scene`]). Not used by a running camera.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::scene::{write_clip_frames, Shot};
use crate::Error;

/// Whether `ffmpeg -version` runs here (asked once per process).
pub fn ffmpeg_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new("ffmpeg")
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// For a test that needs ffmpeg: `true`, after printing `SKIPPED <test>: …`, when it is
/// missing (the test then returns).
pub fn skip_without_ffmpeg(test: &str) -> bool {
    let skip = !ffmpeg_available();
    if skip {
        eprintln!("SKIPPED {test}: ffmpeg is not installed (apt-get install ffmpeg)");
    }
    skip
}

/// A child process, killed (by its PID) and reaped when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The arguments ffmpeg takes before a command's own: no banner, errors only, no stdin.
pub const QUIET: [&str; 4] = ["-hide_banner", "-loglevel", "error", "-nostdin"];

/// Starts `ffmpeg <QUIET> <args>` with its standard streams closed.
pub fn ffmpeg(args: &[&str]) -> std::io::Result<Proc> {
    Command::new("ffmpeg")
        .args(QUIET)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Proc)
}

/// The URL [`mjpeg_server_args`] serves on `port`.
pub fn mjpeg_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/stream.mjpg")
}

/// ffmpeg's arguments (after [`QUIET`]) to serve `<frames>/frame_%05d.ppm`, looped in real
/// time at 10 fps, as HTTP MJPEG at [`mjpeg_url`]: one client, then ffmpeg exits.
pub fn mjpeg_server_args(frames: &Path, port: u16) -> Vec<String> {
    let mut a: Vec<String> = ["-re", "-stream_loop", "-1", "-framerate", "10", "-i"]
        .map(String::from)
        .to_vec();
    a.push(frames.join("frame_%05d.ppm").display().to_string());
    a.extend(["-f", "mpjpeg", "-q:v", "5", "-listen", "1"].map(String::from));
    a.push(mjpeg_url(port));
    a
}

/// ffmpeg serving `frames` as HTTP MJPEG on `port` ([`mjpeg_server_args`]).
pub fn serve_mjpeg(frames: &Path, port: u16) -> std::io::Result<Proc> {
    let args = mjpeg_server_args(frames, port);
    ffmpeg(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// A port on 127.0.0.1 that was free a moment ago (bound and released: another process may
/// take it before it is used).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes the frames of `shots`, composed from `<data_dir>/faces/test.csv`, into
/// `<dir>/frames`; returns that folder.
pub fn clip(data_dir: &Path, dir: &Path, shots: &[Shot]) -> Result<PathBuf, Error> {
    let frames = dir.join("frames");
    write_clip_frames(&data_dir.join("faces/test.csv"), &frames, shots)?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_arguments_name_the_frames_and_the_url() {
        let a = mjpeg_server_args(Path::new("/tmp/f"), 8554);
        assert_eq!(a[6], "/tmp/f/frame_%05d.ppm");
        assert_eq!(a.last().unwrap(), "http://127.0.0.1:8554/stream.mjpg");
        assert!(free_port().unwrap() > 0);
    }
}
