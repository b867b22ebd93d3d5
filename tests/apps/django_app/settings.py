"""Settings: no contrib apps; oncely configured from the environment.

No database unless one is asked for (for the transactional-completion view):
`ONCELY_DJANGO_DB` is a SQLite file; `ONCELY_DJANGO_PG_SCHEMA` a schema on the PostgreSQL
server of `ONCELY_TEST_POSTGRES_URL`, made the connection's search path.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import unquote, urlsplit

SECRET_KEY = "oncely-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.apps.django_app.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, Any]] = {}
if os.environ.get("ONCELY_DJANGO_DB"):
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["ONCELY_DJANGO_DB"],
        # IMMEDIATE: atomic() takes the write lock first, as oncely's claims do, so a
        # transaction never fails to upgrade its read lock while another one writes.
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 10},
    }
elif os.environ.get("ONCELY_DJANGO_PG_SCHEMA"):
    _pg = urlsplit(
        os.environ.get("ONCELY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
    )
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(_pg.path.lstrip("/")),
        "USER": unquote(_pg.username or ""),
        "PASSWORD": unquote(_pg.password or ""),
        "HOST": _pg.hostname or "",
        "PORT": str(_pg.port or ""),
        "OPTIONS": {"options": f"-c search_path={os.environ['ONCELY_DJANGO_PG_SCHEMA']}"},
    }
USE_TZ = True
MIDDLEWARE = [
    # Authentication first: oncely's scope defaults to the authenticated user.
    "tests.apps.django_app.urls.HeaderUserMiddleware",
    # Last (innermost): views complete their record in their own transaction.
    "oncely.integrations.django.IdempotencyMiddleware",
]
ONCELY = {
    "STORE": os.environ.get("ONCELY_STORE_URL", "memory://"),
    "STORE_OPTIONS": json.loads(os.environ.get("ONCELY_STORE_OPTIONS", "{}")),
    "POLICY": json.loads(os.environ.get("ONCELY_POLICY", "{}")),
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"oncely": {"handlers": ["console"], "level": "WARNING"}},
}
