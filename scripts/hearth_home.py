"""A whole home from Hearth's installed binaries and shipped configurations, over loopback.

Used by scripts/test-packages.sh (binaries and configs from packages installed into a scratch
root) and bench/footprint (release binaries, deploy/config). It follows the README's
"Install on a Raspberry Pi" steps: start the coordinator, make an enrolment token, start the
hub, provision the device's MQTT login, enrol the agent, start it, and wait for its first event
at the hub. The configurations are the shipped ones with two changes only: absolute paths
move under `root` (a scratch root stands in for /), and the four ports become free ones so
nothing collides with other programs on this machine. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

PORTS = {"50051": "coordinator", "9464": "coordinator_metrics", "9465": "hub_metrics", "1883": "mqtt"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, procs=()):
    """Polls `check()` every 10 ms until it returns a true value; fails after `timeout` s or
    when one of `procs` exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.proc.returncode}) while waiting for {what}:\n{p.log_tail()}")
        time.sleep(0.01)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.read().decode()
    except OSError:
        return None


def metric(text: str | None, name: str) -> float:
    """Sum of every sample of metric `name` in Prometheus text."""
    total = 0.0
    for line in (text or "").splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            total += float(m.group(2))
    return total


class Service:
    def __init__(self, name: str, argv: list[str], cwd: Path, logdir: Path, env: dict):
        self.name = name
        self.log = logdir / f"{name}.log"
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def peak_rss_kib(self) -> int:
        """VmHWM of the process (under qemu-user: qemu's own memory included)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmHWM for {self.name}")

    def stop(self, timeout: float) -> int:
        """SIGTERM, then wait (bounded); returns the exit code, SIGKILLs on timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"{self.name} did not stop within {timeout} s:\n{self.log_tail()}")


class Home:
    """bindir: where hearth-* are; runner: e.g. ["qemu-aarch64", "-cpu", "cortex-a72"];
    root: scratch root standing in for / (its etc/hearth holds the shipped configs)."""

    def __init__(self, bindir: Path, runner: list[str], root: Path, configs: Path, slow: float = 1.0):
        self.bindir, self.runner, self.root, self.slow = bindir, runner, root, slow
        self.ports = {name: free_port() for name in PORTS.values()}
        self.etc = root / "etc/hearth"
        self.state = root / "var/lib/hearth"
        self.conf = root / "run-config"
        self.logs = root / "logs"
        for d in (self.etc, self.state, self.conf, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        for f in ("coordinator.toml", "hub.toml", "rules.toml", "agent.toml"):
            text = (configs / f).read_text()
            for old in ("/etc/hearth", "/var/lib/hearth", "/usr/share/hearth"):
                text = text.replace(f'"{old}', f'"{root}{old}')
            for old, key in PORTS.items():
                text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{self.ports[key]}")
            (self.conf / f).write_text(text)
        self.services: list[Service] = []

    def cmd(self, binary: str, *args: str) -> list[str]:
        return [*self.runner, str(self.bindir / binary), *args]

    def run(self, binary: str, *args: str, timeout: float = 60) -> str:
        r = subprocess.run(self.cmd(binary, *args), cwd=self.state, env=self.env, capture_output=True,
                           text=True, timeout=timeout * self.slow)
        if r.returncode != 0:
            raise RuntimeError(f"{binary} {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def start(self, name: str, binary: str, *args: str) -> Service:
        s = Service(name, self.cmd(binary, *args), self.state, self.logs, self.env)
        self.services.append(s)
        return s

    def hub_metrics(self) -> str | None:
        return http_get(self.ports["hub_metrics"], "/metrics")

    def coordinator_metrics(self) -> str | None:
        return http_get(self.ports["coordinator_metrics"], "/metrics")

    def start_coordinator(self) -> Service:
        c = self.start("coordinator", "hearth-coordinator", "--config", str(self.conf / "coordinator.toml"))
        wait_for("the coordinator's port", lambda: port_open(self.ports["coordinator"]), 60 * self.slow, [c])
        return c

    def start_hub(self) -> Service:
        h = self.start("hub", "hearth-hub", "--config", str(self.conf / "hub.toml"))
        wait_for("the hub's metrics", lambda: self.hub_metrics() is not None, 60 * self.slow, [h])
        return h

    def add_agent(self, device: str, index: int, count: int, settings: dict | None = None) -> Service:
        """Token, MQTT login, enrolment, start: what a user does per device (README).
        `settings`: top-level keys of agent.toml to change (e.g. min_event_score)."""
        out = self.run("hearth-coordinator", "--config", str(self.conf / "coordinator.toml"),
                       "enroll-token", "--device", device)
        token = re.search(r"^token: (\S+)$", out, re.M).group(1)
        self.run("hearth-hub", "--config", str(self.conf / "hub.toml"), "provision-device", device)
        password = self.state / f"hub/mqtt/devices/{device}.password"
        conf = self.conf / f"agent-{device}.toml"
        text = (self.conf / "agent.toml").read_text()
        text = text.replace('device = "plug-1"', f'device = "{device}"')
        text = text.replace("mqtt://plug-1@", f"mqtt://{device}@")
        text = text.replace(f'"{self.etc}/mqtt.password"', f'"{self.etc}/{device}.password"')
        text = text.replace(f'"{self.state}/agent"', f'"{self.state}/agent-{device}"')
        text = re.sub(r"(?m)^index = \d+", f"index = {index}", text)
        text = re.sub(r"(?m)^count = \d+", f"count = {count}", text)
        # Several agents on one machine: each its own metrics port.
        text = re.sub(r'(?m)^metrics_listen = "127\.0\.0\.1:\d+"', f'metrics_listen = "127.0.0.1:{free_port()}"', text)
        for key, value in (settings or {}).items():
            text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
            if n != 1:
                raise RuntimeError(f"agent.toml has no single `{key} = …` line")
        conf.write_text(text)
        shutil.copy(password, self.etc / f"{device}.password")
        os.chmod(self.etc / f"{device}.password", 0o600)
        self.run("hearth-agent", "--config", str(conf), "enroll", "--token", token,
                 "--ca-file", str(self.state / "pki/ca.pem"))
        return self.start(f"agent-{device}", "hearth-agent", "--config", str(conf))

    def restart_agent(self, device: str) -> Service:
        """Stops the agent (SIGTERM, exit 0 required) and starts it again, same config."""
        old = next(s for s in self.services if s.name == f"agent-{device}")
        code = old.stop(20 * self.slow)
        if code != 0:
            raise RuntimeError(f"agent-{device} exited {code}:\n{old.log_tail()}")
        self.services.remove(old)
        return self.start(f"agent-{device}", "hearth-agent", "--config", str(self.conf / f"agent-{device}.toml"))

    def device_events(self, device: str) -> int:
        """Valid events the hub received from `device` (its /devices registry)."""
        import json
        text = http_get(self.ports["hub_metrics"], "/devices")
        for d in json.loads(text or "[]"):
            if d["name"] == device:
                return d["events"]
        return 0

    def events(self) -> float:
        return metric(self.hub_metrics(), "hearth_hub_events_received_total")

    def stop_all(self, timeout: float = 20) -> dict[str, int]:
        codes = {}
        for s in reversed(self.services):
            codes[s.name] = s.stop(timeout * self.slow)
        return codes

    def kill_all(self):
        for s in self.services:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(5)
