"""Django sessions through dynacache, end to end.

The real Django app (demo/) with its stock cache session backend and stock
PyMemcacheCache, driven by Django's test client, against real dynacache
processes and a real DynamoDB Local, whose table is read directly with boto3.
"""

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
from django.conf import settings
from django.contrib.sessions.backends import base as session_base
from django.contrib.sessions.backends.cache import SessionStore
from django.core.cache import caches
from django.test.utils import override_settings

from .conftest import (
    PASSWORDS,
    SESSION_ITEM_PREFIX,
    dynacache_help,
    free_port,
    init_table,
    on,
    session_data,
    wait_for,
)

STRICT_ENGINE = "demo.sessions"


def login(client, user):
    """Logs `user` in through the login form; returns the session key."""
    r = client.post("/login/", {"username": user, "password": PASSWORDS[user]})
    assert r.status_code == 302 and r["Location"] == "/", (r.status_code, r.content)
    return client.cookies["sessionid"].value


def page(client, path="/"):
    r = client.get(path)
    return r.status_code, r.content.decode()


def shows_login(r):
    return r.status_code == 302 and r["Location"].startswith("/login/")


def user_id(name):
    from django.contrib.auth.models import User

    return User.objects.get(username=name).pk


# --- durability ------------------------------------------------------------------


def test_session_survives_a_dynacache_restart(dynamodb, table, start_dynacache, client_factory):
    host = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with on(host):
        key = login(browser, "alice")
        for n in (1, 2, 3):
            assert page(browser, "/count/") == (200, f"count={n}\n")
    saved_at = time.time()

    # The session is an item in the table: the pickled dict, expiring with the session.
    item = dynamodb.session_item(table, key)
    assert item is not None
    data = session_data(item)
    assert data["count"] == 3
    assert data["_auth_user_id"] == str(user_id("alice"))
    expires_at = int(item["expires_at"]["N"])
    assert abs(expires_at - (saved_at + settings.SESSION_COOKIE_AGE)) <= 2, (expires_at, saved_at)

    host.restart()  # a new process: nothing in memory
    assert host.metric("dynacache_cache_misses_total") == 0
    with on(host):
        assert page(browser) == (200, "user=alice count=3\n")
        # ...read back from DynamoDB by the cold cache:
        assert host.metric("dynacache_cache_misses_total") >= 1
        assert host.metric('dynacache_dynamodb_requests_total{operation="GetItem",outcome="ok"}') >= 1
        assert page(browser, "/count/") == (200, "count=4\n")
    assert session_data(dynamodb.session_item(table, key))["count"] == 4


# --- two hosts, one table -----------------------------------------------------------


def test_session_created_via_one_host_is_readable_via_another(
    dynamodb, table, start_dynacache, client_factory
):
    a = start_dynacache(dynamodb.endpoint, table)
    b = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with on(a):
        key = login(browser, "bob")
        assert page(browser, "/count/") == (200, "count=1\n")
    with on(b):
        assert page(browser) == (200, "user=bob count=1\n")
        assert page(browser, "/count/") == (200, "count=2\n")
    assert session_data(dynamodb.session_item(table, key))["count"] == 2


def test_add_is_atomic_across_hosts(dynamodb, table, start_dynacache):
    """Two hosts `add` one new key at the same moment, many times: exactly one wins each time."""
    a = start_dynacache(dynamodb.endpoint, table)
    b = start_dynacache(dynamodb.endpoint, table)
    rounds = 40
    with on(a, b):
        for i in range(rounds):
            key = f"race-{i}-{uuid.uuid4().hex}"
            barrier = threading.Barrier(2)

            def race(alias):
                cache = caches[alias]  # this thread's own client, so its own connection
                try:
                    barrier.wait(timeout=10)
                    return cache.add(key, alias, 600)
                finally:
                    cache.close()

            with ThreadPoolExecutor(2) as pool:
                won = dict(zip(("default", "h1"), pool.map(race, ("default", "h1"))))
            winners = [alias for alias, ok in won.items() if ok]
            assert len(winners) == 1, f"round {i}: {won}"
            # Both hosts and the table agree on the winner's value.
            assert caches["default"].get(key) == winners[0]
            assert caches["h1"].get(key) == winners[0]
            stored = dynamodb.item(table, ":1:" + key)  # a str: flags 16, UTF-8
            assert stored["value"]["B"].decode() == winners[0]


def test_session_creation_retries_when_another_host_took_the_key(
    dynamodb, table, start_dynacache
):
    """Django's create() on host B draws the key host A just created: B's `add` is refused, and
    Django draws another key. Nobody gets or overwrites A's session."""
    a = start_dynacache(dynamodb.endpoint, table)
    b = start_dynacache(dynamodb.endpoint, table)
    taken = "k" * 32
    real = session_base.get_random_string
    draws = iter([taken, taken])

    def draw(length, chars):
        return next(draws, None) or real(length, chars)

    with on(a, b), mock.patch.object(session_base, "get_random_string", draw):
        first = SessionStore()
        first["who"] = "first"
        first.create()
        assert first.session_key == taken

        second = SessionStore()
        second._cache = caches["h1"]  # host B
        second["who"] = "second"
        # The race window: B checked that the key was free before A stored it.
        with mock.patch.object(SessionStore, "exists", return_value=False):
            second.create()
    assert second.session_key not in (None, taken)
    assert session_data(dynamodb.session_item(table, taken)) == {"who": "first"}
    assert session_data(dynamodb.session_item(table, second.session_key)) == {"who": "second"}


def test_concurrent_session_creation_gives_distinct_keys(dynamodb, table, start_dynacache):
    """Sessions created at once from many threads on two hosts: every one has its own key."""
    a = start_dynacache(dynamodb.endpoint, table)
    b = start_dynacache(dynamodb.endpoint, table)
    threads, per_thread = 8, 25

    def create_sessions(t):
        alias = ("default", "h1")[t % 2]
        keys = []
        try:
            for i in range(per_thread):
                s = SessionStore()
                s._cache = caches[alias]
                s["made_by"] = f"{t}-{i}"
                s.create()
                keys.append((s.session_key, f"{t}-{i}"))
        finally:
            caches[alias].close()
        return keys

    with on(a, b), ThreadPoolExecutor(threads) as pool:
        created = [k for keys in pool.map(create_sessions, range(threads)) for k in keys]
    keys = [k for k, _ in created]
    assert len(keys) == threads * per_thread
    assert len(set(keys)) == len(keys)
    for key, maker in created:
        assert session_data(dynamodb.session_item(table, key)) == {"made_by": maker}


def test_logout_via_one_host_stops_the_other_within_max_local_age(
    dynamodb, table, start_dynacache, client_factory
):
    max_local_age = 1.0
    config = f'max_local_age = "{max_local_age:g}s"\n'
    a = start_dynacache(dynamodb.endpoint, table, config=config)
    b = start_dynacache(dynamodb.endpoint, table, config=config)
    browser = client_factory()
    with on(a):
        key = login(browser, "carol")
    # A second tab of the same browser, served by host B, which now caches the session.
    tab_b = client_factory()
    tab_b.cookies["sessionid"] = key
    with on(b):
        assert page(tab_b) == (200, "user=carol count=0\n")
    with on(a):
        assert shows_login(browser.post("/logout/"))
        logged_out = time.monotonic()
    assert dynamodb.live_session_item(table, key) is None

    def b_refuses():
        with on(b):
            return shows_login(tab_b.get("/"))

    wait_for("host B to stop serving the logged-out session", b_refuses, timeout=max_local_age + 10)
    elapsed = time.monotonic() - logged_out
    assert elapsed <= max_local_age + 1.0, f"host B served the session {elapsed:.2f}s after logout"


def test_logout_via_one_host_is_seen_by_the_other_at_once_in_fleet_mode(
    dynamodb, table, start_dynacache, client_factory
):
    """Fleet mode: no max_local_age wait. Host B holds the session in memory
    (max_local_age is an hour), and the very next request after the logout
    on A is refused on B, round after round."""
    hosts = []
    for _ in range(2):
        peer = free_port()
        config = (
            'max_local_age = "1h"\n'
            "[fleet]\n"
            f'listen = "127.0.0.1:{peer}"\n'
            'secret = "the django example fleet secret"\n'
        )
        hosts.append(start_dynacache(dynamodb.endpoint, table, config=config))
    a, b = hosts
    for host in hosts:
        wait_for("the host to join the fleet", host.ready)
    wait_for("host B to serve from memory", lambda: b.metric("dynacache_fleet_coherent") == 1)
    for round in range(5):
        browser = client_factory()
        with on(a):
            key = login(browser, "carol")
        tab_b = client_factory()
        tab_b.cookies["sessionid"] = key
        hits = b.metric("dynacache_cache_hits_total")
        with on(b):
            assert page(tab_b) == (200, "user=carol count=0\n")
            assert page(tab_b) == (200, "user=carol count=0\n")
        assert b.metric("dynacache_cache_hits_total") > hits, "B served the session from memory"
        with on(a):
            assert shows_login(browser.post("/logout/"))
        with on(b):
            assert shows_login(tab_b.get("/")), f"round {round}: host B served a logged-out session"


# --- expiry ----------------------------------------------------------------------------


def test_expired_session_is_not_served_though_dynamodb_still_has_it(
    dynamodb, table, start_dynacache, client_factory
):
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with on(a):
        key = login(browser, "alice")
    # The session's expiry passes; DynamoDB's TTL has not deleted the item (and
    # DynamoDB Local never does).
    dynamodb.client.update_item(
        TableName=table,
        Key={"key": {"S": SESSION_ITEM_PREFIX + key}},
        UpdateExpression="SET expires_at = :t",
        ExpressionAttributeValues={":t": {"N": str(int(time.time()) - 60)}},
    )
    b = start_dynacache(dynamodb.endpoint, table)  # reads the item from DynamoDB
    with on(b):
        assert shows_login(browser.get("/"))
    assert dynamodb.session_item(table, key) is not None, "the item is still in the table"


def test_session_expires_on_the_wall_clock(dynamodb, table, start_dynacache, client_factory):
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with override_settings(SESSION_COOKIE_AGE=3), on(a):
        key = login(browser, "bob")
        assert page(browser, "/count/") == (200, "count=1\n")  # cached in a's memory
    expires_at = int(dynamodb.session_item(table, key)["expires_at"]["N"])
    assert expires_at <= time.time() + 4
    wait_for("the session's expiry to pass", lambda: time.time() >= expires_at + 1, timeout=10)
    with on(a):
        assert shows_login(browser.get("/")), "not served from memory"
    b = start_dynacache(dynamodb.endpoint, table)
    with on(b):
        assert shows_login(browser.get("/")), "not served from DynamoDB"
    assert dynamodb.session_item(table, key) is not None, "the item is still in the table"


# --- DynamoDB outage ----------------------------------------------------------------


def _outage(private_dynamodb, start_dynacache, client_factory):
    """alice's session cached on host A, bob's created on host B only; then DynamoDB stops."""
    table = init_table(private_dynamodb.endpoint)
    a = start_dynacache(private_dynamodb.endpoint, table)
    b = start_dynacache(private_dynamodb.endpoint, table)
    alice, bob = client_factory(), client_factory()
    with on(a):
        login(alice, "alice")
        assert page(alice) == (200, "user=alice count=0\n")
    with on(b):
        login(bob, "bob")
    private_dynamodb.stop()
    return a, alice, bob


def test_outage_strict_engine_serves_cached_sessions_and_fails_loudly(
    private_dynamodb, start_dynacache, client_factory, caplog
):
    """With SESSION_ENGINE = "demo.sessions": no silent logout."""
    caplog.set_level(logging.WARNING)
    with override_settings(SESSION_ENGINE=STRICT_ENGINE):
        a, alice, bob = _outage(private_dynamodb, start_dynacache, client_factory)
        with on(a):
            # A session in host A's memory is served as usual.
            assert page(alice) == (200, "user=alice count=0\n")
            assert not caplog.records

            # A session that host A must read from DynamoDB: HTTP 500, logged; cookie kept.
            r = bob.get("/")
            assert r.status_code == 500
            assert "Server Error (500)" in r.content.decode()
            assert "sessionid" not in r.cookies, "the session cookie is left alone"
            _assert_logged_server_error(caplog, "GET /")
            assert "MemcacheServerError: b'dynamodb unreachable'" in caplog.text

            # Changing a session needs DynamoDB: HTTP 500, logged...
            caplog.clear()
            r = alice.get("/count/")
            assert r.status_code == 500
            _assert_logged_server_error(caplog, "/count/")
            # ...and the failed write dropped it from memory, so its next read fails too.
            caplog.clear()
            assert alice.get("/").status_code == 500
            _assert_logged_server_error(caplog, "GET /")


def test_outage_stock_engine_logs_out_sessions_it_must_read(
    private_dynamodb, start_dynacache, client_factory, caplog
):
    """Django's stock cache session backend turns the SERVER_ERROR into "no session"."""
    caplog.set_level(logging.WARNING)
    a, alice, bob = _outage(private_dynamodb, start_dynacache, client_factory)
    with on(a):
        assert page(alice) == (200, "user=alice count=0\n")

        r = bob.get("/")
        assert shows_login(r), "the user is sent to the login page"
        assert r.cookies["sessionid"].value == "", "and the session cookie is deleted"
        assert not caplog.records, "with nothing in the logs"

        r = alice.get("/count/")
        assert r.status_code == 500, "a write still fails loudly"
        _assert_logged_server_error(caplog, "/count/")


def _assert_logged_server_error(caplog, path):
    errors = [r for r in caplog.records if r.name == "django.request" and r.levelno == logging.ERROR]
    assert errors, caplog.text
    assert "Internal Server Error" in errors[-1].getMessage()
    assert path.split()[-1] in errors[-1].getMessage()
    assert "MemcacheServerError" in caplog.text
    assert "dynamodb" in caplog.text  # dynacache's SERVER_ERROR message


@pytest.mark.parametrize("engine", [STRICT_ENGINE, "django.contrib.sessions.backends.cache"])
def test_slow_dynamodb_reaches_django_as_a_server_error(
    engine, start_dynacache, client_factory, caplog
):
    """DynamoDB accepts connections and never answers: dynacache gives up after its
    operation_timeout (3 s), inside the app's pymemcache timeout (5 s), so Django sees
    SERVER_ERROR rather than a socket timeout: as if DynamoDB were down."""
    caplog.set_level(logging.WARNING)
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        endpoint = "http://127.0.0.1:%d" % blackhole.getsockname()[1]
        a = start_dynacache(endpoint, "sessions")
        browser = client_factory()
        browser.cookies["sessionid"] = "a" * 32  # a session that host A must read from DynamoDB
        with override_settings(SESSION_ENGINE=engine), on(a):
            started = time.monotonic()
            r = browser.get("/")
            elapsed = time.monotonic() - started
    assert 2.5 <= elapsed < settings.CACHES["default"]["OPTIONS"]["timeout"], elapsed
    if engine == STRICT_ENGINE:
        assert r.status_code == 500
        _assert_logged_server_error(caplog, "GET /")
        assert "MemcacheServerError: b'dynamodb timed out" in caplog.text
    else:
        assert shows_login(r) and r.cookies["sessionid"].value == ""
        assert not caplog.records


# --- dynacache down (restarting) ---------------------------------------------------------


def test_dynacache_down_fails_loudly_and_recovers_at_once(
    dynamodb, table, start_dynacache, client_factory, caplog
):
    """The app's OPTIONS (retry_timeout 0, dead_timeout 0) and the strict engine: while the
    sidecar is down every request fails with HTTP 500; the first one after it is back works."""
    caplog.set_level(logging.WARNING)
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with override_settings(SESSION_ENGINE=STRICT_ENGINE), on(a):
        login(browser, "alice")
        a.stop()
        for _ in range(4):
            r = browser.get("/")
            assert r.status_code == 500
            assert "sessionid" not in r.cookies
        assert "ConnectionRefusedError" in caplog.text
        a.start()
        assert page(browser) == (200, "user=alice count=0\n")


def test_dynacache_down_logs_out_with_the_stock_store(
    dynamodb, table, start_dynacache, client_factory, caplog
):
    caplog.set_level(logging.WARNING)
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with on(a):
        login(browser, "carol")
        a.stop()
        r = browser.get("/")
        assert shows_login(r)
        assert r.cookies["sessionid"].value == "", "the session cookie is deleted"
        assert not caplog.records, "with nothing in the logs"


def test_pymemcache_default_retry_options_turn_a_down_dynacache_into_logouts(
    dynamodb, table, start_dynacache, client_factory, caplog
):
    """Without retry_timeout/dead_timeout 0, pymemcache answers the next read after a
    connection error with a miss: a logout, even with the strict engine. After a few
    failures it gives up on the server, and still does once dynacache is back."""
    caplog.set_level(logging.WARNING)
    options = dict(settings.CACHES["default"]["OPTIONS"])
    del options["retry_timeout"], options["dead_timeout"]
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    with override_settings(SESSION_ENGINE=STRICT_ENGINE), on(a, options=options):
        key = login(browser, "bob")
        a.stop()
        assert browser.get("/").status_code == 500
        r = browser.get("/")
        assert shows_login(r)
        assert r.cookies["sessionid"].value == "", "the session cookie is deleted"

        def gave_up():
            browser.cookies["sessionid"] = key  # the cookie as it was
            browser.get("/")
            return "All servers seem to be down" in caplog.text

        wait_for("pymemcache to give up on dynacache", gave_up, timeout=10, interval=0.2)
        a.start()
        caplog.clear()
        browser.cookies["sessionid"] = key
        assert browser.get("/").status_code == 500, "dynacache is back, pymemcache won't ask it"
        assert "All servers seem to be down" in caplog.text


def test_strict_engine_treats_a_malformed_cookie_as_no_session(
    dynamodb, table, start_dynacache, client_factory
):
    """What Django's stock backend catches exceptions for (ticket #17810) still reads as no session."""
    a = start_dynacache(dynamodb.endpoint, table)
    browser = client_factory()
    browser.cookies["sessionid"] = "x" * 300  # longer than a memcached key may be
    with override_settings(SESSION_ENGINE=STRICT_ENGINE), on(a):
        assert shows_login(browser.get("/"))


# --- coming from django-dynamodb-sessions ----------------------------------------------


def test_django_dynamodb_sessions_settings_as_dynacache_config(
    dynamodb, start_dynacache, client_factory
):
    """Its DYNAMODB_SESSIONS_TABLE_NAME, _TABLE_HASH_ATTRIB_NAME and _ALWAYS_CONSISTENT
    are dynacache's [dynamodb] table, key_attribute and consistent_reads."""
    table = "sessions-" + uuid.uuid4().hex[:8]
    config = (
        f'[dynamodb]\ntable = "{table}"\nkey_attribute = "session_key"\nconsistent_reads = true\n'
    )
    init_table(dynamodb.endpoint, table=table, config=config)
    schema = dynamodb.client.describe_table(TableName=table)["Table"]["KeySchema"]
    assert schema == [{"AttributeName": "session_key", "KeyType": "HASH"}]
    a = start_dynacache(dynamodb.endpoint, table, config=config)
    browser = client_factory()
    with on(a):
        key = login(browser, "alice")
    item = dynamodb.client.get_item(
        TableName=table,
        Key={"session_key": {"S": SESSION_ITEM_PREFIX + key}},
        ConsistentRead=True,
    )["Item"]
    assert session_data(item)["_auth_user_id"] == str(user_id("alice"))


# --- unix socket ------------------------------------------------------------------------


@pytest.mark.skipif(
    "--unix-socket" not in dynacache_help(), reason="dynacache has no --unix-socket yet"
)
def test_sessions_over_a_unix_socket(dynamodb, table, start_dynacache, client_factory, tmp_path):
    host = start_dynacache(dynamodb.endpoint, table, unix_socket=tmp_path / "dynacache.sock")
    assert host.location.startswith("unix:/")
    browser = client_factory()
    with on(host):
        key = login(browser, "carol")
        assert page(browser, "/count/") == (200, "count=1\n")
        assert page(browser) == (200, "user=carol count=1\n")
    assert session_data(dynamodb.session_item(table, key))["count"] == 1
