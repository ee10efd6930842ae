"""Seaborn figures for the analysis notebooks. Each function returns a matplotlib Figure.

Figures are built with :mod:`matplotlib.figure` objects through ``plt.subplots`` so
notebooks show them inline; :func:`save_figure` writes a PNG (headless runs).
"""

from __future__ import annotations

import os

import numpy as np

from . import metrics as M
from .accumulate import RoutingStats


def _plt():
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, out_dir: str | os.PathLike, name: str, dpi: int = 110) -> str:
    """Save ``fig`` as ``out_dir/name.png`` (directory created) and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


#: The metrics that are averages over a group's tokens, with the column counting those tokens: a
#: layer's value is the count-weighted mean of its groups' values. Other metrics (load shares,
#: top-1 entropy, mutual information...) are computed from a layer's pooled counts and cannot be
#: recovered from per-task or per-token-kind rows.
POOLED_WEIGHTS = {
    "topk_weight_entropy": "tokens", "margin": "tokens", "router_entropy": "prob_rows",
    "router_entropy_norm": "prob_rows", "switch_rate": "matched", "overlap": "matched",
    "saturation": "matched_final",
}


def _checkpoint_style(table, used) -> str | None:
    """``"checkpoint"`` when the table holds several checkpoints (one trace can) and no other plot
    key separates them: a line per checkpoint, not one pooled over them."""
    several = "checkpoint" in table.columns and table["checkpoint"].nunique() > 1
    return "checkpoint" if several and "checkpoint" not in used else None


def layer_values(table, keys: list[str], metrics: list[str]):
    """One row per ``keys`` with each metric of its rows pooled as the layer's value.

    A table grouped by task or token kind has several rows per layer; each metric of
    :data:`POOLED_WEIGHTS` is then the mean of the rows' values weighted by their token count (NaN
    where no row counts a token or a counted row's value is NaN); any other metric is an error
    (plot a table analysed with by=None).
    """
    import pandas as pd

    if not table.duplicated(keys).any():
        return table
    groups = [table[k] for k in keys]
    parts = {}
    for m in metrics:
        weight = POOLED_WEIGHTS.get(m)
        if weight is None or weight not in table.columns:
            need = f"its '{weight}' column" if weight else "the layer's pooled counts"
            raise ValueError(f"{m} of a layer cannot be computed from the table's several rows per "
                             f"({', '.join(keys)}) (grouped by task or token kind): it needs {need}; "
                             "plot a table analysed with by=None")
        w = table[weight].astype(float)
        counted = w > 0  # a row without tokens has a NaN value that does not count
        total = w.groupby(groups).sum()
        pooled = (table[m].where(counted, 0.0) * w).groupby(groups).sum() / total.where(total > 0)
        undefined = (counted & table[m].isna()).groupby(groups).any()  # e.g. no switch rate for the first trace
        parts[m] = pooled.where(~undefined)
    return pd.DataFrame(parts).reset_index()


def entropy_curves(table, metrics=("router_entropy_norm", "top1_entropy_norm", "topk_weight_entropy", "margin"),
                   hue: str = "placement", style: str | None = None):
    """Per-layer curves of entropy-type metrics, one panel per metric, one line per ``hue``."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    style = _checkpoint_style(table, (hue, style)) or style
    table = layer_values(table, [k for k in ("layer", hue, style) if k], list(metrics))
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(data=table, x="layer", y=metric, hue=hue, style=style, marker="o", ax=ax, errorbar=None)
        ax.set_title(metric)
        ax.set_ylabel("")
        _integer_x(ax)
        if ax is not axes[0][-1] and ax.get_legend():
            ax.get_legend().remove()
    fig.tight_layout()
    return fig


def entropy_distribution(stats: RoutingStats, placement: str, **filters):
    """Heatmap layers x normalised-entropy bins: share of tokens per bin (router entropy / ln E)."""
    plt, sns = _plt()
    hist = stats.entropy_histogram(placement=placement, **filters)
    pooled = hist.groupby(["layer", "bin_lo"])[["count", "rows"]].sum()  # groups (tasks...) pooled by tokens
    table = (pooled["count"] / pooled["rows"].clip(lower=1)).unstack("bin_lo")
    table.columns = [f"{c:.2f}" for c in table.columns]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(table) + 1.6))
    sns.heatmap(table, cmap="viridis", ax=ax, cbar_kws={"label": "share of tokens"})
    ax.set_xlabel("router entropy / ln E (bin start)")
    ax.set_title(f"{placement}: distribution of per-token router entropy")
    fig.tight_layout()
    return fig


def load_heatmap(stats: RoutingStats, placement: str, **filters):
    """Heatmap layers x experts of the load share (ideal 1/E), annotated when small."""
    plt, sns = _plt()
    table = stats.load_matrix(placement, **filters)
    e = table.shape[1]
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * e + 2), 0.45 * len(table) + 1.6))
    sns.heatmap(table, cmap="rocket_r", vmin=0, annot=e <= 16, fmt=".2f", ax=ax, cbar_kws={"label": "load share"})
    ax.set_title(f"{placement}: expert load (ideal {1 / e:.3f})")
    fig.tight_layout()
    return fig


def max_load_bars(table, thresholds=None):
    """Max-load ratio per (placement, layer); a dashed mark at each layer's alarm threshold
    (``thresholds``: a :class:`CollapseThresholds` or one number); flagged bars red."""
    from .alarms import CollapseThresholds

    plt, _ = _plt()
    data = table.assign(group=table["placement"] + ":" + table["layer"].astype(str))
    flagged = data["alarm"].map(bool) if "alarm" in data else np.zeros(len(data), bool)
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(data) + 2), 3.4))
    colors = ["tab:red" if f else "tab:blue" for f in flagged]
    ax.bar(range(len(data)), data["max_load_ratio"], color=colors)
    ax.set_xticks(range(len(data)), data["group"], rotation=60, ha="right")
    ax.axhline(1.0, color="grey", lw=1)
    if thresholds is not None:
        th = thresholds if isinstance(thresholds, CollapseThresholds) else CollapseThresholds(thresholds)
        limits = [th.max_load_threshold(e, k) for e, k in zip(data["num_experts"], data["top_k"])]
        marks = [(x, y) for x, y in enumerate(limits) if y is not None]
        if marks:
            xs, ys = zip(*marks)
            ax.hlines(ys, np.array(xs) - 0.45, np.array(xs) + 0.45, color="tab:red", ls="--", lw=1.2,
                      label="alarm at" + (f" {ys[0]:g}" if len(set(ys)) == 1 else " (per layer)"))
            ax.legend()
    ax.set_ylabel("max load / ideal")
    ax.set_title("expert collapse: max-load ratio per layer (red: flagged)")
    fig.tight_layout()
    return fig


def specialisation_heatmap(stats: RoutingStats, placement: str, layer: int, of: str = "task", lift: bool = True, **filters):
    """Heatmap tasks (or token kinds) x experts: P(expert | task) / P(expert) (``lift``) or P(expert | task)."""
    plt, sns = _plt()
    joint = stats.joint(placement, layer, of=of, **filters)
    cond = joint.div(joint.sum(axis=1), axis=0)
    marginal = joint.sum(axis=0) / max(joint.to_numpy().sum(), 1)
    data = cond.div(marginal.replace(0, np.nan), axis=1) if lift else cond
    fig, ax = plt.subplots(figsize=(max(4, 0.55 * data.shape[1] + 2), 0.5 * len(data) + 1.6))
    kw = {"center": 1.0, "cmap": "vlag"} if lift else {"cmap": "mako_r", "vmin": 0}
    sns.heatmap(data, annot=data.shape[1] <= 16, fmt=".2f", ax=ax, **kw)
    mi = M.mutual_information(joint.to_numpy())
    ax.set_title(f"{placement} layer {layer}: {'lift' if lift else 'P(expert | ' + of + ')'}  (MI {mi:.3f} nats)")
    fig.tight_layout()
    return fig


def _checkpoint_panel(ax, part, order, metric: str, hue: str, title: str) -> None:
    """One line plot of ``metric`` over checkpoints (x in ``order``), one line per ``hue`` value."""
    _, sns = _plt()
    part = part.assign(step=part["checkpoint"].map({c: i for i, c in enumerate(order)}))
    part = layer_values(part, ["step", hue], [metric])
    sns.lineplot(data=part, x="step", y=metric, hue=hue, marker="o", ax=ax, errorbar=None, palette="crest")
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_xlabel("checkpoint")
    ax.set_title(title)


def switch_rate_curves(comparison, hue: str = "layer"):
    """Switch rate (vs previous) and saturation (vs final) over checkpoints, one panel pair per placement."""
    plt, _ = _plt()
    places = list(dict.fromkeys(comparison["placement"]))
    order = list(dict.fromkeys(comparison["checkpoint"]))
    fig, axes = plt.subplots(len(places), 2, figsize=(10, 3.2 * len(places)), squeeze=False)
    for row, place in zip(axes, places):
        part = comparison[comparison["placement"] == place]
        for ax, metric in zip(row, ("switch_rate", "saturation")):
            _checkpoint_panel(ax, part, order, metric, hue, f"{place}: {metric}")
    fig.tight_layout()
    return fig


def router_comparison(tables: dict, metric: str = "router_entropy_norm"):
    """Side-by-side panels (one per router / trace name in ``tables``) of ``metric`` per layer and placement."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.4), sharey=True, squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        style = _checkpoint_style(table, ("placement",))
        table = layer_values(table, [k for k in ("layer", "placement", style) if k], [metric])
        sns.lineplot(data=table, x="layer", y=metric, hue="placement", style=style, marker="o", ax=ax, errorbar=None)
        ax.set_title(str(name))
        _integer_x(ax)
    fig.suptitle(metric)
    fig.tight_layout()
    return fig


def metric_over_checkpoints(table, metric: str = "router_entropy_norm", hue: str = "layer"):
    """``metric`` per checkpoint (x, in the table's order), one panel per placement, one line per layer."""
    plt, _ = _plt()
    places = list(dict.fromkeys(table["placement"]))
    order = list(dict.fromkeys(table["checkpoint"]))
    fig, axes = plt.subplots(1, len(places), figsize=(4.5 * len(places), 3.4), sharey=True, squeeze=False)
    for ax, place in zip(axes[0], places):
        _checkpoint_panel(ax, table[table["placement"] == place], order, metric, hue, f"{place}: {metric}")
    fig.tight_layout()
    return fig
