"""Analysis of one or more traces as a table, JSON records or printable text."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from .accumulate import HIST_BINS, RoutingStats, accumulate_trace
from .alarms import CollapseThresholds, flag_collapse
from .compare import compare_checkpoints
from .read import DEFAULT_BATCH_ROWS
from .schema import check_by

#: Keys of every JSON object (``switch_rate``, ``overlap``, ``saturation`` only with 2+ traces).
JSON_KEYS = (
    "placement", "layer", "tokens", "load", "dead_experts", "load_cv", "max_load_ratio", "gini",
    "top1_entropy_norm", "router_entropy", "topk_weight_entropy", "margin",
)
COMPARE_KEYS = ("switch_rate", "overlap", "saturation")


def analyze_stats(
    paths: Sequence[str | os.PathLike], by: str | None = None, batch_rows: int = DEFAULT_BATCH_ROWS,
    hist_bins: int = HIST_BINS,
) -> list[RoutingStats]:
    """One :class:`RoutingStats` per trace (one streaming pass each)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [accumulate_trace(p, by=by, batch_rows=batch_rows, hist_bins=hist_bins) for p in paths]


def analyze(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    by: str | None = None,
    *,
    thresholds: CollapseThresholds | None = None,
    compare: bool | None = None,
    method: str = "auto",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    stats: list[RoutingStats] | None = None,
):
    """Metrics of every (trace, checkpoint, placement, layer[, by]) as a DataFrame.

    Columns: ``trace`` and the group key, every metric of
    :meth:`RoutingStats.group_metrics`, ``prob_rows`` (tokens with ``probs``), ``alarm``
    (collapse reasons) and, when ``compare`` (default: two or more traces), ``matched``,
    ``matched_final``, ``switch_rate``, ``overlap``, ``saturation`` from
    :func:`compare_checkpoints` (traces in checkpoint order).
    """
    import pandas as pd

    check_by(by)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    stats = stats if stats is not None else analyze_stats(paths, by=by, batch_rows=batch_rows)
    frames = [_with_prob_rows(s).assign(trace=p) for s, p in zip(stats, paths)]
    df = pd.concat(frames, ignore_index=True)
    df = df[["trace"] + [c for c in df.columns if c != "trace"]]
    df = flag_collapse(df, thresholds)
    if compare is None:
        compare = len(paths) >= 2
    if compare:
        comp = compare_checkpoints(paths, by=by, method=method, batch_rows=batch_rows)
        keys = ["trace", "placement", "layer"] + ([by] if by else [])
        df = df.merge(comp[keys + ["matched", "matched_final", *COMPARE_KEYS]], on=keys, how="left")
    return df


def _with_prob_rows(stats: RoutingStats):
    """``stats.table()`` with ``prob_rows``: the tokens with a router distribution (router_entropy's count)."""
    table = stats.table()
    count = dict(zip(stats.keys, stats.prob_rows.tolist()))
    keys = table[list(stats.key_names)].itertuples(index=False, name=None)
    return table.assign(prob_rows=[count[k] for k in keys])


def _plain(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def records(table) -> list[dict]:
    """JSON-safe dicts, one per row (NaN -> None, numpy scalars -> Python)."""
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


_TEXT_COLUMNS = (
    ("tokens", "{:d}"), ("dead_experts", "{:d}"), ("load_cv", "{:.3f}"), ("max_load_ratio", "{:.2f}"),
    ("gini", "{:.3f}"), ("top1_entropy_norm", "{:.3f}"), ("router_entropy", "{:.3f}"),
    ("topk_weight_entropy", "{:.3f}"), ("margin", "{:.3f}"), ("mi_task", "{:.3f}"), ("mi_token_kind", "{:.3f}"),
    ("switch_rate", "{:.3f}"), ("overlap", "{:.3f}"), ("saturation", "{:.3f}"),
)
_SHORT = {
    "dead_experts": "dead", "max_load_ratio": "max/ideal", "top1_entropy_norm": "top1_H/lnE", "router_entropy": "H_router",
    "topk_weight_entropy": "H_topk", "mi_task": "MI_task", "mi_token_kind": "MI_kind", "switch_rate": "switch",
}


def _format_number(fmt: str, value) -> str:
    """``fmt.format(value)``, without the sign of a value that rounds to zero (``0.000``, not ``-0.000``)."""
    text = fmt.format(value)
    if text.startswith("-") and not any(c in "123456789" for c in text):  # every digit 0: rounds to zero
        text = text[1:]
    return text


def format_table(table) -> str:
    """A fixed-width text table (one line per group; ``!`` marks a collapse alarm)."""
    key_cols = [c for c in ("checkpoint", "placement", "layer", "task", "token_kind") if c in table.columns]
    if table["trace"].nunique() > 1 and table["checkpoint"].nunique() < table["trace"].nunique():
        key_cols = ["trace"] + key_cols
    metric_cols = [(c, f) for c, f in _TEXT_COLUMNS if c in table.columns]
    header = key_cols + [_SHORT.get(c, c) for c, _ in metric_cols] + ["alarm"]
    rows = []
    for rec in table.to_dict(orient="records"):
        cells = [str(rec[c]) for c in key_cols]
        for c, fmt in metric_cols:
            v = rec[c]
            cells.append("-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else _format_number(fmt, v))
        cells.append("! " + "; ".join(rec["alarm"]) if rec.get("alarm") else "")
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i >= len(key_cols) and i < len(header) - 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)
