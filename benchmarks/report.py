"""results.json -> results.md (tables, targets, misses) and chart.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# (family, scenario) -> the ratio to the bare app oncely must reach (issue 8).
TARGETS = {
    ("memory", "fresh"): 0.85,
    ("sqlite", "fresh"): 0.70,
    ("redis", "fresh"): 0.60,
    ("postgres", "fresh"): 0.50,
    ("memory", "replay"): 2.5,
    ("sqlite", "replay"): 2.5,
    ("redis", "replay"): 1.0,
    ("postgres", "replay"): 0.8,
}
PEER_MARGIN = 1.3  # oncely at least 1.3x the best peer on each store
NAMES = {"aih": "asgi-idempotency-header", "idemkit": "idemkit", "oncely": "oncely"}


def _f(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(entry: dict[str, Any]) -> str:
    if entry.get("library") == "bare":
        return "1.00"
    low, high = entry.get("ratio_min"), entry.get("ratio_max")
    spread = f" ({low:.2f}-{high:.2f})" if low is not None and high is not None else ""
    return f"**{entry['ratio']:.2f}**{spread}" if entry.get("ratio") is not None else "—"


def _statuses(entry: dict[str, Any]) -> str:
    statuses = entry.get("statuses") or {}
    return " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))


def scenario_table(title: str, rows: dict[str, Any], scenario: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| variant | req/s | ratio to bare (min-max) | p50 ms | p99 ms | server CPU µs/req "
        "| store CPU µs/req | driver CPU µs/req | statuses |"
        + (" replayed |" if scenario == "replay" else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        + (" ---: |" if scenario == "replay" else ""),
    ]
    for label, e in rows.items():
        line = (
            f"| {label} | {_f(e['rps'])} | {_ratio(e)} | {_f(e['p50_ms'], 2)} "
            f"| {_f(e['p99_ms'], 2)} | {_f(e['server_cpu_us'])} | {_f(e.get('store_cpu_us'))} "
            f"| {_f(e['driver_cpu_us'])} | {_statuses(e)} |"
        )
        if scenario == "replay":
            line += f" {_f(100 * (e.get('replayed_share') or 0), 0)} % |"
        lines.append(line)
    return [*lines, ""]


def targets(main: dict[str, Any]) -> tuple[list[str], list[str]]:
    lines = [
        "| store | scenario | oncely (fastapi) | target | best peer "
        "| oncely / best peer | verdict |",
        "| --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    misses = []
    for (family, scenario), target in TARGETS.items():
        rows = main.get(scenario, {})
        ours = [
            e for e in rows.values()
            if e["library"] == "oncely" and e["family"] == family and e["framework"] == "fastapi"
            and e["store"] != "sqlite-normal"
        ]  # fmt: skip
        if not ours or ours[0].get("ratio") is None:
            continue
        ratio = ours[0]["ratio"]
        peers = [
            e for e in rows.values()
            if e["library"] in ("aih", "idemkit") and e["family"] == family
            and e["framework"] == "fastapi" and e.get("ratio") is not None
        ]  # fmt: skip
        best = max(peers, key=lambda e: e["rps"] or 0, default=None)
        vs_peer = ours[0]["rps"] / best["rps"] if best and best["rps"] else None
        ok = ratio >= target and (vs_peer is None or vs_peer >= PEER_MARGIN)
        peer_text = f"{NAMES[best['library']]} {best['ratio']:.2f}" if best else "none"
        verdict = "met" if ok else "**missed**"
        lines.append(
            f"| {family} | {scenario} | {ratio:.2f} | ≥ {target} | {peer_text} "
            f"| {_f(vs_peer, 2)} | {verdict} |"
        )
        if not ok:
            why = []
            if ratio < target:
                why.append(f"ratio {ratio:.2f} < {target}")
            if vs_peer is not None and vs_peer < PEER_MARGIN:
                why.append(f"{vs_peer:.2f}x the best peer < {PEER_MARGIN}x")
            misses.append(f"{family} {scenario}: " + "; ".join(why))
    floors = [
        f"{scenario} {e['ratio']:.2f}"
        for scenario in ("fresh", "replay")
        for e in main.get(scenario, {}).values()
        if e["library"] == "floor" and e["framework"] == "fastapi" and e.get("ratio") is not None
    ]
    if floors:
        lines += [
            "",
            "The floor in the same run (`fastapi/floor-memory`: body read, JSON canonicalised "
            f"and hashed, response kept in a dict; nothing else that SPEC §2-§3 ask): "
            f"{', '.join(floors)}.",
        ]
    return [*lines, ""], misses


def write(out: Path, results: dict[str, Any]) -> None:
    md: list[str] = ["# oncely benchmark results", ""]
    m = results.get("machine", {})
    s = results.get("settings", {})
    md += [
        f"Date {m.get('date')}; {m.get('cores')} cores ({m.get('cpu')}), "
        f"{m.get('memory_gib')} GiB; "
        f"Python {m.get('python')}. Slices of {s.get('duration')} s, {s.get('rounds')} interleaved "
        f"rounds, {s.get('connections')} connections, {s.get('keys', 'counter')} keys, "
        f"garbage collector {s.get('gc', 'default')}; "
        f"wall time {s.get('wall_seconds')} s.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
        "",
    ]
    main = results.get("main", {})
    if main.get("fresh"):
        table, misses = targets(main)
        md += ["## Targets", "", *table]
        if misses:
            md += ["Missed:", "", *[f"- {x}" for x in misses], ""]
        md += scenario_table(
            "Fresh keys (every request a new Idempotency-Key)", main["fresh"], "fresh"
        )
    if main.get("replay"):
        md += scenario_table("Replays (a pool of completed keys, cycled)", main["replay"], "replay")
    if main.get("round_trips"):
        md += [
            "### Store round trips per request",
            "",
            "Redis: commands sent by the client (MONITOR; commands run inside a script are "
            "not round trips). PostgreSQL: statements executed (pg_stat_statements).",
            "",
            "| variant | fresh | replay | fresh breakdown | replay breakdown |",
            "| --- | ---: | ---: | --- | --- |",
        ]
        for label, e in main["round_trips"].items():
            fresh, replay = e.get("fresh", {}), e.get("replay", {})
            md.append(
                f"| {label} | {_f(fresh.get('per_request'), 2)} "
                f"| {_f(replay.get('per_request'), 2)} "
                f"| {_breakdown(fresh)} | {_breakdown(replay)} |"
            )
        md.append("")
    if main.get("duplicates"):
        md += [
            "### 20 simultaneous duplicates per key",
            "",
            "| variant | rounds | executions per round | statuses (all rounds) | replayed "
            "| round p50 ms |",
            "| --- | ---: | ---: | --- | ---: | ---: |",
        ]
        for label, e in main["duplicates"].items():
            md.append(
                f"| {label} | {e['rounds']} | {_f(e['executions_per_round'], 2)} "
                f"| {_statuses(e)} | {_f(e.get('replayed'))} | {_f(e.get('round_p50_ms'), 1)} |"
            )
        md.append("")
    if main.get("rss_mb"):
        md += ["Server RSS after the main phase (MB): " + ", ".join(
            f"{k} {v:.0f}" for k, v in main["rss_mb"].items()), ""]  # fmt: skip
    if results.get("scale"):
        md += [
            "## Scale: fresh keys with live records already in the store",
            "",
            "| records | variant | workers | req/s | ratio to bare | p50 ms | p99 ms "
            "| server CPU µs/req | RSS MB start → end |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for size, rows in results["scale"].items():
            for e in rows.values():
                md.append(
                    f"| {int(size):,} | {e['variant']} | {e['workers']} | {_f(e['rps'])} "
                    f"| {_ratio(e)} | {_f(e['p50_ms'], 2)} | {_f(e['p99_ms'], 2)} "
                    f"| {_f(e['server_cpu_us'])} | {_f(e.get('rss_mb_start'))} → "
                    f"{_f(e.get('rss_mb_end'))} |"
                )
        md.append("")
    if results.get("wsgi", {}).get("fresh"):
        md += scenario_table(
            "WSGI: Flask under gunicorn (1 sync worker, 1 connection), fresh keys",
            results["wsgi"]["fresh"],
            "fresh",
        )
    if main.get("profiles"):
        md += ["## Profiles (py-spy, fresh keys)", ""]
        for label, p in main["profiles"].items():
            md += [f"**{label}** — {p.get('samples', 0)} samples, `{p.get('file')}`", ""]
            if p.get("error"):
                md += [f"error: {p['error']}", ""]
                continue
            md.append("CPU by package: " + ", ".join(f"{n} {v:.0f} %" for n, v in p["by_package"]))
            md.append("")
            md.append("oncely functions (self, stdlib calls included): " + ", ".join(
                f"`{n}` {v:.1f} %" for n, v in p["oncely_self"][:8]))  # fmt: skip
            md.append("")
    if results.get("notes"):
        md += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    (out / "results.md").write_text("\n".join(md))
    chart(out, results)


def _breakdown(entry: dict[str, Any]) -> str:
    return ", ".join(f"`{k}` {v:g}" for k, v in (entry.get("breakdown") or {}).items())


def chart(out: Path, results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    main = results.get("main", {})
    panels = [(k, main[k]) for k in ("fresh", "replay") if main.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
    colors = {"bare": "#999999", "oncely": "#1f77b4", "aih": "#ff7f0e", "idemkit": "#2ca02c",
              "floor": "#bbbbbb"}  # fmt: skip
    for ax, (scenario, rows) in zip(axes[:, 0], panels, strict=True):
        labels = list(rows)
        values = [rows[k]["ratio"] or 0 for k in labels]
        low = [rows[k].get("ratio_min") for k in labels]
        high = [rows[k].get("ratio_max") for k in labels]
        spread = [
            [v - lo if lo is not None else 0.0 for v, lo in zip(values, low, strict=True)],
            [hi - v if hi is not None else 0.0 for v, hi in zip(values, high, strict=True)],
        ]
        bars = ax.bar(
            range(len(labels)),
            values,
            yerr=[[max(0.0, x) for x in spread[0]], [max(0.0, x) for x in spread[1]]],
            capsize=2,
            ecolor="#666666",
            color=[colors.get(rows[k]["library"], "#555") for k in labels],
        )
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
        ax.axhline(1.0, color="#444", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("throughput / bare app")
        ax.set_title(
            f"{scenario}: req/s as a ratio to the bare app (median over rounds; bars: min-max)"
        )
    fig.tight_layout()
    fig.savefig(out / "chart.png", dpi=110)
    plt.close(fig)
