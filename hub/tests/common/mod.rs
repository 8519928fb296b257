//! Helpers of the hub's process tests: child processes killed by PID when dropped,
//! free loopback ports, bounded waits for a port to answer.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// One rule: a person at the door (score ≥ 0.8) turns the porch light on.
pub const RULES: &str = r#"
[[rule]]
name = "porch light"
[rule.when]
device = "door-cam"
class = "person"
min_score = 0.8
[rule.then]
actuator = "porch_light"
payload = { state = "ON" }
"#;

/// A child process killed (SIGKILL, by its PID) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits (bounded) for the exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`-KILL`, `-TERM`) to the process by its PID.
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {}", self.0.id());
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until 127.0.0.1:`port` accepts connections; panics with `why()` if the
/// process exits or the time runs out.
pub fn wait_listening(p: &mut Proc, port: u16, limit: Duration, why: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = p.0.try_wait().unwrap() {
            panic!("the process exited with {s}:\n{}", why());
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port}:\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
