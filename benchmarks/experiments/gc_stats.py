"""`benchmarks.run --patch` file: time every garbage collection in the `+patched` servers.

    .venv-bench/bin/python -m benchmarks.run --patch benchmarks/experiments/gc_stats.py \\
        --variants fastapi/bare,fastapi/oncely-memory,fastapi/oncely-redis \\
        --scenarios fresh --scale 0 --no-wsgi --profile 0 --rounds 3

Each `+patched` server writes `gc-stats-<pid>.json` to the system's temporary folder
every 50 collections: collections and seconds per generation, and the variant. Add
`--gc tuned` to see what `benchmarks.apps.asgi.tune_gc` leaves of them.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

_stats: dict[str, Any] = {
    "variant": f"{os.environ.get('BENCH_LIBRARY')}-{os.environ.get('BENCH_STORE')}",
    "collections": [0, 0, 0],
    "seconds": [0.0, 0.0, 0.0],
}
_started = [0.0]
_out = Path(tempfile.gettempdir()) / f"gc-stats-{os.getpid()}.json"


def _timed(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    generation = info["generation"]
    _stats["collections"][generation] += 1
    _stats["seconds"][generation] += time.perf_counter() - _started[0]
    if sum(_stats["collections"]) % 50 == 0:
        _out.write_text(json.dumps(_stats))


gc.callbacks.append(_timed)
