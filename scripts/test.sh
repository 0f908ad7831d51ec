#!/usr/bin/env bash
# test.sh: install what the tests need, then run every test.
#
# Installs Java 17 and DynamoDB Local (scripts/dynamodb-local.sh install),
# Debian's memcached (the reference for conformance tests) and prometheus
# (promtool and a real Prometheus, for tests/monitoring.rs),
# starts one DynamoDB Local on a free loopback port for the whole run (tests
# share it, each on its own table; fault tests start private ones), runs
# formatting and lint checks and the whole test suite, and stops DynamoDB
# Local on the way out, whatever happened.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DDB=scripts/dynamodb-local.sh
"$DDB" install

# Debian's memcached 1.6: the reference the conformance tests compare with, live.
if ! command -v memcached >/dev/null; then
  echo "test: apt-get install memcached"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq memcached >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq memcached >/dev/null; }
fi

# Debian's prometheus (promtool and prometheus): tests/monitoring.rs checks the
# rules and dashboard of examples/monitoring and scrapes a real dynacache with
# a Prometheus of its own (own port, config and data dir). Where a service
# manager started the packaged one, stop it: nothing may hold 9090.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "test: apt-get install prometheus"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi

# The Rust toolchain comes with the machine (rustup); fmt and clippy are its components.
rustup component add rustfmt clippy >/dev/null 2>&1 || true

PORT="$("$DDB" free-port)"
trap '"$DDB" stop "$PORT"' EXIT
"$DDB" start "$PORT"

export DYNACACHE_TEST_DYNAMODB="http://127.0.0.1:$PORT"
export DYNAMODB_LOCAL_DIR="${DYNAMODB_LOCAL_DIR:-$PWD/.dynamodb-local}"
# DynamoDB Local accepts any credentials whose key id is letters and digits.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local}"
export AWS_REGION="${AWS_REGION:-us-east-1}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== module graph: no cycle between modules (scripts/module-graph.py)"
python3 scripts/module-graph.py
python3 scripts/module-graph.py --top
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked "$@"
DYNACACHE_BIN=target/debug/dynacache examples/django/test.sh
