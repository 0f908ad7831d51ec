#!/usr/bin/env python3
"""The run dashboard.png is drawn from: real processes, real faults.

Starts, all on 127.0.0.1 and free ports: a DynamoDB Local of its own
(scripts/dynamodb-local.sh), one table, three dynacache binaries (a and b
in fleet mode with max_local_age 1m, c alone with the default 2s, a 1 MiB
cache and 48 connections at most), and
a Prometheus of its own (scrape and rule evaluation every 5 s, the rules of
dynacache.rules.yml). Then 14 minutes of memcached traffic from 6 client
threads (2 per sidecar: gets of 2,000 keys with a skewed popularity, gets of
keys never written, sets, some with a 15 s TTL, 5-50 KB text values that are
stored compressed, 450 KB random ones stored in chunks, multi-gets, adds,
deletes),
and three faults:

  4:00-5:00   DynamoDB Local stopped (SIGSTOP): calls time out
  7:00-7:30   a burst of connections to c, beyond its 48
  8:00-8:20   sidecar b stopped (SIGSTOP): a's writes wait out b's lease

then renders the dashboard's panels over the run with render.py (which
needs matplotlib) and stops everything it started, whatever happened.

    python3 examples/monitoring/scenario.py            # ~15 minutes
    python3 examples/monitoring/scenario.py --scale 0.1  # the same, 10x shorter

Needs: target/debug/dynacache (cargo build), promtool/prometheus (Debian's
prometheus package), Java and DynamoDB Local (scripts/dynamodb-local.sh
install), matplotlib.
"""

import argparse
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DDB = ROOT / "scripts" / "dynamodb-local.sh"
SECRET = "the monitoring scenario's fleet secret"
ENV = dict(os.environ, AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local", AWS_REGION="us-east-1")
ENV.pop("DYNACACHE_CONFIG", None)
KEYS = 2000
CUM = []
total = 0.0
for i in range(KEYS):
    total += 1 / (i + 1) ** 0.9
    CUM.append(total)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def wait_http(url, deadline, status=200):
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == status:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"no {status} from {url}")


class Client:
    """A memcached connection speaking raw protocol, reconnecting on failure."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.buf = b""

    def connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.buf = b""

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock = None

    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def call(self, request):
        """Sends `request`; returns the reply's last line (END, STORED, ...)."""
        if self.sock is None:
            self.connect()
        try:
            self.sock.sendall(request)
            while True:
                line = self.line()
                if line.startswith(b"VALUE "):
                    self.exactly(int(line.split()[3]) + 2)
                    continue
                return line
        except (OSError, ConnectionError):
            self.close()
            return b"(connection failed)"


def value(n):
    return "".join(random.choices(string.ascii_letters, k=n)).encode()


WORDS = ("session user cart item price total id token expires page view "
         "locale en de fr true false null count last seen").split()


def text(n):
    """About n bytes of JSON-like text: zstd makes it a fraction."""
    out = []
    size = 0
    while size < n:
        word = random.choice(WORDS)
        out.append(f'"{word}": {random.randint(0, 999)}')
        size += len(out[-1]) + 2
    return ("{" + ", ".join(out) + "}").encode()


def key():
    return f"k{random.choices(range(KEYS), cum_weights=CUM)[0]}"


def traffic(port, stop, rate):
    c = Client(port)
    n = 0
    next_at = time.time()
    while not stop.is_set():
        r = random.random()
        if r < 0.70:
            c.call(f"get {key()}\r\n".encode())
        elif r < 0.80:
            c.call(f"get never-{random.getrandbits(48):x}\r\n".encode())
        elif r < 0.91:
            v = value(random.randint(100, 1500))
            ttl = 15 if random.random() < 0.2 else 0
            c.call(f"set {key()} 0 {ttl} {len(v)}\r\n".encode() + v + b"\r\n")
        elif r < 0.93:
            # Compressed: 5-50 KB of text.
            v = text(random.randint(5000, 50000))
            c.call(f"set m{random.randrange(200)} 0 0 {len(v)}\r\n".encode() + v + b"\r\n")
        elif r < 0.9315:
            # Chunked: 450 KB that does not compress, more than one item holds.
            v = os.urandom(450 * 1024)
            c.call(f"set huge{random.randrange(10)} 0 0 {len(v)}\r\n".encode() + v + b"\r\n")
        elif r < 0.955:
            big = f"m{random.randrange(200)}" if random.random() < 0.9 else f"huge{random.randrange(10)}"
            c.call(f"get {big}\r\n".encode())
        elif r < 0.975:
            keys = " ".join([key(), key(), key(), f"never-{n}-1", f"never-{n}-2"])
            c.call(f"get {keys}\r\n".encode())
        elif r < 0.9875:
            c.call(f"add {key()} 0 0 1\r\nx\r\n".encode())
        else:
            c.call(f"delete {key()}\r\n".encode())
        n += 1
        next_at += 1 / rate
        pause = next_at - time.time()
        if pause > 0:
            time.sleep(pause)
        else:
            next_at = time.time()
    c.close()


def connection_burst(port, until, count):
    """Holds `count` connections to `port` until `until`, re-dialling the refused ones."""
    held = []
    while time.time() < until:
        while len(held) < count:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            held.append(s)
        time.sleep(0.5)
        alive = []
        for s in held:
            try:
                data = s.recv(1024)
                if data == b"" or data.startswith(b"ERROR"):
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        held = alive
    for s in held:
        s.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=str(ROOT / "target" / "debug" / "dynacache"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every phase's length")
    parser.add_argument("--rate", type=float, default=150, help="requests a second per client thread")
    parser.add_argument("--out", default=str(HERE / "dashboard.png"))
    args = parser.parse_args()
    s = args.scale
    children = []
    paused = []
    work = tempfile.mkdtemp(prefix="dynacache-scenario-")
    ddb_port = free_port()
    ddb_dir = Path(os.environ.get("DYNAMODB_LOCAL_DIR", ROOT / ".dynamodb-local"))
    try:
        subprocess.run([str(DDB), "start", str(ddb_port)], check=True)
        ddb_pid = int((ddb_dir / f"dynamodb-local-{ddb_port}.pid").read_text())
        endpoint = f"http://127.0.0.1:{ddb_port}"
        table = "scenario"
        subprocess.run([args.bin, "init-table", "--table", table, "--endpoint-url", endpoint],
                       check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        sidecars = {}
        for name, extra in (
            ("a", ["fleet"]),
            ("b", ["fleet"]),
            ("c", ["--memory-limit", "1MiB", "--max-connections", "48"]),
        ):
            port, metrics = free_port(), free_port()
            cmd = [args.bin, "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}",
                   "--table", table, "--endpoint-url", endpoint, "--item-size-max", "1MiB"]
            env = dict(ENV)
            if extra == ["fleet"]:
                peer = f"127.0.0.1:{free_port()}"
                # Fleet mode keeps the copies coherent with writes through
                # the fleet: max_local_age bounds only writes that bypass it.
                cmd += ["--fleet-listen", peer, "--fleet-advertise", peer, "--max-local-age", "1m"]
                env["DYNACACHE_FLEET_SECRET"] = SECRET
            else:
                cmd += extra
            stderr = open(Path(work) / f"dynacache-{name}.log", "w")
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
            children.append(p)
            sidecars[name] = (p, port, metrics)
        for name, (_, _, metrics) in sidecars.items():
            wait_http(f"http://127.0.0.1:{metrics}/readyz", time.time() + 60)
        log("sidecars ready:", {n: f"memcached {p}, metrics {m}" for n, (_, p, m) in sidecars.items()})

        prom_port = free_port()
        # Each target labelled by its sidecar's name: the legends say a, b, c.
        targets = "".join(
            f"      - targets: ['127.0.0.1:{m}']\n        labels: {{instance: '{name}'}}\n"
            for name, (_, _, m) in sidecars.items())
        config = Path(work) / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 5s\n  scrape_timeout: 5s\n  evaluation_interval: 5s\n"
            f"rule_files:\n  - '{HERE / 'dynacache.rules.yml'}'\n"
            f"scrape_configs:\n  - job_name: dynacache\n    static_configs:\n{targets}"
        )
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work}/data",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(Path(work) / "prometheus.log", "w"))
        children.append(prom)
        prometheus = f"http://127.0.0.1:{prom_port}"
        wait_http(f"{prometheus}/-/ready", time.time() + 60)
        log("prometheus", prometheus, "work dir", work)

        stop = threading.Event()
        threads = [threading.Thread(target=traffic, args=(port, stop, args.rate), daemon=True)
                   for _, port, _ in sidecars.values() for _ in range(2)]
        t0 = time.time()
        for t in threads:
            t.start()

        def at(seconds):
            pause = t0 + seconds * s - time.time()
            if pause > 0:
                time.sleep(pause)
            return time.time()

        marks = []
        start = at(240)
        log("fault: DynamoDB Local stopped")
        os.kill(ddb_pid, signal.SIGSTOP)
        paused.append(ddb_pid)
        end = at(300)
        os.kill(ddb_pid, signal.SIGCONT)
        paused.remove(ddb_pid)
        log("DynamoDB Local resumed")
        marks.append(f"{start},{end},DynamoDB stopped")

        start = at(420)
        log("fault: connection burst to c")
        connection_burst(sidecars["c"][1], t0 + 450 * s, 60)
        marks.append(f"{start},{time.time()},connections beyond c's limit")

        start = at(480)
        b = sidecars["b"][0].pid
        log("fault: sidecar b stopped")
        os.kill(b, signal.SIGSTOP)
        paused.append(b)
        end = at(500)
        os.kill(b, signal.SIGCONT)
        paused.remove(b)
        log("sidecar b resumed")
        marks.append(f"{start},{end},sidecar b stopped")

        end = at(840)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        # One more scrape and evaluation after the traffic.
        time.sleep(11)
        log("rendering")
        cmd = [sys.executable, str(HERE / "render.py"), "--prometheus", prometheus,
               "--start", str(t0), "--end", str(end), "--step", str(max(5, 10 * s)),
               "--title", f"dynacache: 3 sidecars (a, b in fleet mode), {840 * s / 60:g} minutes, 3 faults",
               "--out", args.out]
        for m in marks:
            cmd += ["--mark", m]
        subprocess.run(cmd, check=True)
        log("wrote", args.out)
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        for p in children:
            p.kill()
            p.wait()
        subprocess.run([str(DDB), "stop", str(ddb_port)])


if __name__ == "__main__":
    main()
