"""Sample a server with py-spy during fresh-key load and say where its CPU goes.

py-spy writes collapsed stacks (`frame;frame;... count`). Each sample is charged to the
package of its innermost non-stdlib frame (stdlib work is charged to whoever called it),
and the oncely functions are ranked by the samples charged to them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
RENAMED = {
    "benchmarks": "app",
    "idempotency_header_middleware": "asgi-idempotency-header",
    "redis": "redis-py",
}


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(__file__).resolve().parents[1] / ".venv-bench" / "bin" / "py-spy"
    return str(candidate) if candidate.exists() else None


def start(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes] | None:
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
         "--rate", str(rate), "--format", "raw", "--output", str(out), "--threads",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _package(file: str) -> str | None:
    """py-spy names files relative to their sys.path entry: the first part is the package."""
    if file.startswith("<"):
        return None  # <frozen ...>, <string>
    if "site-packages/" in file:
        file = file.rsplit("site-packages/", 1)[1]
    top = file.split("/", 1)[0].removesuffix(".py")
    if top in sys.stdlib_module_names:
        return None  # the stdlib is charged to its caller
    return RENAMED.get(top, top)


def summarise(path: Path, top: int = 12) -> dict[str, Any]:
    if not path.exists():
        return {"error": "no profile written"}
    packages: Counter[str] = Counter()
    oncely_functions: Counter[str] = Counter()
    oncely_inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        owner = "stdlib/native"
        owner_frame = frames[-1]
        seen: set[str] = set()
        for frame in frames:
            match = _FRAME.match(frame)
            if match is None:
                continue
            package = _package(match["file"])
            if package is not None:
                owner, owner_frame = package, frame
            if package == "oncely":
                name = f"{match['func']} ({match['file'].split('oncely/', 1)[-1]})"
                if name not in seen:
                    oncely_inclusive[name] += count
                    seen.add(name)
        packages[owner] += count
        leaves[frames[-1]] += count
        if owner == "oncely":
            match = _FRAME.match(owner_frame)
            if match is not None:
                oncely_functions[f"{match['func']} ({match['file'].split('oncely/', 1)[-1]})"] += (
                    count
                )

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / total) for name, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "by_package": share(packages),
        "oncely_self": share(oncely_functions),
        "oncely_inclusive": share(oncely_inclusive),
        "leaf_frames": share(leaves),
    }
