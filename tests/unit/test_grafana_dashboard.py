"""docs/grafana-dashboard.json: well-formed, and every query uses only the metrics and
labels that PrometheusSubscriber defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from oncely.core.events import EventKind, IdempotencyEvent
from oncely.instrumentation.prometheus import PrometheusSubscriber

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# PromQL words that look like metric names but are not.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def defined_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, read from a fresh registry after one event of each
    kind (labelled metrics have no samples before their first child)."""
    registry = CollectorRegistry()
    subscriber = PrometheusSubscriber(registry)
    common: dict[str, Any] = {"method": "POST", "route": "/t/{id}", "store": "memory"}
    for kind in EventKind:
        subscriber(
            IdempotencyEvent(kind, status=201, duration=0.001, handler_duration=0.01, **common)
        )
    return {
        sample.name: set(sample.labels)
        for family in registry.collect()
        for sample in family.samples
    }


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names, strings, durations or Grafana variables."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations
    text = GROUPING.sub(" ", text)  # by (...) / without (...)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # $__rate_interval, ${var}
    text = re.sub(r"\b\d+(?:\.\d+)?(?:ms|[smhdwy])?\b", " ", text)  # numbers, durations
    names = set()
    for match in IDENTIFIER.finditer(text):
        name = match.group()
        if text[match.end() :].lstrip().startswith("(") or name.lower() in KEYWORDS:
            continue  # a function or a keyword
        names.add(name)
    return names


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def expressions() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in load()["panels"]
        for target in panel.get("targets", [])
    ]


def test_parser_finds_names_and_skips_the_rest() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{x="y{z}",w=~"$v"}'
        "[$__rate_interval]))) / ignoring(q) b_total offset 5m and on() c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_is_importable() -> None:
    dashboard = load()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "oncely-idempotency"
    assert dashboard["title"]
    (datasource_input,) = dashboard["__inputs"]
    assert datasource_input["name"] == "DS_PROMETHEUS"
    assert datasource_input["pluginId"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"], panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].count("(") == target["expr"].count(")")


@pytest.mark.parametrize(("title", "expr"), expressions())
def test_every_query_uses_defined_metrics_and_labels(title: str, expr: str) -> None:
    defined = defined_metrics()
    used = metric_names(expr)
    assert used, title
    assert used <= set(defined), f"{title}: unknown metrics {used - set(defined)}"
    for name, matchers in SELECTOR.findall(STRING.sub('""', expr)):
        labels = set(MATCHER_LABEL.findall(matchers))
        assert labels <= defined[name], f"{title}: {name} has no labels {labels - defined[name]}"
    grouped = {
        label.strip()
        for clause in GROUPING.findall(expr)
        for label in clause.split(",")
        if label.strip()
    }
    available = set().union(*(defined[name] for name in used))
    assert grouped <= available, f"{title}: grouping by unknown labels {grouped - available}"


def test_the_panels_the_issue_asks_for_and_every_metric_is_shown() -> None:
    exprs = " ".join(expr for _, expr in expressions())
    for needle in (
        'outcome="replayed"',
        'outcome="in-progress"',
        'outcome="mismatch"',
        'outcome="store-error"',
        "oncely_store_operation_seconds_bucket",
        "oncely_in_flight",
        "oncely_handler_seconds_bucket",
        "oncely_client_retries_total",
    ):
        assert needle in exprs
    families = {
        re.sub(r"_(total|bucket|count|sum|created)$", "", name) for name in defined_metrics()
    }
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in metric_names(exprs)}
    assert families == shown
