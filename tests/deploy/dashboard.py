"""The PromQL of a Grafana dashboard, for tests that check or run the dashboard's queries."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_targets(path: Path | str) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query target of the dashboard at `path`."""
    dashboard = json.loads(Path(path).read_text())
    return [(panel.get("title", ""), target) for panel in _panels(dashboard.get("panels", [])) for target in panel.get("targets", [])]


def dashboard_queries(path: Path | str) -> list[str]:
    """The PromQL `expr` of every target of every panel, in panel order."""
    return [target.get("expr", "") for _, target in dashboard_targets(path)]
