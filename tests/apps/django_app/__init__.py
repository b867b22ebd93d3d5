"""A minimal Django project behind oncely's Django middleware, for tests.

DJANGO_SETTINGS_MODULE=tests.apps.django_app.settings; the WSGI application is
`tests.apps.django_app.wsgi:application`. Configured by the environment variables of
tests/apps/flask_app.py, and for `POST /transfers` (transactional completion) by those
of settings.py (the database) and urls.py (the test hooks).
"""
