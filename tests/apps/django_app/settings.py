"""Settings: no database, no contrib apps; oncely configured from the environment."""

from __future__ import annotations

import json
import os

SECRET_KEY = "oncely-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.apps.django_app.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
MIDDLEWARE = [
    # Authentication first: oncely's scope defaults to the authenticated user.
    "tests.apps.django_app.urls.HeaderUserMiddleware",
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
