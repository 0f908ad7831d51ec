#!/usr/bin/env bash
# bench.sh: dynacache against memcached on the hit path, against direct
# aws-sdk-dynamodb calls on the miss and write paths, and its memory per item.
# Every figure in BENCHMARKS.md comes from this script.
#
#   scripts/bench.sh                 # hit path + miss/write paths, ~10 minutes
#   scripts/bench.sh --long          # 5 rounds of 20 s per workload
#   scripts/bench.sh --only memory   # RSS with 1M items, budget check (~5 min)
#   scripts/bench.sh --only fleet    # fleet: write latency with 0-4 peers, reads per request (~4.5 min)
#   scripts/bench.sh --only all      # everything
#
# Options: --rounds N, --duration SECS, --only hit|miss|memory|fleet|hit,miss|all,
# --workloads REGEX (only the hit/miss workloads whose name matches),
# --peers "1 2 4" (fleet: peer counts to measure besides fleet mode off),
# --threads N (server threads, default 1), --no-pin, --out DIR (results; default
# a temporary directory, printed at the end), --dynacache BIN (run this
# dynacache binary instead of the one built here), --against BIN (hit and
# miss/write runs also alternate with this dynacache binary, an older
# commit's, tagged server=before: a before/after comparison in the same
# run, reported against it too).
#
# What it does: installs Debian's memcached if missing; starts its own
# DynamoDB Local, memcached and dynacache on free loopback ports (never on a
# port something else holds); with 2+ cores pins the servers to CPU 0 and the
# load generator to CPU 1 (taskset), the same for both servers (miss/write
# runs: dynacache and every client on CPU 0, DynamoDB Local on CPU 1); warms both;
# runs each workload on both servers in alternation (A B A B ...); prints
# medians and ratios (`loadgen report`). Stops every process it started, on any
# exit. Loopback only; every run is bounded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=3
DURATION=5
WARMUP=1
ONLY="hit,miss"
THREADS=1
PIN=1
OUT=""
WORKLOADS_RE="."
PEERS="0 1 2 4"
DYNACACHE_BIN=""
AGAINST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --long) ROUNDS=5 DURATION=20 ;;
    --rounds) ROUNDS="$2"; shift ;;
    --duration) DURATION="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    --workloads) WORKLOADS_RE="$2"; shift ;;
    --peers) PEERS="$2"; shift ;;
    --no-pin) PIN=0 ;;
    --out) OUT="$2"; shift ;;
    --dynacache) DYNACACHE_BIN="$2"; shift ;;
    --against) AGAINST="$2"; shift ;;
    -h | --help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "bench: unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
[ "$ONLY" = all ] && ONLY="hit,miss,memory,fleet"
want() { [[ ",$ONLY," == *",$1,"* ]]; }

log() { echo "bench: $*" >&2; }

OUT="${OUT:-$(mktemp -d /tmp/dynacache-bench.XXXXXX)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: >"$RESULTS"

# ---------------------------------------------------------------- processes we own
PIDS=()
DDB=scripts/dynamodb-local.sh
DDB_PORT=""
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [ -n "$DDB_PORT" ] && "$DDB" stop "$DDB_PORT" >&2 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$DDB" free-port; }

# Waits until `pid` itself listens on `port` (never measure someone else's server).
wait_listening() {
  local pid="$1" port="$2"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { log "pid $pid exited"; return 1; }
    ss -ltnpH "sport = :$port" 2>/dev/null | grep -q "pid=$pid," && return 0
    sleep 0.1
  done
  log "pid $pid never listened on $port"
  return 1
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# ---------------------------------------------------------------- tools
if ! command -v memcached >/dev/null; then
  log "apt-get install memcached"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq memcached >/dev/null
fi
command -v ss >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq iproute2 >/dev/null; }

log "building (release): dynacache and the load generator"
cargo build --release --locked --bin dynacache >&2
LOADGEN="$(cargo bench --locked --no-run --bench loadgen --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*loadgen[^"]*\)".*/\1/p' | tail -n1)"
[ -x "$LOADGEN" ] || { log "cannot find the loadgen executable"; exit 1; }
DYNACACHE="${DYNACACHE_BIN:-$PWD/target/release/dynacache}"
[ -x "$DYNACACHE" ] || { log "no dynacache executable at $DYNACACHE"; exit 1; }
[ -z "$AGAINST" ] || [ -x "$AGAINST" ] || { log "no dynacache executable at $AGAINST"; exit 1; }

NPROC="$(nproc)"
if [ "$PIN" = 1 ] && [ "$NPROC" -ge 2 ]; then
  SERVER_CPUS=0
  GEN_CPUS=1
  ON_SERVER=(taskset -c "$SERVER_CPUS")
  ON_GEN=(taskset -c "$GEN_CPUS")
else
  ON_SERVER=()
  ON_GEN=()
fi
loadgen() { "${ON_GEN[@]}" "$LOADGEN" --bench "$@"; }
# Not pinned: fills; the miss/write runs redefine it to pin the "application host".
loadgen_free() { "$LOADGEN" --bench "$@"; }

export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
export RUST_LOG="${RUST_LOG:-warn}"

DDB_PORT="$(free_port)"
"$DDB" start "$DDB_PORT" >&2
ENDPOINT="http://127.0.0.1:$DDB_PORT"

MEMORY_MB=1024

# Starts memcached with the dynacache's thread count and memory; sets MC_PID, MC_PORT.
start_memcached() {
  local mem="${1:-$MEMORY_MB}"
  MC_PORT="$(free_port)"
  "${ON_SERVER[@]}" memcached -u nobody -l 127.0.0.1 -p "$MC_PORT" -U 0 -t "$THREADS" -m "$mem" -c 4096 &
  MC_PID=$!
  PIDS+=("$MC_PID")
  wait_listening "$MC_PID" "$MC_PORT"
  log "memcached pid $MC_PID on 127.0.0.1:$MC_PORT (-t $THREADS -m $mem)"
}

# Starts dynacache on `table` with `max_local_age` and a memory limit, on the
# server's CPU; sets DC_PID, DC_PORT, DC_METRICS.
start_dynacache() {
  local table="$1" age="$2" mem="${3:-${MEMORY_MB}MiB}" name="${4:-dynacache}"
  local pin=("${ON_SERVER[@]}")
  DC_PORT="$(free_port)"
  DC_METRICS="$(free_port)"
  local config="$OUT/$name.toml"
  cat >"$config" <<EOF
listen = "127.0.0.1:$DC_PORT"
metrics_listen = "127.0.0.1:$DC_METRICS"
memory_limit = "$mem"
max_local_age = "$age"
max_connections = 4096
[dynamodb]
table = "$table"
endpoint_url = "$ENDPOINT"
EOF
  local bin="${DC_BIN:-$DYNACACHE}"
  "$bin" --config "$config" init-table >&2
  TOKIO_WORKER_THREADS="$THREADS" "${pin[@]}" "$bin" --config "$config" 2>"$OUT/$name.log" &
  DC_PID=$!
  PIDS+=("$DC_PID")
  wait_listening "$DC_PID" "$DC_PORT"
  log "dynacache pid $DC_PID on 127.0.0.1:$DC_PORT ($bin, worker threads $THREADS, $mem, max_local_age $age, table $table)"
}

# With --against: the same, from the older binary, as BEFORE_PORT and BEFORE_PID.
start_before() {
  [ -n "$AGAINST" ] || return 0
  DC_BIN="$AGAINST" start_dynacache "$@"
  BEFORE_PORT="$DC_PORT" BEFORE_PID="$DC_PID" BEFORE_METRICS="$DC_METRICS"
}

stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}

init_table() { "$DYNACACHE" --endpoint-url "$ENDPOINT" --table "$1" init-table >&2; }

metric() { curl -s -m 2 "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

TIMING=(--duration "${DURATION}s" --warmup "${WARMUP}s")

# ---------------------------------------------------------------- hit path
if want hit; then
  KEYS=100000
  SPACE=(--keys "$KEYS" --key-size 16 --value-size 32)
  log "hit path: filling DynamoDB table 'hits' with $KEYS items"
  init_table hits
  loadgen_free ddb-fill --endpoint "$ENDPOINT" --table hits "${SPACE[@]}" >&2
  start_memcached
  start_before hits 0s "${MEMORY_MB}MiB" before-hits
  start_dynacache hits 0s "${MEMORY_MB}MiB" dynacache-hits
  loadgen mc --addr "127.0.0.1:$MC_PORT" "${SPACE[@]}" --warm set --warm-only >&2
  loadgen mc --addr "127.0.0.1:$DC_PORT" "${SPACE[@]}" --warm get --warm-only >&2
  declare -A ADDR=([memcached]="127.0.0.1:$MC_PORT" [dynacache]="127.0.0.1:$DC_PORT")
  declare -A PID=([memcached]="$MC_PID" [dynacache]="$DC_PID")
  HIT_SERVERS=(memcached dynacache)
  if [ -n "$AGAINST" ]; then
    loadgen mc --addr "127.0.0.1:$BEFORE_PORT" "${SPACE[@]}" --warm get --warm-only >&2
    ADDR[before]="127.0.0.1:$BEFORE_PORT"
    PID[before]="$BEFORE_PID"
    HIT_SERVERS+=(before)
  fi
  WORKLOADS=(
    "hit-get-50conn|--connections 50"
    "get90-set10-50conn|--connections 50 --set-ratio 0.1"
    "multiget100-50conn|--connections 50 --multiget 100"
    "new-conn-per-get-16clients|--connections 16 --new-conn"
    "new-conn-per-get-4clients|--connections 4 --new-conn"
    "hit-get-50conn-depth16-zipf|--connections 50 --depth 16 --dist zipf"
  )
  for round in $(seq "$ROUNDS"); do
    for w in "${WORKLOADS[@]}"; do
      name="${w%%|*}"
      [[ "$name" =~ $WORKLOADS_RE ]] || continue
      read -r -a wargs <<<"${w#*|}"
      # Alternate the order, so no server always follows the same one.
      order=("${HIT_SERVERS[@]}")
      if [ $((round % 2)) = 0 ]; then
        order=(); for ((i = ${#HIT_SERVERS[@]} - 1; i >= 0; i--)); do order+=("${HIT_SERVERS[$i]}"); done
      fi
      for server in "${order[@]}"; do
        log "round $round/$ROUNDS $name on $server"
        loadgen mc --addr "${ADDR[$server]}" "${SPACE[@]}" "${wargs[@]}" "${TIMING[@]}" \
          --server-pid "${PID[$server]}" --tag "workload=$name" --tag "server=$server" --tag "round=$round" \
          | tee -a "$RESULTS"
      done
    done
  done
  log "dynacache cache after the hit runs: items $(metric "$DC_METRICS" dynacache_cache_items), hits $(metric "$DC_METRICS" dynacache_cache_hits_total), misses $(metric "$DC_METRICS" dynacache_cache_misses_total)"
  stop_pid "$DC_PID"
  stop_pid "$MC_PID"
  [ -z "$AGAINST" ] || stop_pid "$BEFORE_PID"
fi

# ---------------------------------------------------------------- miss and write paths
if want miss; then
  KEYS=20000
  SPACE=(--keys "$KEYS" --key-size 16 --value-size 32)
  # Concurrency 1 shows the latency each path adds; 8 loads DynamoDB Local,
  # which then takes most of both cores.
  CONCURRENCY=(1 8)
  log "miss/write paths: filling DynamoDB table 'misses' with $KEYS items"
  init_table misses
  loadgen_free ddb-fill --endpoint "$ENDPOINT" --table misses "${SPACE[@]}" >&2
  # Two cores: the "application host" is CPU 0 (dynacache and its client,
  # or the direct-SDK client) and "DynamoDB" is CPU 1 (DynamoDB Local's JVM,
  # every thread of it), so neither side's CPU is taken by the other's
  # DynamoDB. One core: nothing is pinned.
  if [ "$PIN" = 1 ] && [ "$NPROC" -ge 2 ]; then
    DDB_PID="$(cat "${DYNAMODB_LOCAL_DIR:-$PWD/.dynamodb-local}/dynamodb-local-$DDB_PORT.pid")"
    taskset -a -p -c "$GEN_CPUS" "$DDB_PID" >/dev/null
    MISS_PIN=(taskset -c "$SERVER_CPUS")
    log "miss/write paths: DynamoDB Local (pid $DDB_PID) on CPU $GEN_CPUS; dynacache and the clients on CPU $SERVER_CPUS"
  else
    MISS_PIN=()
  fi
  loadgen_free() { "${MISS_PIN[@]}" "$LOADGEN" --bench "$@"; }
  # Twice: against DynamoDB Local on loopback (the worst case for the ratio:
  # the hop to dynacache costs what it costs, DynamoDB almost nothing), then
  # through `loadgen delay-proxy`, which holds each chunk 1 ms each way (2 ms
  # with tokio's timer rounding), so DynamoDB is as far as a real endpoint:
  # workloads named `-remote`. Both sides use the same endpoint each time.
  LOOPBACK_ENDPOINT="$ENDPOINT"
  for distance in loopback remote; do
    suffix=""
    if [ "$distance" = remote ]; then
      [[ "getitem-found-c1-remote" =~ $WORKLOADS_RE || "putitem-c8-remote" =~ $WORKLOADS_RE ]] || continue
      PROXY_PORT="$(free_port)"
      proxy_pin=()
      [ "${#MISS_PIN[@]}" -gt 0 ] && proxy_pin=(taskset -c "$GEN_CPUS")
      "${proxy_pin[@]}" "$LOADGEN" --bench delay-proxy --listen "127.0.0.1:$PROXY_PORT" \
        --upstream "127.0.0.1:$DDB_PORT" --delay 1ms &
      PROXY_PID=$!
      PIDS+=("$PROXY_PID")
      wait_listening "$PROXY_PID" "$PROXY_PORT"
      ENDPOINT="http://127.0.0.1:$PROXY_PORT"
      suffix="-remote"
    fi
    # max_local_age 1ms: every get of a cached key re-reads it (a consistent
    # GetItem that finds the item, then fills the cache), as a miss does.
    start_before misses 1ms "${MEMORY_MB}MiB" "before-misses-$distance"
    start_dynacache misses 1ms "${MEMORY_MB}MiB" "dynacache-misses-$distance"
    MISS_WORKLOADS=(
      "getitem-found|mc --addr 127.0.0.1:$DC_PORT|ddb --op get"
      "getitem-absent|mc --addr 127.0.0.1:$DC_PORT --key-prefix absent|ddb --op get --key-prefix absent"
      "putitem|mc --addr 127.0.0.1:$DC_PORT --set-ratio 1|ddb --op put"
    )
    for round in $(seq "$ROUNDS"); do
      for conc in "${CONCURRENCY[@]}"; do
        for w in "${MISS_WORKLOADS[@]}"; do
          IFS='|' read -r base via_dc via_sdk <<<"$w"
          name="$base-c$conc$suffix"
          [[ "$name" =~ $WORKLOADS_RE ]] || continue
          read -r -a dc_args <<<"$via_dc"
          read -r -a sdk_args <<<"$via_sdk"
          sides=(sdk dynacache)
          [ -z "$AGAINST" ] || sides+=(before)
          order=("${sides[@]}")
          if [ $((round % 2)) = 0 ]; then
            order=(); for ((i = ${#sides[@]} - 1; i >= 0; i--)); do order+=("${sides[$i]}"); done
          fi
          for side in "${order[@]}"; do
            log "round $round/$ROUNDS $name via $side"
            if [ "$side" = before ]; then
              loadgen_free "${dc_args[@]/$DC_PORT/$BEFORE_PORT}" --connections "$conc" "${SPACE[@]}" "${TIMING[@]}" \
                --server-pid "$BEFORE_PID" --tag "workload=$name" --tag server=before --tag "round=$round" | tee -a "$RESULTS"
            elif [ "$side" = sdk ]; then
              loadgen_free "${sdk_args[@]}" --endpoint "$ENDPOINT" --table misses --connections "$conc" \
                "${SPACE[@]}" "${TIMING[@]}" --tag "workload=$name" --tag server=sdk --tag "round=$round" | tee -a "$RESULTS"
            else
              loadgen_free "${dc_args[@]}" --connections "$conc" "${SPACE[@]}" "${TIMING[@]}" \
                --server-pid "$DC_PID" --tag "workload=$name" --tag server=dynacache --tag "round=$round" | tee -a "$RESULTS"
            fi
          done
        done
      done
    done
    log "dynacache after the $distance miss runs: revalidations $(metric "$DC_METRICS" dynacache_cache_revalidations_total), misses $(metric "$DC_METRICS" dynacache_cache_misses_total), coalesced $(metric "$DC_METRICS" dynacache_cache_coalesced_misses_total)"
    stop_pid "$DC_PID"
    [ -z "$AGAINST" ] || stop_pid "$BEFORE_PID"
    if [ "$distance" = remote ]; then
      stop_pid "$PROXY_PID"
      ENDPOINT="$LOOPBACK_ENDPOINT"
    fi
  done
fi

# ---------------------------------------------------------------- memory
if want memory; then
  ITEMS=1000000
  SPACE=(--keys "$ITEMS" --key-size 16 --value-size 32)
  FIRST_TENTH=(--keys "$((ITEMS / 10))" --key-size 16 --value-size 32)
  MEMFILE="$OUT/memory.txt"
  log "memory: filling DynamoDB table 'mem' with $ITEMS items (BatchWriteItem)"
  init_table mem
  loadgen_free ddb-fill --endpoint "$ENDPOINT" --table mem "${SPACE[@]}" >&2
  {
    # memcached: RSS before and after setting every key.
    # Also RSS after the first tenth: (after - tenth) / (9/10 of the items)
    # is the cost of one more item, without the fixed costs of start-up.
    start_memcached 1024
    sleep 1
    before="$(rss_kib "$MC_PID")"
    loadgen mc --addr "127.0.0.1:$MC_PORT" "${FIRST_TENTH[@]}" --warm set --warm-only >&2
    tenth="$(rss_kib "$MC_PID")"
    loadgen mc --addr "127.0.0.1:$MC_PORT" "${SPACE[@]}" --warm set --warm-only >&2
    sleep 1
    after="$(rss_kib "$MC_PID")"
    items="$(printf 'stats\r\nquit\r\n' | nc -q 2 127.0.0.1 "$MC_PORT" | awk '/STAT curr_items/ {print $3}' | tr -d '\r')"
    echo "MEMORY server=memcached limit_mib=1024 items=$items rss_before_kib=$before rss_tenth_kib=$tenth rss_after_kib=$after bytes_per_item=$(((after - before) * 1024 / items)) marginal_bytes_per_item=$(((after - tenth) * 1024 / (items - ITEMS / 10)))"
    stop_pid "$MC_PID"

    # dynacache with room for every item, then with a budget a quarter of that.
    for mem in 1024MiB 32MiB; do
      start_dynacache mem 0s "$mem" "dynacache-mem-$mem"
      sleep 1
      before="$(rss_kib "$DC_PID")"
      loadgen mc --addr "127.0.0.1:$DC_PORT" "${FIRST_TENTH[@]}" --warm get --warm-only >&2
      tenth="$(rss_kib "$DC_PID")"
      sleep 2.5 # the gauges refresh once a second
      tenth_items="$(metric "$DC_METRICS" dynacache_cache_items)"
      loadgen mc --addr "127.0.0.1:$DC_PORT" "${SPACE[@]}" --warm get --warm-only >&2
      sleep 2.5
      after="$(rss_kib "$DC_PID")"
      items="$(metric "$DC_METRICS" dynacache_cache_items)"
      bytes="$(metric "$DC_METRICS" dynacache_cache_bytes)"
      limit="$(metric "$DC_METRICS" dynacache_cache_limit_bytes)"
      added=$((${items%.*} - ${tenth_items%.*}))
      [ "$added" -gt 0 ] && marginal=$(((after - tenth) * 1024 / added)) || marginal=NaN
      echo "MEMORY server=dynacache limit=$mem limit_bytes=$limit items=$items cache_bytes=$bytes rss_before_kib=$before rss_tenth_kib=$tenth rss_after_kib=$after rss_growth_bytes=$(((after - before) * 1024)) bytes_per_item=$(((after - before) * 1024 / ${items%.*})) marginal_bytes_per_item=$marginal charged_per_item=$((${bytes%.*} / ${items%.*}))"
      stop_pid "$DC_PID"
    done
  } | tee -a "$MEMFILE"
fi

# ---------------------------------------------------------------- fleet
# What fleet mode adds to a write: `set` latency through one sidecar while
# 0, 1, 2 or 4 other sidecars hold its lease (each write waits for their
# acknowledgements), against fleet mode off, in alternation, on one table.
# All sidecars and the generator share the machine (not pinned): compare
# ratios within the run.
if want fleet; then
  log "fleet: write latency with peers: $PEERS"
  init_table fleet
  FLEET_RESULTS="$OUT/fleet.txt"
  : >"$FLEET_RESULTS"
  : >"$OUT/fleet-ackwait.txt"
  : >"$OUT/fleet-cost.txt"
  start_fleet() { # $1 = sidecars in fleet mode (0: one sidecar, fleet mode off)
    local n="$1" i
    FLEET_PIDS=()
    FLEET_ADDR=""
    for i in $(seq 0 $(( n > 0 ? n - 1 : 0 ))); do
      local port metrics peer
      port="$(free_port)"; metrics="$(free_port)"; peer="$(free_port)"
      local args=(--listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics"
        --table fleet --endpoint-url "$ENDPOINT" --max-connections 4096)
      if [ "$n" -gt 0 ]; then
        args+=(--fleet-listen "127.0.0.1:$peer" --fleet-secret "bench secret, sixteen bytes or more")
      fi
      "$DYNACACHE" "${args[@]}" 2>"$OUT/fleet-$n-$i.log" &
      FLEET_PIDS+=($!)
      PIDS+=($!)
      wait_listening "$!" "$port"
      [ -z "$FLEET_ADDR" ] && FLEET_ADDR="127.0.0.1:$port" && FLEET_METRICS="$metrics"
      # Ready: in fleet mode, every member counts it (may acknowledge writes).
      for _ in $(seq 300); do
        [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics/readyz")" = 200 ] && break
        sleep 0.1
      done
    done
  }
  for round in $(seq "$ROUNDS"); do
    for peers in off $PEERS; do
      if [ "$peers" = off ]; then n=0; else n=$((peers + 1)); fi
      start_fleet "$n"
      log "round $round/$ROUNDS fleet peers=$peers"
      loadgen_free mc --addr "$FLEET_ADDR" --set-ratio 1 --connections 8 --keys 10000 "${TIMING[@]}" \
        --tag workload=set-c8 --tag "server=peers-$peers" --tag "round=$round" | tee -a "$FLEET_RESULTS"
      if [ "$n" -gt 0 ]; then
        # What fleet mode added to each write: the wait for acknowledgements.
        wait_sum="$(metric "$FLEET_METRICS" dynacache_fleet_ack_wait_seconds_sum)"
        wait_count="$(metric "$FLEET_METRICS" dynacache_fleet_ack_wait_seconds_count)"
        echo "ACKWAIT peers=$peers round=$round writes_waiting=${wait_count:-0} mean_us=$(awk -v s="${wait_sum:-0}" -v c="${wait_count:-0}" 'BEGIN {printf "%.0f", c ? 1e6 * s / c : 0}') acked=$(metric "$FLEET_METRICS" dynacache_fleet_invalidations_acked_total) timed_out=$(metric "$FLEET_METRICS" dynacache_fleet_invalidations_timed_out_total)" | tee -a "$OUT/fleet-ackwait.txt"
      fi
      for pid in "${FLEET_PIDS[@]}"; do stop_pid "$pid"; done
    done
  done
  echo
  echo "## fleet: set latency by peers / fleet mode off"
  "$LOADGEN" --bench report "$FLEET_RESULTS" --baseline peers-off

  # What coherence costs in DynamoDB reads: a session-like load (10,000
  # sessions, uniform; nine requests in ten read a session, one writes it)
  # on 3 sidecars, each request going to any of them (3 generators, one
  # per sidecar, on one key space: round-robin in effect). Fleet mode
  # (max_local_age 1h) against fleet mode off with max_local_age 2 s (the
  # default: stale for up to 2 s across hosts) and 1 ms (every read asks
  # DynamoDB: the coherent choice without fleet mode; 0 s would mean
  # "never re-read"). Caches warmed first; reads counted over the run.
  COST_KEYS=10000
  init_table fleetcost
  loadgen_free ddb-fill --endpoint "$ENDPOINT" --table fleetcost --keys "$COST_KEYS" >&2
  reads_of() { # the sum over metrics ports "$@" of DynamoDB reads (GetItem, BatchGetItem)
    local p
    for p in "$@"; do curl -s -m 2 "http://127.0.0.1:$p/metrics"; done |
      awk '$1 ~ /^dynacache_dynamodb_requests_total[{]operation="(GetItem|BatchGetItem)"/ {s += $2} END {printf "%d", s}'
  }
  for mode in fleet age-2s age-1ms; do
    COST_PIDS=() COST_ADDRS=() COST_METRICS=()
    for i in 0 1 2; do
      port="$(free_port)"; metrics="$(free_port)"; peer="$(free_port)"
      args=(--listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics"
        --table fleetcost --endpoint-url "$ENDPOINT" --max-connections 4096)
      case "$mode" in
        fleet) args+=(--max-local-age 1h --fleet-listen "127.0.0.1:$peer"
          --fleet-secret "bench secret, sixteen bytes or more") ;;
        age-2s) args+=(--max-local-age 2s) ;;
        age-1ms) args+=(--max-local-age 1ms) ;;
      esac
      "$DYNACACHE" "${args[@]}" 2>"$OUT/cost-$mode-$i.log" &
      COST_PIDS+=($!); PIDS+=($!)
      wait_listening "$!" "$port"
      COST_ADDRS+=("127.0.0.1:$port"); COST_METRICS+=("$metrics")
    done
    for metrics in "${COST_METRICS[@]}"; do
      for _ in $(seq 300); do
        [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics/readyz")" = 200 ] && break
        sleep 0.1
      done
    done
    if [ "$mode" = fleet ]; then # serving from memory
      for metrics in "${COST_METRICS[@]}"; do
        for _ in $(seq 300); do
          [ "$(metric "$metrics" dynacache_fleet_coherent)" = 1 ] && break
          sleep 0.1
        done
      done
    fi
    for addr in "${COST_ADDRS[@]}"; do
      loadgen_free mc --addr "$addr" --keys "$COST_KEYS" --warm get --warm-only >&2
    done
    before="$(reads_of "${COST_METRICS[@]}")"
    gens=()
    for i in 0 1 2; do
      loadgen_free mc --addr "${COST_ADDRS[$i]}" --keys "$COST_KEYS" --set-ratio 0.1 --connections 4 \
        --duration "${DURATION}s" --warmup 0s --tag workload=session --tag "server=$mode" >"$OUT/cost-$mode-gen$i.txt" &
      gens+=("$!"); PIDS+=("$!")
    done
    for g in "${gens[@]}"; do wait "$g"; done
    after="$(reads_of "${COST_METRICS[@]}")"
    requests="$(cat "$OUT"/cost-"$mode"-gen*.txt | sed -n 's/.* ops=\([0-9]*\) .*/\1/p' | awk '{s += $1} END {printf "%d", s}')"
    echo "COST mode=$mode requests=$requests dynamodb_reads=$((after - before)) reads_per_1000_requests=$(awk -v r="$((after - before))" -v n="$requests" 'BEGIN {printf "%.1f", n ? 1000 * r / n : 0}')" | tee -a "$OUT/fleet-cost.txt"
    for pid in "${COST_PIDS[@]}"; do stop_pid "$pid"; done
  done
fi

# ---------------------------------------------------------------- report
if [ -s "$RESULTS" ]; then
  grep -Ev 'workload=(getitem|putitem)' "$RESULTS" >"$OUT/hit.txt" || true
  grep -E 'workload=(getitem|putitem)' "$RESULTS" >"$OUT/miss.txt" || true
  if [ -s "$OUT/hit.txt" ]; then
    echo
    echo "## hit path: dynacache / memcached"
    "$LOADGEN" --bench report "$OUT/hit.txt" --baseline memcached
    if [ -n "$AGAINST" ]; then
      echo
      echo "## hit path: dynacache / the binary it is compared against (server=before)"
      grep -v 'server=memcached' "$OUT/hit.txt" >"$OUT/hit-before.txt"
      "$LOADGEN" --bench report "$OUT/hit-before.txt" --baseline before
    fi
  fi
  if [ -s "$OUT/miss.txt" ]; then
    echo
    echo "## miss and write paths: dynacache / direct aws-sdk-dynamodb"
    "$LOADGEN" --bench report "$OUT/miss.txt" --baseline sdk
    if [ -n "$AGAINST" ]; then
      echo
      echo "## miss and write paths: dynacache / the binary it is compared against (server=before)"
      grep -v 'server=sdk' "$OUT/miss.txt" >"$OUT/miss-before.txt"
      "$LOADGEN" --bench report "$OUT/miss-before.txt" --baseline before
    fi
  fi
fi
echo
echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1), $(free -g | awk '/Mem:/ {print $2}') GiB; $(date -u +%Y-%m-%dT%H:%MZ)"
echo "results: $OUT"
