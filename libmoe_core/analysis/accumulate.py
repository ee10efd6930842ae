"""One streaming pass over a trace: per-group accumulators updated with bincount.

A group is (checkpoint, placement, layer[, task | token_kind]). Every update is a
handful of vectorised numpy operations over the batch; memory is bounded by the
batch size plus groups x experts x (tasks + token kinds) counters.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import metrics as M
from .groups import GroupIndex, StringIds
from .read import DEFAULT_BATCH_ROWS, TraceError, ints, iter_batches, list_matrix, list_widths
from .schema import METRIC_COLUMNS, check_by

HIST_BINS = 20


def _grow(a: np.ndarray, shape: tuple[int, ...], fill=0) -> np.ndarray:
    """``a`` zero-padded (or ``fill``-padded) up to ``shape`` (never shrinks)."""
    if a.shape == shape:
        return a
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


class RoutingAccumulator:
    """Accumulates the routing metrics of record batches; :meth:`result` gives :class:`RoutingStats`."""

    def __init__(self, by: str | None = None, hist_bins: int = HIST_BINS, source: str = ""):
        self.by = check_by(by)
        self.source = source
        self.groups = GroupIndex(by)
        self.tasks = StringIds()
        self.kinds = StringIds()
        self.hist_bins = hist_bins
        g, e, b = 0, 1, hist_bins
        self.rows = np.zeros(g, np.int64)
        self.prob_rows = np.zeros(g, np.int64)  # rows with a recorded router distribution
        self.other_slots = np.zeros(g, np.int64)  # chosen ids outside [0, num_experts)
        self.top1 = np.zeros((g, e), np.int64)
        self.joint_task = np.zeros((g, 0, e), np.int64)  # slots per (group, task, expert)
        self.joint_kind = np.zeros((g, 0, e), np.int64)  # slots per (group, token kind, expert)
        self.entropy_sum = np.zeros(g)
        self.entropy_hist = np.zeros((g, b), np.int64)
        self.topk_entropy_sum = np.zeros(g)
        self.margin_sum = np.zeros(g)
        self.num_experts = np.zeros(g, np.int64) - 1
        self.top_k = np.zeros(g, np.int64) - 1
        self.width = np.zeros(g, np.int64) - 1  # length of probs (router slots)

    # ------------------------------------------------------------------ updates

    def _resize(self, g: int, e: int) -> None:
        e = max(e, self.top1.shape[1])
        g = max(g, len(self.rows))
        t, k = len(self.tasks), len(self.kinds)
        self.rows = _grow(self.rows, (g,))
        self.prob_rows = _grow(self.prob_rows, (g,))
        self.other_slots = _grow(self.other_slots, (g,))
        self.top1 = _grow(self.top1, (g, e))
        self.joint_task = _grow(self.joint_task, (g, t, e))
        self.joint_kind = _grow(self.joint_kind, (g, k, e))
        self.entropy_sum = _grow(self.entropy_sum, (g,))
        self.entropy_hist = _grow(self.entropy_hist, (g, self.hist_bins))
        self.topk_entropy_sum = _grow(self.topk_entropy_sum, (g,))
        self.margin_sum = _grow(self.margin_sum, (g,))
        self.num_experts = _grow(self.num_experts, (g,), -1)
        self.top_k = _grow(self.top_k, (g,), -1)
        self.width = _grow(self.width, (g,), -1)

    def update(self, batch: pa.RecordBatch) -> None:
        """Add one record batch (columns: :data:`~.schema.METRIC_COLUMNS`).

        ``probs`` may be null (not recorded): those rows count for the load metrics
        but not for the router entropy.
        """
        if batch.num_rows == 0:
            return
        gid = self.groups.encode(batch)
        task = self.tasks.encode(batch.column("task"), "task")
        kind = self.kinds.encode(batch.column("token_kind"), "token_kind")
        n_exp = ints(batch.column("num_experts"), "num_experts").astype(np.int64, copy=False)
        experts, weights, probs = (batch.column(c) for c in ("experts", "weights", "probs"))
        ex, w = list_matrix(experts, "experts"), list_matrix(weights, "weights")
        if ex is None or w is None or ex.shape[1] != w.shape[1]:
            kw, ww = list_widths(experts), list_widths(weights)
            bad = np.flatnonzero(kw != ww)
            if len(bad):
                raise TraceError(f"{self.source}: a row has {int(kw[bad[0]])} experts but {int(ww[bad[0]])} weights")
            for idx in _split_by(kw):
                take = pa.array(idx)
                self._update_routing(gid[idx], task[idx], kind[idx], n_exp[idx],
                                     list_matrix(experts.take(take)), list_matrix(weights.take(take)))
        else:
            self._update_routing(gid, task, kind, n_exp, ex, w)
        if probs.null_count:
            keep = np.flatnonzero(probs.is_valid().to_numpy(zero_copy_only=False))
            if not len(keep):
                return
            gid, probs = gid[keep], probs.take(pa.array(keep))
        p = list_matrix(probs, "probs")
        if p is not None:
            self._update_probs(gid, p)
            return
        for idx in _split_by(list_widths(probs)):
            self._update_probs(gid[idx], list_matrix(probs.take(pa.array(idx))))

    def _check_shape(self, name: str, store: np.ndarray, present: np.ndarray, value: int) -> None:
        old = store[present]
        clash = (old >= 0) & (old != value)
        if clash.any():
            key = self.groups.keys[int(present[np.argmax(clash)])]
            raise TraceError(f"{self.source}: group {key} has {name} {int(old[np.argmax(clash)])} and {value}")
        store[present] = value

    def _update_routing(self, gid, task, kind, n_exp, experts, weights) -> None:
        """Load counters from rows of one top-k width."""
        k = experts.shape[1]
        e_lo, e_hi = int(n_exp.min()), int(n_exp.max())
        if e_lo < 1:
            raise TraceError(f"{self.source}: num_experts must be >= 1, got {e_lo}")
        self._resize(len(self.groups), e_hi)
        g, t, nk = len(self.rows), len(self.tasks), len(self.kinds)
        e = self.top1.shape[1]
        rows_b = np.bincount(gid, minlength=g)
        present = np.flatnonzero(rows_b)
        self._check_shape("top_k", self.top_k, present, k)
        for value in [e_lo] if e_lo == e_hi else [int(v) for v in np.unique(n_exp)]:
            groups_e = present if e_lo == e_hi else np.flatnonzero(np.bincount(gid[n_exp == value], minlength=g))
            self._check_shape("num_experts", self.num_experts, groups_e, value)
        self.rows += rows_b

        ex = experts.astype(np.int64, copy=False)
        if k and (int(ex.min()) < 0 or int(ex.max()) >= e_lo):
            valid = (ex >= 0) & (ex < n_exp[:, None])
            self.other_slots += np.bincount(gid, weights=(~valid).sum(axis=1), minlength=g).astype(np.int64)
        else:
            valid = None

        def slot_counts(label, size):
            idx = (gid * size + label)[:, None] * e + ex
            flat = idx.ravel() if valid is None else idx[valid]
            return np.bincount(flat, minlength=g * size * e).reshape(g, size, e)

        self.joint_task += slot_counts(task, t)
        self.joint_kind += slot_counts(kind, nk)
        if k:
            first = ex[:, 0]
            ok = slice(None) if valid is None else valid[:, 0]
            self.top1 += np.bincount((gid * e + first)[ok], minlength=g * e).reshape(g, e)
            self.topk_entropy_sum += np.bincount(gid, weights=M.topk_weight_entropy(weights), minlength=g)
            self.margin_sum += np.bincount(gid, weights=M.margin(weights), minlength=g)

    def _update_probs(self, gid, probs) -> None:
        """Router-entropy counters from rows of one probs width."""
        self._resize(len(self.groups), 1)
        g = len(self.rows)
        width = probs.shape[1]
        rows_b = np.bincount(gid, minlength=g)
        self._check_shape("probs length", self.width, np.flatnonzero(rows_b), width)
        self.prob_rows += rows_b
        h = M.row_entropy(probs)
        self.entropy_sum += np.bincount(gid, weights=h, minlength=g)
        scale = self.hist_bins / math.log(width) if width > 1 else 0.0
        bins = np.minimum((h * scale).astype(np.int64), self.hist_bins - 1)
        np.maximum(bins, 0, out=bins)
        self.entropy_hist += np.bincount(gid * self.hist_bins + bins, minlength=g * self.hist_bins).reshape(g, -1)

    # ------------------------------------------------------------------ result

    def result(self) -> RoutingStats:
        self._resize(len(self.groups), 1)
        return RoutingStats(
            source=self.source,
            by=self.by,
            keys=list(self.groups.keys),
            key_names=self.groups.names,
            tasks=list(self.tasks.values),
            token_kinds=list(self.kinds.values),
            rows=self.rows,
            prob_rows=self.prob_rows,
            other_slots=self.other_slots,
            top1=self.top1,
            joint_task=self.joint_task,
            joint_kind=self.joint_kind,
            entropy_sum=self.entropy_sum,
            entropy_hist=self.entropy_hist,
            topk_entropy_sum=self.topk_entropy_sum,
            margin_sum=self.margin_sum,
            num_experts=self.num_experts,
            top_k=self.top_k,
            width=self.width,
        )


@dataclass
class RoutingStats:
    """Accumulated routing counts of one trace, one entry per group (see :attr:`keys`).

    :meth:`table` turns them into metrics; the other accessors give the matrices the
    notebooks plot. Filters (``placement``, ``layer``, ``checkpoint``, ...) select
    groups; counts of several selected groups are summed.
    """

    source: str
    by: str | None
    keys: list[tuple]
    key_names: tuple[str, ...]
    tasks: list[str]
    token_kinds: list[str]
    rows: np.ndarray
    prob_rows: np.ndarray
    other_slots: np.ndarray
    top1: np.ndarray
    joint_task: np.ndarray
    joint_kind: np.ndarray
    entropy_sum: np.ndarray
    entropy_hist: np.ndarray
    topk_entropy_sum: np.ndarray
    margin_sum: np.ndarray
    num_experts: np.ndarray
    top_k: np.ndarray
    width: np.ndarray
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ selection

    @property
    def counts(self) -> np.ndarray:
        """Routing slots per (group, expert) [G, E_max]."""
        return self.joint_task.sum(axis=1)

    @property
    def checkpoints(self) -> list[str]:
        return list(dict.fromkeys(k[0] for k in self.keys))

    @property
    def placements(self) -> list[str]:
        return list(dict.fromkeys(k[1] for k in self.keys))

    def layers(self, placement: str | None = None) -> list[int]:
        return sorted({k[2] for k in self.keys if placement is None or k[1] == placement})

    def select(self, **filters) -> np.ndarray:
        """Indices of the groups whose key matches every ``name=value`` filter (None: any)."""
        unknown = set(filters) - set(self.key_names)
        if unknown:
            raise ValueError(f"unknown filter(s) {sorted(unknown)}; valid: {', '.join(self.key_names)}")
        pos = {n: i for i, n in enumerate(self.key_names)}
        return np.array(
            [g for g, key in enumerate(self.keys) if all(v is None or key[pos[n]] == v for n, v in filters.items())],
            dtype=np.int64,
        )

    def _experts_of(self, idx: np.ndarray) -> int:
        e = {int(x) for x in self.num_experts[idx]}
        if len(e) != 1:
            raise ValueError(f"selected groups have different numbers of experts {sorted(e)}; narrow the selection")
        return e.pop()

    # ------------------------------------------------------------------ metrics

    def group_metrics(self, idx) -> dict:
        """Metrics of the union of groups ``idx`` (one index or an array)."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        e = self._experts_of(idx)
        rows = int(self.rows[idx].sum())
        counts = self.joint_task[idx].sum(axis=(0, 1))[:e]
        shares = M.load_shares(counts)
        widths = self.width[idx]
        prob_rows = int(self.prob_rows[idx].sum())

        def mean(sums):
            return float(sums[idx].sum() / rows) if rows else float("nan")

        router_entropy = float(self.entropy_sum[idx].sum() / prob_rows) if prob_rows else float("nan")
        jt = self.joint_task[idx].sum(axis=0)[:, :e]
        jk = self.joint_kind[idx].sum(axis=0)[:, :e]
        return {
            "num_experts": e,
            "top_k": int(self.top_k[idx].max()),
            "tokens": rows,
            "load": [float(x) for x in shares],
            "dead_experts": int((counts == 0).sum()),
            "load_cv": M.load_cv(counts),
            "max_load_ratio": M.max_load_ratio(counts),
            "gini": M.gini(counts),
            "top1_entropy_norm": M.normalised_entropy(self.top1[idx].sum(axis=0)[:e]),
            "router_entropy": router_entropy,
            "router_entropy_norm": router_entropy / math.log(int(widths.max())) if widths.max() > 1 else float("nan"),
            "topk_weight_entropy": mean(self.topk_entropy_sum),
            "margin": mean(self.margin_sum),
            "mi_task": M.mutual_information(jt),
            "mi_token_kind": M.mutual_information(jk),
            "nmi_task": M.normalised_mutual_information(jt),
            "nmi_token_kind": M.normalised_mutual_information(jk),
            "other_slots": int(self.other_slots[idx].sum()),
        }

    def table(self):
        """A pandas DataFrame: one row per group with its key columns and every metric."""
        import pandas as pd

        records = []
        for g, key in enumerate(self.keys):
            row = dict(zip(self.key_names, key))
            row.update(self.group_metrics(g))
            records.append(row)
        columns = list(self.key_names) + list(self.group_metrics(0)) if self.keys else list(self.key_names)
        df = pd.DataFrame.from_records(records, columns=columns)
        return _sorted(df, self.by)

    def load_matrix(self, placement: str, **filters):
        """Load shares as a DataFrame: rows = layers, columns = experts."""
        import pandas as pd

        layers = self.layers(placement)
        data = {}
        for layer in layers:
            idx = self.select(placement=placement, layer=layer, **filters)
            if len(idx):
                e = self._experts_of(idx)
                data[layer] = M.load_shares(self.joint_task[idx].sum(axis=(0, 1))[:e])
        df = pd.DataFrame.from_dict(data, orient="index")
        df.index.name, df.columns.name = "layer", "expert"
        return df

    def joint(self, placement: str, layer: int, of: str = "task", **filters):
        """Routing-slot counts as a DataFrame: rows = tasks (or token kinds), columns = experts."""
        import pandas as pd

        if of not in ("task", "token_kind"):
            raise ValueError(f"of must be 'task' or 'token_kind', got {of!r}")
        idx = self.select(placement=placement, layer=layer, **filters)
        if not len(idx):
            raise ValueError(f"no routing for placement={placement!r} layer={layer!r} {filters or ''}")
        e = self._experts_of(idx)
        table, names = (self.joint_task, self.tasks) if of == "task" else (self.joint_kind, self.token_kinds)
        counts = table[idx].sum(axis=0)[:, :e]
        df = pd.DataFrame(counts, index=pd.Index(names, name=of), columns=pd.Index(range(e), name="expert"))
        return df[df.sum(axis=1) > 0]

    def entropy_histogram(self, **filters):
        """Distribution of the per-token router entropy / ln(width): long DataFrame per group and bin."""
        import pandas as pd

        b = self.hist_bins
        records = []
        for g in self.select(**filters):
            total = max(int(self.prob_rows[g]), 1)
            key = dict(zip(self.key_names, self.keys[g]))
            for i in range(b):
                records.append({**key, "bin_lo": i / b, "bin_hi": (i + 1) / b, "share": self.entropy_hist[g, i] / total,
                                "count": int(self.entropy_hist[g, i]), "rows": int(self.prob_rows[g])})
        return pd.DataFrame.from_records(records)

    @property
    def hist_bins(self) -> int:
        return self.entropy_hist.shape[1]


def _split_by(values: np.ndarray):
    """Row-index arrays, one per distinct value of ``values``."""
    for v in np.unique(values):
        yield np.flatnonzero(values == v)


_PLACEMENT_RANK = {"vision": 0, "projector": 1, "llm": 2}


def _sorted(df, by: str | None = None):
    """Rows ordered by checkpoint (first seen), placement (vision, projector, llm), layer[, by]."""
    if df.empty:
        return df
    order = {c: i for i, c in enumerate(dict.fromkeys(df["checkpoint"]))}
    tmp = df.assign(_c=df["checkpoint"].map(order), _p=df["placement"].map(lambda p: _PLACEMENT_RANK.get(p, 3)))
    sort = ["_c", "_p", "placement", "layer"] + ([by] if by else [])
    return tmp.sort_values(sort, kind="stable").drop(columns=["_c", "_p"]).reset_index(drop=True)


def accumulate_trace(
    path: str | os.PathLike, by: str | None = None, batch_rows: int = DEFAULT_BATCH_ROWS, hist_bins: int = HIST_BINS
) -> RoutingStats:
    """Stream one trace (file or directory) through a :class:`RoutingAccumulator`."""
    acc = RoutingAccumulator(by=by, hist_bins=hist_bins, source=os.fspath(path))
    for batch in iter_batches(path, METRIC_COLUMNS, batch_rows):
        acc.update(batch)
    if not len(acc.groups):
        raise TraceError(f"trace {os.fspath(path)} has no rows")
    return acc.result()
