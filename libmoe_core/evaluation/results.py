"""Find and read lmms-eval's aggregated results file; turn it into (task, metric, value, stderr) rows.

lmms-eval 0.7.3 writes ``<output_path>/<sanitized model name>/<date>_results.json``; its
``results`` maps each task (and group) to keys ``"<metric>,<filter>"`` plus
``"<metric>_stderr,<filter>"`` (and ``_stderr_clt`` / ``_stderr_clustered`` variants),
with ``"N/A"`` where no stderr is computed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MetricRow", "find_results_file", "format_table", "load_results", "results_rows"]


@dataclass(frozen=True)
class MetricRow:
    """One metric of one task: ``value`` (float, or text for non-numeric metrics) and ``stderr``."""

    task: str
    metric: str
    value: float | str
    stderr: float | None


def find_results_file(output_path: str | os.PathLike, newer_than: float | None = None) -> Path | None:
    """The newest ``*_results.json`` under ``output_path`` (modified at or after ``newer_than``)."""
    root = Path(output_path)
    if not root.is_dir():
        return None
    found = []
    for path in root.rglob("*_results.json"):
        mtime = path.stat().st_mtime
        if newer_than is None or mtime >= newer_than:
            found.append((mtime, path))
    return max(found)[1] if found else None


def load_results(path: str | os.PathLike) -> dict:
    """Read a results JSON; error names the file if it is not one lmms-eval wrote."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not an lmms-eval results file (no 'results' mapping)")  # noqa: TRY004
    return data


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


#: Sums lmms-eval does not report, as the LibMoE tables do: MME is perception + cognition (max 2800).
DERIVED_TOTALS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mme": ("mme_total_score (perception + cognition)", ("mme_perception_score", "mme_cognition_score")),
}


def results_rows(data: dict) -> list[MetricRow]:
    """One row per (task, metric, filter) in ``data["results"]``, tasks in file order.

    The metric is named ``metric`` for the default ``none`` filter and ``metric (filter)``
    otherwise; the stderr is the ``<metric>_stderr`` entry (None when "N/A" or absent).
    Dict/list values (submission payloads) are skipped. A task in :data:`DERIVED_TOTALS` with
    every part gets its total as one more row.
    """
    rows = []
    for task, metrics in data["results"].items():
        if not isinstance(metrics, dict):
            continue
        rows.extend(_metric_rows(task, metrics))
        if task in DERIVED_TOTALS:
            label, parts = DERIVED_TOTALS[task]
            values = [_number(metrics.get(f"{part},none")) for part in parts]
            if all(v is not None for v in values):
                rows.append(MetricRow(task, label, sum(values), None))
    return rows


def _metric_rows(task: str, metrics: dict) -> list[MetricRow]:
    rows = []
    for key, value in metrics.items():
        if "," not in key:
            continue  # "alias", "samples", ...
        name, filt = key.split(",", 1)
        if "_stderr" in name or isinstance(value, (dict, list)):
            continue
        number = _number(value)
        stderr = _number(metrics.get(f"{name}_stderr,{filt}"))
        label = name if filt == "none" else f"{name} ({filt})"
        rows.append(MetricRow(task, label, number if number is not None else str(value), stderr))
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(rows: list[MetricRow]) -> str:
    """A plain-text table with the columns task, metric, value, stderr."""
    header = ("task", "metric", "value", "stderr")
    cells = [header] + [(r.task, r.metric, _fmt(r.value), _fmt(r.stderr)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(4)]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
