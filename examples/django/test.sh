#!/usr/bin/env bash
# test.sh: the Django example's end-to-end tests (real Django, pymemcache,
# dynacache and DynamoDB Local).
#
# Makes a virtualenv in examples/django/.venv if missing, installs the pinned
# requirements, and runs the pytest suite. dynacache is $DYNACACHE_BIN, else
# built here with `cargo build --bin dynacache`. DynamoDB Local: the one in
# $DYNACACHE_TEST_DYNAMODB if set (scripts/test.sh sets it), else the suite
# starts its own with scripts/dynamodb-local.sh (installed if missing).
# Extra arguments go to pytest (e.g. -k outage -x).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

if [ -z "${DYNACACHE_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --locked --bin dynacache)
  DYNACACHE_BIN="$ROOT/target/debug/dynacache"
fi
# Relative paths are relative to where we were called from.
DYNACACHE_BIN="$(cd "$(dirname "$DYNACACHE_BIN")" && pwd)/$(basename "$DYNACACHE_BIN")"
export DYNACACHE_BIN

if [ -z "${DYNACACHE_TEST_DYNAMODB:-}" ]; then
  "$ROOT/scripts/dynamodb-local.sh" install
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="$HERE/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"

echo "== pytest (examples/django)"
cd "$HERE"
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests" >&2
fi
exit "$status"
