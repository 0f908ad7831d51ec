"""Harness: a real DynamoDB Local, real dynacache processes, the real Django app.

DynamoDB Local: scripts/test.sh starts one for its whole run and exports
DYNACACHE_TEST_DYNAMODB; the tests share it, each on a table of its own.
Without that variable this suite starts its own (scripts/dynamodb-local.sh).
Tests that stop DynamoDB always start a private one.

dynacache: the binary at $DYNACACHE_BIN, one process per simulated host, on
loopback ports; every process a test starts is stopped when the test ends.

Django: demo.settings, with the users in a throwaway SQLite file; a test
points the app at one dynacache or another with `on(host)`, which changes
nothing but the cache LOCATION.
"""

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1]
ROOT = EXAMPLE.parents[1]
DDB_SCRIPT = ROOT / "scripts" / "dynamodb-local.sh"
WAIT = 60.0  # bound on any single wait, in seconds

# DynamoDB Local takes any credentials whose access key id is letters and digits.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_REGION": "us-east-1",
}

PASSWORDS = {"alice": "pw-alice", "bob": "pw-bob", "carol": "pw-carol"}

# Django's memcached key for a session: KEY_PREFIX "" and VERSION 1.
SESSION_ITEM_PREFIX = ":1:django.contrib.sessions.cache"


def pytest_configure(config):
    tmp = tempfile.mkdtemp(prefix="dynacache-django-")
    config._dynacache_tmp = tmp
    os.environ["DJANGO_DB_PATH"] = os.path.join(tmp, "users.sqlite3")
    os.environ["DJANGO_SETTINGS_MODULE"] = "demo.settings"
    sys.path.insert(0, str(EXAMPLE))
    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test.utils import override_settings

    # Tests only: a fast password hash, so that logins cost nothing.
    override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]).enable()
    call_command("migrate", verbosity=0)
    for name, password in PASSWORDS.items():
        User.objects.create_user(name, password=password)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_dynacache_tmp", ""), ignore_errors=True)


# --- helpers -----------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, predicate, timeout=WAIT, interval=0.02):
    """Polls `predicate` until it returns a true value (returned), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def dynacache_bin():
    path = os.environ.get("DYNACACHE_BIN")
    if not path:
        pytest.exit("DYNACACHE_BIN is not set (examples/django/test.sh sets it)", returncode=2)
    path = os.path.abspath(path)
    if not os.access(path, os.X_OK):
        pytest.exit(f"DYNACACHE_BIN={path} is not an executable", returncode=2)
    return path


def dynacache_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNACACHE_CONFIG")}
    env.update(AWS_ENV)
    return env


def dynacache_help():
    out = subprocess.run([dynacache_bin(), "--help"], capture_output=True, text=True, timeout=WAIT)
    return out.stdout


def init_table(endpoint, table=None, config=None):
    """A new table of the test's own on `endpoint`, created by `dynacache init-table`."""
    table = table or "django-" + uuid.uuid4().hex[:12]
    args = [dynacache_bin(), "--endpoint-url", endpoint, "--table", table]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        if config is not None:
            f.write(config)
            f.flush()
            args += ["--config", f.name]
        subprocess.run(
            args + ["init-table"], env=dynacache_env(), check=True, capture_output=True, timeout=WAIT
        )
    return table


def cache_settings(location, options=None):
    """The app's own CACHES["default"], pointed at `location` (and with other OPTIONS if given)."""
    from django.conf import settings

    default = dict(settings.CACHES["default"])
    default["LOCATION"] = location
    if options is not None:
        default["OPTIONS"] = options
    return default


def on(*hosts, options=None):
    """Django settings with the cache at hosts[0] ("default"); further hosts as "h1", "h2"..."""
    from django.test.utils import override_settings

    caches = {"default": cache_settings(hosts[0].location, options)}
    for i, host in enumerate(hosts[1:], 1):
        caches[f"h{i}"] = cache_settings(host.location, options)
    return override_settings(CACHES=caches)


class DynamoDB:
    """A DynamoDB Local endpoint, with a boto3 client for looking at tables directly."""

    def __init__(self, endpoint, port=None):
        self.endpoint = endpoint
        self.port = port  # set when this suite started it (and so may stop it)
        import boto3

        self.client = boto3.client(
            "dynamodb",
            endpoint_url=endpoint,
            region_name=AWS_ENV["AWS_REGION"],
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    @classmethod
    def start(cls):
        port = free_port()
        subprocess.run([str(DDB_SCRIPT), "start", str(port)], check=True, timeout=2 * WAIT)
        return cls(f"http://127.0.0.1:{port}", port)

    def stop(self):
        if self.port is not None:
            subprocess.run([str(DDB_SCRIPT), "stop", str(self.port)], check=True, timeout=2 * WAIT)

    def item(self, table, key):
        """The item DynamoDB holds for memcached key `key` (a consistent read), or None."""
        out = self.client.get_item(TableName=table, Key={"key": {"S": key}}, ConsistentRead=True)
        return out.get("Item")

    def session_item(self, table, session_key):
        return self.item(table, SESSION_ITEM_PREFIX + session_key)

    def live_session_item(self, table, session_key):
        """The session's item as a reader sees it: None once expired or deleted
        (a delete leaves an empty, already expired tombstone that DynamoDB's TTL
        removes; a late write of an older value cannot land on it)."""
        item = self.session_item(table, session_key)
        if item is None or int(item.get("expires_at", {"N": "0"})["N"]) not in range(1, int(time.time()) + 1):
            return item
        return None


def session_data(item):
    """The session dict a table item holds (pymemcache's pickle serde, flags 1)."""
    assert item["flags"]["N"] == "1", item
    return pickle.loads(item["value"]["B"])


class Dynacache:
    """One dynacache process (a "host"), on a loopback port or a unix socket."""

    def __init__(self, endpoint, table, workdir, config=None, unix_socket=None):
        self.endpoint, self.table, self.workdir = endpoint, table, Path(workdir)
        self.port, self.metrics_port = free_port(), free_port()
        self.unix_socket = unix_socket
        self.config = None
        if config is not None:
            self.config = self.workdir / f"dynacache-{self.port}.toml"
            self.config.write_text(config)
        self.proc = None
        self.starts = 0

    @property
    def location(self):
        """Django's LOCATION for this host."""
        if self.unix_socket:
            return f"unix:{self.unix_socket}"
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self):
        return self.workdir / f"dynacache-{self.port}-{self.starts}.log"

    def start(self):
        assert self.proc is None, "already running"
        self.starts += 1
        args = [
            dynacache_bin(),
            "--listen", f"127.0.0.1:{self.port}",
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--endpoint-url", self.endpoint,
            "--table", self.table,
        ]  # fmt: skip
        if self.config:
            args += ["--config", str(self.config)]
        if self.unix_socket:
            args += ["--unix-socket", str(self.unix_socket)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, env=dynacache_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        wait_for(f"dynacache on {self.location} to answer `version`", self._answers)
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            pytest.fail(f"dynacache exited with {self.proc.returncode}:\n{self.log()}")
        try:
            if self.unix_socket:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(2)
                s.connect(str(self.unix_socket))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            with s:
                s.sendall(b"version\r\n")
                return s.recv(100).startswith(b"VERSION ")
        except OSError:
            return False

    def stop(self):
        """SIGTERM, and wait for the exit (SIGKILL if it takes longer than WAIT)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        """Stop, then start a new process on the same address: an empty cache."""
        self.stop()
        return self.start()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ready(self):
        """Whether /readyz answers 200 (in fleet mode: every member counts this one)."""
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=WAIT) as r:
                return r.status == 200
        except OSError:
            return False

    def metric(self, series):
        """The value of one Prometheus series, e.g. 'dynacache_cache_misses_total' (0 if absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            body = r.read().decode()
        for line in body.splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
        return 0.0


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def dynamodb():
    """The shared DynamoDB Local (scripts/test.sh's), or one this suite starts."""
    endpoint = os.environ.get("DYNACACHE_TEST_DYNAMODB")
    if endpoint:
        yield DynamoDB(endpoint)
        return
    db = DynamoDB.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
def private_dynamodb():
    """A DynamoDB Local of this test's own, which it may stop."""
    db = DynamoDB.start()
    try:
        yield db
    finally:
        db.stop()


@pytest.fixture
def table(dynamodb):
    return init_table(dynamodb.endpoint)


@pytest.fixture
def start_dynacache(tmp_path):
    """start_dynacache(endpoint, table, config=None, unix_socket=None) -> a running Dynacache."""
    started = []

    def start(endpoint, table, config=None, unix_socket=None):
        host = Dynacache(endpoint, table, tmp_path, config=config, unix_socket=unix_socket)
        started.append(host)
        return host.start()

    yield start
    for host in started:
        host.stop()


@pytest.fixture
def client_factory():
    """Django test clients that return HTTP 500 responses rather than raising."""
    from django.test import Client

    return lambda: Client(raise_request_exception=False)

