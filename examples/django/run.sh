#!/usr/bin/env bash
# run.sh: serve the Django example against the dynacache of the quick start.
#
#   scripts/run.sh                 # terminal 1: DynamoDB Local + dynacache on 127.0.0.1:11211
#   examples/django/run.sh         # terminal 2: http://127.0.0.1:8080/, log in as demo / demo
#
# Makes the virtualenv (.venv) if missing, creates the users table in a
# SQLite file (DJANGO_DB_PATH, default in the temp dir) with the user
# "demo" (password "demo"), and runs `manage.py runserver`. Sessions go to
# dynacache at DYNACACHE_LOCATION (default 127.0.0.1:11211, or
# unix:/path/to.sock) and so to DynamoDB. PORT sets the web port (8080).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE"

export DYNACACHE_LOCATION="${DYNACACHE_LOCATION:-127.0.0.1:11211}"
PORT="${PORT:-8080}"

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

# Is dynacache there? (`version`, as any memcached client would ask.)
if ! .venv/bin/python - <<'PY'; then
import os, socket, sys
loc = os.environ["DYNACACHE_LOCATION"]
try:
    if loc.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(loc[5:])
    else:
        host, port = loc.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=2)
    s.sendall(b"version\r\n")
    sys.exit(0 if s.recv(100).startswith(b"VERSION ") else 1)
except OSError:
    sys.exit(1)
PY
  echo "run: no dynacache at $DYNACACHE_LOCATION; start it first: scripts/run.sh" >&2
  exit 1
fi

.venv/bin/python manage.py migrate --verbosity 0
.venv/bin/python manage.py shell --verbosity 0 -c '
from django.contrib.auth.models import User
if not User.objects.filter(username="demo").exists():
    User.objects.create_user("demo", password="demo")
'
echo "run: http://127.0.0.1:$PORT/ (user demo, password demo); sessions in dynacache at $DYNACACHE_LOCATION"
exec .venv/bin/python manage.py runserver --noreload "127.0.0.1:$PORT"
