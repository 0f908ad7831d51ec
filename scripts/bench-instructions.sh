#!/usr/bin/env bash
# bench-instructions.sh: instructions per request of dynacache binaries on
# the miss and write paths, counted by valgrind (callgrind): the same count
# whatever else the machine does, so two binaries compare on a noisy machine.
#
#   scripts/bench-instructions.sh BIN [BIN...]    # e.g. an older commit's binary, then target/release/dynacache
#
# For each binary and workload (a hit: a get of one of 100 keys the cache
# holds, max_local_age 1h; a consistent GetItem that finds the item, as a
# miss or a re-read does: max_local_age 1ms; a set of a 32-byte value),
# runs it under callgrind twice, loaded by one connection of the load
# generator for 3 s and for 12 s (SHORT=, LONG= to change), and prints
# (instructions of the long run -
# those of the short one) / (its requests - the short one's): start-up and
# shutdown cancel out. DynamoDB Local's work is not counted (another
# process); dynacache's own background work (the flush_all marker read every
# second, upkeep) is, spread over the requests: a few thousand instructions a
# request, more when the run is slower. Its own DynamoDB Local on a free port, stopped on exit; loopback
# only. About 9 minutes for two binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 64; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

DDB=scripts/dynamodb-local.sh
"$DDB" install >&2
PORT="$("$DDB" free-port)"
OUT="$(mktemp -d /tmp/dynacache-instructions.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  "$DDB" stop "$PORT" >&2 || true
}
trap cleanup EXIT
"$DDB" start "$PORT" >&2
ENDPOINT="http://127.0.0.1:$PORT"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local}" AWS_REGION="${AWS_REGION:-us-east-1}"

cargo build --release --locked --bin dynacache >&2
LOADGEN="$(cargo bench --locked --no-run --bench loadgen --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*loadgen[^"]*\)".*/\1/p' | tail -n1)"
SPACE=(--keys 2000 --key-size 16 --value-size 32)
"$1" --endpoint-url "$ENDPOINT" --table misses init-table >&2
"$LOADGEN" --bench ddb-fill --endpoint "$ENDPOINT" --table misses "${SPACE[@]}" >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Instructions and requests of one run: BIN WORKLOAD-ARGS DURATION
measure() {
  local bin="$1" args="$2" duration="$3" age="$4" port metrics out pid ops
  port="$(free_port)" metrics="$(free_port)"
  out="$OUT/callgrind.$RANDOM"
  printf 'listen = "127.0.0.1:%s"\nmetrics_listen = "127.0.0.1:%s"\nmax_local_age = "%s"\n[dynamodb]\ntable = "misses"\nendpoint_url = "%s"\n' \
    "$port" "$metrics" "$age" "$ENDPOINT" >"$OUT/c.toml"
  TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --config "$OUT/c.toml" 2>"$OUT/valgrind.log" &
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  read -r -a wargs <<<"$args"
  ops="$("$LOADGEN" --bench mc --addr "127.0.0.1:$port" "${wargs[@]}" --connections 1 \
    --duration "$duration" --warmup 0s | sed -n 's/^RESULT.* ops=\([0-9]*\) .*/\1/p')"
  kill -TERM "$pid"
  wait "$pid" || true
  echo "$(sed -n 's/^summary: //p' "$out") $ops"
}

printf '| binary | workload | instructions per request |\n|---|---|---|\n'
for bin in "$@"; do
  # name|loadgen arguments|max_local_age. The hit workload's 100 keys are
  # read from DynamoDB once in each run, so their misses cancel out.
  for w in "hit|--keys 100 --key-size 16 --value-size 32|1h" \
    "getitem-found|${SPACE[*]}|1ms" "putitem|${SPACE[*]} --set-ratio 1|1ms"; do
    IFS='|' read -r name args age <<<"$w"
    read -r short_i short_n <<<"$(measure "$bin" "$args" "${SHORT:-3s}" "$age")"
    read -r long_i long_n <<<"$(measure "$bin" "$args" "${LONG:-12s}" "$age")"
    per=$(( (long_i - short_i) / (long_n - short_n) ))
    printf '| %s | %s | %s (%s requests against %s) |\n' "$bin" "$name" "$per" "$long_n" "$short_n"
  done
done
