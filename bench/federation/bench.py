"""bench/federation: Hearth beside Flower 1.41 on one federated task, from one command
(`bench/federation/run.sh`, which builds and installs what this needs).

Hearth runs as a user runs it (scripts/hearth_home.py: the README's binaries as separate
processes with the shipped configs): coordinator, hub with its embedded broker, N agents on the
digits task. Flower runs its deployment runtime: `flower-superlink --insecure`, one
`flower-supernode` per client, `flwr run` of the app in flower_app/. Both sides get the same
data (the agents' own partitions, exported by the `fed_export` example), the same initial
weights, model (MLP 64-32-10), local epochs, batch size, learning rate, optimizer (plain SGD,
or momentum 0.9, on both sides), FedAvg weighted by examples, every client every round.

Bytes are counted the same way on both sides: a byte-counting TCP proxy on loopback in front of
each server (the coordinator's gRPC port; the SuperLink's Fleet API port), minus the idle
traffic measured over a quiet spell with every client connected. Results go to
<work>/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import hearth_home  # noqa: E402
from hearth_home import Home, Service, free_port, port_open, wait_for  # noqa: E402


class Proxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target>, counting bytes each way."""

    def __init__(self, target: int):
        self.target = target
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def counters(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            for a, b, up in ((c, s, True), (s, c, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, up: bool):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def idle_rate(proxy: Proxy, seconds: float) -> tuple[float, float]:
    u0, d0 = proxy.counters()
    time.sleep(seconds)
    u1, d1 = proxy.counters()
    return (u1 - u0) / seconds, (d1 - d0) / seconds


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------ Hearth

def hearth_coordinator_toml(home: Home, s: dict, data: Path, exported: Path) -> str:
    root = home.root
    return f"""# bench/federation: the shipped coordinator.toml's top-level keys, the benchmark's task
listen = "127.0.0.1:{home.ports['coordinator']}"
metrics_listen = "127.0.0.1:{home.ports['coordinator_metrics']}"
db_path = "{root}/var/lib/hearth/coordinator.db"
data_dir = "{data}"
admin_token = "bench-admin-token-0123456789abcdef"
tls_names = ["localhost", "127.0.0.1"]
max_update_norm = 1000.0

[rate_limit]
calls_per_minute = 0

[round]
min_clients = {s['clients']}
max_clients = {s['clients']}
deadline_secs = 120
local_epochs = {s['epochs']}
learning_rate = {s['lr']}
batch_size = {s['batch']}
clip_norm = 0.0
quant_bits = {s['up_bits']}
topk_fraction = {s['up_topk']}
min_available_clients = {s['clients']}
available_wait_secs = 120
max_rounds_per_refresh = {s['rounds']}

[client_training]
optimizer = "{'momentum' if s['momentum'] > 0 else 'sgd'}"
momentum = {s['momentum'] or 0.9}

[aggregation]
optimizer = "fedavg"
combine = "mean"
norm_bound_factor = 0.0
sample_cap_factor = 0.0

[downlink]
bits = {s['down_bits']}
topk_fraction = {s['down_topk']}

[[model]]
name = "digits"
task = "digits"
init = "{exported}/init.onnx"
"""


def parse_versions(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        rows.append({
            "version": int(f[0]), "round": int(f[1]), "clients": int(f[2]), "up": int(f[3]),
            "down": int(f[4]), "wall_s": float(f[5]),
            "acc": None if f[6] == "-" else float(f[6]),
        })
    return rows


def run_hearth(bindir: Path, work: Path, s: dict, exported: Path, idle_s: float) -> dict:
    root = work / f"hearth-{s['name']}"
    shutil.rmtree(root, ignore_errors=True)
    home = Home(bindir, [], root, REPO / "deploy/config")
    data = root / "usr/share/hearth/data"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.symlink_to(REPO / "data")
    conf = home.conf / "coordinator.toml"
    conf.write_text(hearth_coordinator_toml(home, s, data, exported))
    proxy = Proxy(home.ports["coordinator"])
    cli = ["--config", str(conf)]
    try:
        coord = home.start_coordinator()
        hub = home.start_hub()
        agents = []
        for i in range(s["clients"]):
            agents.append(home.add_agent(f"dev-{i}", i, s["clients"], {
                "task": '"digits"',
                "coordinator": f'"https://127.0.0.1:{proxy.port}"',
                "replay_rate_hz": "1.0",
            }))
        # Every agent holds version 1 (the whole file each) before counting starts.
        size = (exported / "init.onnx").stat().st_size

        def all_have_v1():
            time.sleep(0.5)
            rows = parse_versions(home.run("hearth-coordinator", *cli, "versions", "digits"))
            return rows and rows[0]["down"] >= s["clients"] * size
        wait_for("every agent on version 1", all_have_v1, 120, [coord, hub, *agents])
        time.sleep(2)
        idle_up, idle_down = idle_rate(proxy, idle_s)
        u0, d0 = proxy.counters()
        t0 = time.monotonic()
        home.run("hearth-coordinator", *cli, "start-round", "digits", "--rounds", str(s["rounds"]))
        last = s["rounds"] + 1

        def done():
            time.sleep(0.5)
            rows = parse_versions(home.run("hearth-coordinator", *cli, "versions", "digits"))
            return rows if len(rows) >= last else None
        wait_for(f"{s['rounds']} rounds", done, 60 + 60 * s["rounds"], [coord, hub, *agents])
        wall = time.monotonic() - t0

        # The last version reaches every agent (a delta or the file each) before counting ends.
        def delivered():
            time.sleep(0.5)
            rows = parse_versions(home.run("hearth-coordinator", *cli, "versions", "digits"))
            return rows if rows[-1]["down"] > 0 else None
        wait_for("the last version's downloads", delivered, 60, [coord])
        time.sleep(3)
        rows = parse_versions(home.run("hearth-coordinator", *cli, "versions", "digits"))
        u1, d1 = proxy.counters()
        span = time.monotonic() - t0
        svg = work / f"hearth-{s['name']}.svg"
        home.run("hearth-coordinator", *cli, "plot", "digits", "--out", str(svg))
        per = s["clients"] * s["rounds"]
        result = {
            "side": "hearth", **s,
            "wall_s": wall,
            "round_s": statistics.median(r["wall_s"] for r in rows[1:]),
            "accuracy": [r["acc"] for r in rows],
            "up_per_client_round": (u1 - u0 - idle_up * span) / per,
            "down_per_client_round": (d1 - d0 - idle_down * span) / per,
            "payload_up_per_client_round": sum(r["up"] for r in rows[1:]) / per,
            "payload_down_per_client_round": sum(r["down"] for r in rows[1:]) / per,
            "idle_bytes_per_s": [idle_up, idle_down],
            "client_rss_kib": max(a.peak_rss_kib() for a in agents),
            "server_rss_kib": coord.peak_rss_kib(),
            "hub_rss_kib": hub.peak_rss_kib(),
            "plot": str(svg),
        }
        home.stop_all()
        return result
    except Exception:
        for sv in home.services:
            print(f"--- {sv.name}\n{sv.log_tail(15)}", file=sys.stderr)
        home.kill_all()
        raise


# ------------------------------------------------------------------------------------ Flower

def run_flower(venv: Path, work: Path, s: dict, exported: Path, idle_s: float) -> dict:
    root = work / f"flower-{s['name']}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    fleet = free_port()
    control = fleet
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{control}"\n'
        "insecure = true\n")
    env = dict(os.environ, FLWR_HOME=str(flwr_home),
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}", NO_COLOR="1")
    procs: list[Service] = []

    def start(name, argv):
        p = Service(name, argv, root, root / "logs", env)
        procs.append(p)
        return p
    try:
        # 1.41: the Fleet, Control and Runtime APIs share one HTTP port (--host/--port).
        link = start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                   "--port", str(fleet),
                                   "--disable-runtime-dependency-installation"])
        wait_for("the SuperLink", lambda: port_open(fleet) and port_open(control), 120, [link])
        proxy = Proxy(fleet)
        nodes = []
        for i in range(s["clients"]):
            nodes.append(start(f"supernode-{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{proxy.port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={s['clients']}"]))
        time.sleep(5)
        wait_for("every SuperNode connected", lambda: all(
            re.search(r"(?i)connect", n.log.read_text(errors="replace")) or port_open(fleet)
            for n in nodes), 120, [link, *nodes])
        time.sleep(5)
        idle_up, idle_down = idle_rate(proxy, idle_s)
        log = root / "rounds.jsonl"
        cfg = (f"data-dir='{exported}' log-file='{log}' num-server-rounds={s['rounds']} "
               f"num-clients={s['clients']} local-epochs={s['epochs']} lr={s['lr']} "
               f"batch-size={s['batch']} momentum={s['momentum']}")
        u0, d0 = proxy.counters()
        t0 = time.monotonic()
        run = subprocess.run(["flwr", "run", str(REPO / "bench/federation/flower_app"), "bench",
                              "--stream", "--run-config", cfg],
                             cwd=root, env=env, capture_output=True, text=True,
                             timeout=300 + 120 * s["rounds"])
        (root / "logs/flwr-run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"flwr run exited {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        wall = time.monotonic() - t0
        u1, d1 = proxy.counters()
        rounds = [json.loads(line) for line in log.read_text().splitlines()]
        if len(rounds) < s["rounds"] + 1:
            raise RuntimeError(f"flower logged {len(rounds)} evaluations:\n{run.stdout[-3000:]}")
        times = [b["t"] - a["t"] for a, b in zip(rounds, rounds[1:])]
        client_rss = []
        for i in range(s["clients"]):
            f = Path(f"{log}.client{i}")
            if f.exists():
                client_rss += [int(line.split()[1]) for line in f.read_text().splitlines()]
        per = s["clients"] * s["rounds"]
        result = {
            "side": "flower", **s,
            "wall_s": wall,
            "round_s": statistics.median(times),
            "accuracy": [r["accuracy"] for r in rounds],
            "up_per_client_round": (u1 - u0 - idle_up * wall) / per,
            "down_per_client_round": (d1 - d0 - idle_down * wall) / per,
            "idle_bytes_per_s": [idle_up, idle_down],
            "supernode_rss_kib": max(n.peak_rss_kib() for n in nodes),
            "clientapp_rss_kib": max(client_rss) if client_rss else 0,
            "client_rss_kib": max(n.peak_rss_kib() for n in nodes) + (max(client_rss) if client_rss else 0),
            "server_rss_kib": link.peak_rss_kib(),
        }
        for p in reversed(procs):
            try:
                p.stop(20)
            except RuntimeError:
                pass
        return result
    except Exception:
        for p in procs:
            print(f"--- {p.name}\n{p.log_tail(15)}", file=sys.stderr)
            if p.proc.poll() is None:
                p.proc.kill()
        raise


# ------------------------------------------------------------------------------------ report

def table(results: list[dict]) -> str:
    head = (f"{'side':<7} {'setting':<26} {'opt':<8} {'round s':>8} {'up B/cl/rd':>11} "
            f"{'down B/cl/rd':>12} {'client RSS MiB':>15} {'server RSS MiB':>15} {'acc r0':>7} {'final acc':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['side']:<7} {r['name']:<26} {('momentum' if r['momentum'] else 'sgd'):<8} "
            f"{r['round_s']:>8.3f} {r['up_per_client_round']:>11.0f} {r['down_per_client_round']:>12.0f} "
            f"{r['client_rss_kib'] / 1024:>15.1f} {r['server_rss_kib'] / 1024:>15.1f} "
            f"{(r['accuracy'][0] or 0):>7.4f} {r['accuracy'][-1]:>9.4f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bindir", type=Path, required=True)
    ap.add_argument("--venv", type=Path, required=True)
    ap.add_argument("--exported", type=Path, required=True, help="fed_export output")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle traffic measured")
    ap.add_argument("--optimizers", default="sgd,momentum")
    ap.add_argument("--hearth-settings", default="default,fp32",
                    help="default (the shipped codec settings), fp32 (uncompressed reference), "
                         "or up=BITS:TOPK/down=BITS:TOPK")
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--skip-hearth", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    base = {"clients": args.clients, "rounds": args.rounds, "epochs": 1, "lr": 0.1, "batch": 32}
    for opt in args.optimizers.split(","):
        mu = 0.9 if opt == "momentum" else 0.0
        for hs in ([] if args.skip_hearth else args.hearth_settings.split(",")):
            if hs == "default":
                codec = dict(up_bits=DEFAULT_UP[0], up_topk=DEFAULT_UP[1],
                             down_bits=DEFAULT_DOWN[0], down_topk=DEFAULT_DOWN[1])
            elif hs == "fp32":
                codec = dict(up_bits=32, up_topk=1.0, down_bits=0, down_topk=1.0)
            else:
                m = re.fullmatch(r"up=(\d+):([\d.]+)/down=(\d+):([\d.]+)", hs)
                if not m:
                    raise SystemExit(f"bad --hearth-settings entry {hs!r}")
                codec = dict(up_bits=int(m[1]), up_topk=float(m[2]), down_bits=int(m[3]),
                             down_topk=float(m[4]))
            s = {**base, **codec, "momentum": mu, "name": f"{hs}-{opt}"}
            print(f"hearth {s['name']} ...", file=sys.stderr, flush=True)
            results.append(run_hearth(args.bindir, args.work, s, args.exported, args.idle))
            print(table(results[-1:]), file=sys.stderr, flush=True)
        if not args.skip_flower:
            s = {**base, "momentum": mu, "name": f"flower-{opt}"}
            print(f"flower {s['name']} ...", file=sys.stderr, flush=True)
            results.append(run_flower(args.venv, args.work, s, args.exported, args.idle))
            print(table(results[-1:]), file=sys.stderr, flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\n(results: {args.work / 'results.json'}; Hearth plots: {args.work}/hearth-*.svg)")


# The coordinator's shipped defaults (coordinator/src/config.rs): uplink (bits, top-k), downlink.
DEFAULT_UP = (4, 0.1)
DEFAULT_DOWN = (8, 0.1)

if __name__ == "__main__":
    main()
