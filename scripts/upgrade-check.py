#!/usr/bin/env python3
"""upgrade-check.py: what an older dynacache does with the items this one writes.

A rolling upgrade runs old and new sidecars on one table. This writes a
plain, a compressed and a chunked value through NEW, then reads and writes
them through OLD: the plain value must read back as it was, and the encoded
ones must be answered SERVER_ERROR (never bytes taken for the value).

    scripts/upgrade-check.py --old /tmp/dynacache-f870af5 --new target/debug/dynacache \\
        --endpoint http://127.0.0.1:8000

(An old binary: `git worktree add /tmp/old <commit>` and `cargo build --bin dynacache` there.)
Exits 0 when both hold. Loopback only; stops what it starts.
"""
import argparse
import os
import random
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, endpoint, table, env):
    subprocess.run([binary, "--endpoint-url", endpoint, "--table", table, "init-table"],
                   env=env, check=True, capture_output=True)
    port, metrics = free_port(), free_port()
    p = subprocess.Popen([binary, "--endpoint-url", endpoint, "--table", table,
                          "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics}"],
                         env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    sys.exit(f"{binary} never listened")


def call(port, request):
    """One request; its whole reply (a status line, or VALUE blocks to END)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        reply = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return reply
            reply += chunk
            if reply.startswith(b"VALUE"):
                if reply.endswith(b"\r\nEND\r\n"):
                    return reply
            elif reply.endswith(b"\r\n"):
                return reply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--endpoint", required=True)
    args = ap.parse_args()
    env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
               AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
               AWS_REGION=os.environ.get("AWS_REGION", "us-east-1"))
    table = f"upgrade{random.randrange(10**9)}"
    values = {
        b"plain": b"a small value",
        b"packed": b"<tr><td>row</td><td>value</td></tr>\n" * 3000,
        b"chunked": os.urandom(600_000),
    }
    new, port = start(args.new, args.endpoint, table, env)
    try:
        for key, value in values.items():
            reply = call(port, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
            assert reply == b"STORED\r\n", (key, reply)
    finally:
        new.terminate()
        new.wait()
    old, port = start(args.old, args.endpoint, table, env)
    ok = True
    try:
        for key, value in values.items():
            reply = call(port, b"get %s\r\n" % key)
            if key == b"plain":
                good = reply == b"VALUE plain 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
            else:
                good = reply.startswith(b"SERVER_ERROR ")
            print(f"old get {key.decode()}: {reply[:70]!r}{'' if good else '  <- WRONG'}")
            ok &= good
        for request in (b"set packed 0 0 1\r\nx\r\n", b"delete chunked\r\n"):
            reply = call(port, request)
            good = reply.startswith(b"SERVER_ERROR ")
            print(f"old {request.split()[0].decode()}: {reply!r}{'' if good else '  <- WRONG'}")
            ok &= good
    finally:
        old.terminate()
        old.wait()
    print("an older binary fails safe" if ok else "an older binary served wrong bytes")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
