"""`oncely demo`: a small payments API that shows the whole system (see docs/demo.md).

`oncely.demo.app.create_app` builds it (FastAPI, the `demo` extra);
`oncely.demo.repository` holds its accounts and transfers in SQLite or PostgreSQL.
This package imports nothing heavy by itself, so the CLI can load its helpers cheaply.
"""

DEFAULT_STORE_URL = "sqlite:///oncely-demo.db"
# Where accounts and transfers go when the store is not SQL (memory, Redis).
DEFAULT_DATA_FILE = "oncely-demo-data.db"
DEFAULT_TTL = 24 * 60 * 60
