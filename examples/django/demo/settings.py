"""Settings of the dynacache example: Django sessions in dynacache.

Sessions live in the cache (Django's stock cache session backend), and the
cache is dynacache, spoken to with Django's stock PyMemcacheCache; dynacache
keeps them in DynamoDB. The SQL database holds the users only.

Environment:
  DYNACACHE_LOCATION  dynacache's address: "127.0.0.1:11211" (the default,
                      scripts/run.sh) or "unix:/path/to/dynacache.sock"
  DJANGO_DB_PATH      the SQLite file for the users (default: in the temp dir)
"""

import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = "example-only-not-a-secret"  # an example app: never deploy this key
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

# --- the part to copy -------------------------------------------------------
SESSION_ENGINE = "django.contrib.sessions.backends.cache"
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
        "LOCATION": os.environ.get("DYNACACHE_LOCATION", "127.0.0.1:11211"),
        "OPTIONS": {
            "no_delay": True,
            # Longer than dynacache's dynamodb.operation_timeout (3 s): a slow
            # DynamoDB reaches Django as dynacache's SERVER_ERROR.
            "connect_timeout": 1,
            "timeout": 5,
            # After a socket error (dynacache down or restarting), pymemcache's
            # HashClient answers reads with misses until retry_timeout (1 s)
            # has passed, and after retry_attempts (2) more failures gives up
            # on the server for dead_timeout (60 s), even once it is back. A
            # miss is a logout: with 0 and 0 every call tries dynacache.
            "retry_timeout": 0,
            "dead_timeout": 0,
        },
    }
}
# ----------------------------------------------------------------------------

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

ROOT_URLCONF = "demo.urls"
WSGI_APPLICATION = "demo.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get(
            "DJANGO_DB_PATH", os.path.join(tempfile.gettempdir(), "dynacache-django-example.sqlite3")
        ),
    }
}

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

USE_TZ = True

# Errors (HTTP 500 tracebacks) to stderr even with DEBUG off.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
