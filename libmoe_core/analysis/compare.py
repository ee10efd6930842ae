"""Routing changes across checkpoints of one run: switch rate, overlap, saturation.

Rows of two traces are matched on (task, doc_id, placement, layer, image, crop,
position, token_kind). Two streaming strategies, both with bounded memory:

* ``zip`` (fast path): traces of the same documents written in the same order are
  read side by side, re-chunked to equal lengths, and every chunk's keys are checked
  to be equal (and distinct within the chunk) before comparing.
* ``join`` (any row order): each trace is split in one streaming pass into one
  temporary Parquet file per (placement, layer); then, for every partition present in
  any trace, each trace's keys are checked distinct and hash-joined (pyarrow) with the
  previous trace's (switch rate, overlap) and the final trace's (saturation). Memory:
  one partition of every trace at a time.

``method="auto"`` tries ``zip`` and falls back to ``join`` at the first mismatch.

Definitions, for matched tokens with chosen experts A (earlier) and B (later), k each:
switch rate = share of the k rank slots whose expert differs (A[r] != B[r]);
overlap = mean |A ∩ B| / k; saturation of a checkpoint = mean |A ∩ F| / k with F
the final (last given) checkpoint's choice.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .groups import GroupIndex, StringIds
from .read import DEFAULT_BATCH_ROWS, TraceError, codes, ints, iter_batches, list_matrix
from .schema import COMPARE_COLUMNS, JOIN_KEYS, check_by

METHODS = ("auto", "zip", "join")
_STRING_KEYS = ("task", "placement", "token_kind")
_INT_KEYS = ("doc_id", "layer", "image", "crop", "position")


class _Mismatch(Exception):
    """The zip strategy met rows that do not line up."""


def switched_slots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token: how many of the k rank slots hold a different expert in ``b`` than in ``a``."""
    return (a != b).sum(axis=1)


def shared_experts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token: |A ∩ B| (the experts are distinct within a token)."""
    return (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)


class _Sums:
    """Per-group sums of one comparison (pair of traces)."""

    def __init__(self):
        self.rows = np.zeros(0, np.int64)
        self.switched = np.zeros(0)
        self.shared = np.zeros(0)
        self.k = np.zeros(0, np.int64)

    def add(self, gid: np.ndarray, g: int, a: np.ndarray, b: np.ndarray, where: str) -> None:
        if a.shape[1] != b.shape[1]:
            raise TraceError(f"{where}: top-k differs between checkpoints ({a.shape[1]} vs {b.shape[1]})")
        k = a.shape[1]
        for name in ("rows", "switched", "shared", "k"):
            arr = getattr(self, name)
            if len(arr) < g:
                setattr(self, name, np.concatenate([arr, np.zeros(g - len(arr), arr.dtype)]))
        rows = np.bincount(gid, minlength=g)
        self.rows += rows
        self.switched += np.bincount(gid, weights=switched_slots(a, b), minlength=g)
        self.shared += np.bincount(gid, weights=shared_experts(a, b), minlength=g)
        self.k[rows > 0] = k

    def rates(self, g: int):
        n = np.zeros(g)
        n[: len(self.rows)] = self.rows
        slots = n * np.pad(self.k, (0, g - len(self.k))).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            sw = np.pad(self.switched, (0, g - len(self.switched))) / slots
            ov = np.pad(self.shared, (0, g - len(self.shared))) / slots
        return n.astype(np.int64), sw, ov


class _Comparison:
    """Sums for every consecutive pair and every trace against the final one."""

    def __init__(self, n_traces: int, by: str | None):
        self.groups = GroupIndex(by, with_checkpoint=False)
        self.prev = [_Sums() for _ in range(n_traces)]  # prev[i]: trace i-1 -> i (prev[0] unused)
        self.final = [_Sums() for _ in range(n_traces)]  # final[i]: trace i vs the last trace
        self.labels: list[set] = [set() for _ in range(n_traces)]

    def add(self, gid, mats: list[np.ndarray], paths: Sequence[str]) -> None:
        """mats[i]: experts [n, k] of trace ``paths[i]`` for the same n tokens (row-aligned traces)."""
        g = len(self.groups)
        last = len(mats) - 1
        for i in range(len(mats)):
            if i > 0:
                self.prev[i].add(gid, g, mats[i - 1], mats[i], f"{paths[i - 1]} vs {paths[i]}")
            self.final[i].add(gid, g, mats[i], mats[last], f"{paths[i]} vs {paths[last]}")

    def frame(self, paths: Sequence[str]):
        import pandas as pd

        from .accumulate import _sorted

        g = len(self.groups)
        records = []
        for i, path in enumerate(paths):
            labels = sorted(self.labels[i])
            if len(labels) > 1:
                raise TraceError(f"trace {path} holds several checkpoints {labels}; give one trace per checkpoint")
            label = labels[0] if labels else os.fspath(path)
            n_prev, sw, ov = self.prev[i].rates(g) if i else (np.zeros(g, np.int64), np.full(g, np.nan), np.full(g, np.nan))
            n_fin, _, sat = self.final[i].rates(g)
            for j, key in enumerate(self.groups.keys):
                row = {"trace": os.fspath(path), "checkpoint": label, **dict(zip(self.groups.names, key))}
                row.update(matched=int(n_prev[j]) if i else int(n_fin[j]), matched_final=int(n_fin[j]),
                           switch_rate=float(sw[j]), overlap=float(ov[j]), saturation=float(sat[j]))
                records.append(row)
        df = pd.DataFrame.from_records(records)
        order = {os.fspath(p): i for i, p in enumerate(paths)}
        df = df.assign(_t=df["trace"].map(order))
        df = pd.concat([_sorted(part.drop(columns="_t"), self.groups.by) for _, part in df.groupby("_t", sort=True)])
        return df.reset_index(drop=True)


# --------------------------------------------------------------------------- zip strategy


def _aligned_chunks(paths, batch_rows):
    """Yield lists of equally long record batches, one per trace, in file order."""
    streams = [iter_batches(p, COMPARE_COLUMNS, batch_rows) for p in paths]
    cur: list[pa.RecordBatch | None] = [None] * len(paths)
    pos = [0] * len(paths)
    while True:
        for i, s in enumerate(streams):
            while cur[i] is None or pos[i] >= cur[i].num_rows:
                cur[i], pos[i] = next(s, None), 0
                if cur[i] is None:
                    break
        ended = [c is None for c in cur]
        if all(ended):
            return
        if any(ended):
            raise _Mismatch("traces have different numbers of rows")
        m = min(c.num_rows - p for c, p in zip(cur, pos))
        yield [c.slice(p, m) for c, p in zip(cur, pos)]
        pos = [p + m for p in pos]


def _repeats(keys: list[np.ndarray]) -> int:
    """How many rows repeat the key of an earlier row (keys: one integer array per key column).

    One sort of a 64-bit hash of the keys; only when two hashes are equal are the keys sorted and
    compared exactly.
    """
    if len(keys[0]) < 2:
        return 0
    h = np.zeros(len(keys[0]), np.uint64)
    for k in keys:
        h = h * np.uint64(0x9E3779B97F4A7C15) + k.astype(np.uint64)  # wraps around
    h.sort()
    if not (h[1:] == h[:-1]).any():
        return 0
    order = np.lexsort(keys)
    same = np.ones(len(order) - 1, bool)
    for k in keys:
        s = k[order]
        same &= s[1:] == s[:-1]
    return int(same.sum())


def _compare_zip(paths, by, batch_rows) -> _Comparison:
    comp = _Comparison(len(paths), by)
    strings = {c: StringIds() for c in _STRING_KEYS}
    for chunks in _aligned_chunks(paths, batch_rows):
        ref = chunks[-1]
        keys = []
        for name in _INT_KEYS:
            want = ints(ref.column(name), name)
            if any(not np.array_equal(ints(c.column(name), name), want) for c in chunks[:-1]):
                raise _Mismatch(name)
            keys.append(want)
        for name in _STRING_KEYS:
            want = strings[name].encode(ref.column(name), name)
            if any(not np.array_equal(strings[name].encode(c.column(name), name), want) for c in chunks[:-1]):
                raise _Mismatch(name)
            keys.append(want)
        repeated = _repeats(keys)  # within the chunk (the keys are equal in every trace)
        if repeated:
            raise TraceError(f"{', '.join(paths)}: several rows share one ({', '.join(JOIN_KEYS)}) "
                             f"({repeated} repeated row(s))")
        mats = [list_matrix(c.column("experts"), "experts") for c in chunks]
        if any(m is None for m in mats):
            raise _Mismatch("experts of different lengths within a chunk")
        for i, c in enumerate(chunks):
            local, dictionary = codes(c.column("checkpoint"), "checkpoint")
            comp.labels[i].update(dictionary[j] for j in np.unique(local))
        gid = comp.groups.encode(ref)
        comp.add(gid, mats, paths)
    return comp


# --------------------------------------------------------------------------- join strategy


def _partition(path, tmp: str, tag: int, batch_rows: int) -> dict[tuple, str]:
    """Split a trace into one Parquet file per (placement, layer); return {key: file}."""
    index = GroupIndex(None, with_checkpoint=False)
    writers: dict[int, pq.ParquetWriter] = {}
    files: dict[tuple, str] = {}
    try:
        for batch in iter_batches(path, COMPARE_COLUMNS, batch_rows):
            gid = index.encode(batch)
            order = np.argsort(gid, kind="stable")
            counts = np.bincount(gid, minlength=len(index))
            batch = batch.take(pa.array(order))
            start = 0
            for g in np.flatnonzero(counts):
                piece = batch.slice(start, int(counts[g]))
                start += int(counts[g])
                piece = piece.cast(_plain_schema(piece.schema))
                if g not in writers:
                    files[index.keys[g]] = os.path.join(tmp, f"t{tag}-g{g}.parquet")
                    writers[g] = pq.ParquetWriter(files[index.keys[g]], piece.schema)
                writers[g].write_batch(piece)
    finally:
        for w in writers.values():
            w.close()
    return files


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with dictionary-encoded strings as plain strings (stable across batches)."""
    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in schema])


_TOKEN_KEYS = ["task", "doc_id", "image", "crop", "position", "token_kind"]  # JOIN_KEYS within one partition


def _check_unique(table: pa.Table, where: str) -> None:
    """Duplicate join keys within one (placement, layer) partition are an error."""
    distinct = table.select(_TOKEN_KEYS).group_by(_TOKEN_KEYS).aggregate([]).num_rows
    if distinct != table.num_rows:
        raise TraceError(f"{where}: several rows share one ({', '.join(JOIN_KEYS)}) "
                         f"({table.num_rows - distinct} repeated row(s))")


def _join_rows(left: pa.Table, right: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into left, into right) of the rows with equal join keys (keys unique in each)."""
    lt = left.select(_TOKEN_KEYS).append_column("_l", pa.array(np.arange(left.num_rows)))
    rt = right.select(_TOKEN_KEYS).append_column("_r", pa.array(np.arange(right.num_rows)))
    joined = lt.join(rt, keys=_TOKEN_KEYS, join_type="inner")
    return joined.column("_l").to_numpy(), joined.column("_r").to_numpy()


def _compare_join(paths, by, batch_rows, tmp_dir=None) -> _Comparison:
    """Partition every trace by (placement, layer); per partition present in any trace, join each
    trace with the previous one (switch rate, overlap) and with the final one (saturation)."""
    comp = _Comparison(len(paths), by)
    last = len(paths) - 1
    with tempfile.TemporaryDirectory(prefix="libmoe-compare-", dir=tmp_dir) as tmp:
        parts = [_partition(p, tmp, i, batch_rows) for i, p in enumerate(paths)]
        for key in dict.fromkeys(k for part in parts for k in part):  # union of the keys, first seen first
            at = f"placement={key[0]} layer={key[1]}"
            data = {}  # trace index -> (experts [n, k], group ids [n], table)
            for i, part in enumerate(parts):
                if key not in part:
                    continue
                table = pq.read_table(part[key]).combine_chunks()
                where = f"{paths[i]} {at}"
                _check_unique(table, where)
                comp.labels[i].update(pc.unique(table.column("checkpoint")).to_pylist())
                experts = list_matrix(table.column("experts").combine_chunks(), "experts")
                if experts is None:
                    raise TraceError(f"{where}: tokens with different numbers of experts")
                gid = comp.groups.encode(table.to_batches()[0]) if table.num_rows else np.zeros(0, np.int64)
                data[i] = experts, gid, table
            pairs = [(comp.prev[i], i - 1, i) for i in range(1, len(paths))] + [(comp.final[i], i, last) for i in range(len(paths))]
            for sums, a, b in pairs:
                if a in data and b in data:
                    (ea, _, ta), (eb, gid, tb) = data[a], data[b]
                    li, ri = (np.arange(tb.num_rows),) * 2 if a == b else _join_rows(ta, tb)
                    sums.add(gid[ri], len(comp.groups), ea[li], eb[ri], f"{paths[a]} vs {paths[b]} {at}")
    return comp


# --------------------------------------------------------------------------- entry point


def compare_checkpoints(
    paths: Sequence[str | os.PathLike],
    by: str | None = None,
    method: str = "auto",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    tmp_dir: str | None = None,
):
    """Compare the traces of successive checkpoints (oldest first, final last).

    Returns a DataFrame with one row per (trace, placement, layer[, by]) present in any
    trace: ``trace``, ``checkpoint``, the key, ``matched`` (tokens compared with the
    previous trace; for the first, with the final), ``matched_final`` (tokens compared
    with the final trace), ``switch_rate`` and ``overlap`` against the previous trace
    (NaN for the first) and ``saturation`` against the final trace (1 for the final
    itself). A rate over no matched tokens is NaN.
    """
    check_by(by)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if len(paths) < 2:
        raise ValueError(f"comparing checkpoints needs two or more traces, got {len(paths)}")
    paths = [os.fspath(p) for p in paths]
    _check_same_expert_counts(paths, batch_rows)
    comp = None
    if method in ("auto", "zip"):
        try:
            comp = _compare_zip(paths, by, batch_rows)
        except _Mismatch as exc:
            if method == "zip":
                raise TraceError(f"traces are not row-aligned ({exc}); use method='join'") from None
    if comp is None:
        comp = _compare_join(paths, by, batch_rows, tmp_dir)
    return comp.frame(paths)


def _expert_counts(path: str, batch_rows: int) -> dict[tuple, set[int]]:
    """{(placement, layer): the num_experts values of its rows} of one trace."""
    counts: dict[tuple, set[int]] = {}
    for batch in iter_batches(path, ("placement", "layer", "num_experts"), batch_rows):
        table = pa.Table.from_batches([batch]).group_by(["placement", "layer"]).aggregate(
            [("num_experts", "min"), ("num_experts", "max")])
        for row in table.to_pylist():
            counts.setdefault((str(row["placement"]), int(row["layer"])), set()).update(
                {int(row["num_experts_min"]), int(row["num_experts_max"])})
    return counts


def _check_same_expert_counts(paths: Sequence[str], batch_rows: int) -> None:
    """Routing over different expert counts has no common expert ids to compare: an error."""
    final = _expert_counts(paths[-1], batch_rows)
    for path in paths[:-1]:
        for key, experts in sorted(_expert_counts(path, batch_rows).items()):
            if key in final and experts != final[key]:
                raise TraceError(f"placement={key[0]} layer={key[1]}: {path} routes over {sorted(experts)} experts, "
                                 f"{paths[-1]} over {sorted(final[key])}; traces of different expert counts cannot be compared")
