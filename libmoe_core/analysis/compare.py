"""Routing changes across checkpoints of one run: switch rate, overlap, saturation.

Rows of two traces are matched on (task, doc_id, placement, layer, image, crop,
position, token_kind). Two streaming strategies, both with bounded memory:

* ``zip`` (fast path): traces of the same documents written in the same order are
  read side by side, re-chunked to equal lengths, and every chunk's keys are checked
  to be equal before comparing.
* ``join`` (any row order): each trace is split in one streaming pass into one
  temporary Parquet file per (placement, layer); then, partition by partition, every
  trace's keys are hash-joined (pyarrow) with the final trace's. Memory: one
  partition of every trace at a time.

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

    def add(self, gid, mats: list[np.ndarray], where: str, valid: list[np.ndarray] | None = None) -> None:
        """mats[i]: experts [n, k] of trace i for the same n tokens (valid[i]: rows present)."""
        g = len(self.groups)
        last = len(mats) - 1
        for i in range(len(mats)):
            if i > 0:
                ok = None if valid is None else valid[i - 1] & valid[i]
                self._add(self.prev[i], gid, g, mats[i - 1], mats[i], ok, where)
            ok = None if valid is None else valid[i] & valid[last]
            self._add(self.final[i], gid, g, mats[i], mats[last], ok, where)

    @staticmethod
    def _add(sums, gid, g, a, b, ok, where):
        if ok is not None:
            gid, a, b = gid[ok], a[ok], b[ok]
        sums.add(gid, g, a, b, where)

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
                row.update(matched=int(n_prev[j]) if i else int(n_fin[j]), switch_rate=float(sw[j]),
                           overlap=float(ov[j]), saturation=float(sat[j]))
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


def _compare_zip(paths, by, batch_rows) -> _Comparison:
    comp = _Comparison(len(paths), by)
    strings = {c: StringIds() for c in _STRING_KEYS}
    for chunks in _aligned_chunks(paths, batch_rows):
        ref = chunks[-1]
        for name in _INT_KEYS:
            want = ints(ref.column(name), name)
            if any(not np.array_equal(ints(c.column(name), name), want) for c in chunks[:-1]):
                raise _Mismatch(name)
        for name in _STRING_KEYS:
            want = strings[name].encode(ref.column(name), name)
            if any(not np.array_equal(strings[name].encode(c.column(name), name), want) for c in chunks[:-1]):
                raise _Mismatch(name)
        mats = [list_matrix(c.column("experts"), "experts") for c in chunks]
        if any(m is None for m in mats):
            raise _Mismatch("experts of different lengths within a chunk")
        for i, c in enumerate(chunks):
            local, dictionary = codes(c.column("checkpoint"), "checkpoint")
            comp.labels[i].update(dictionary[j] for j in np.unique(local))
        gid = comp.groups.encode(ref)
        comp.add(gid, mats, where=os.fspath(paths[-1]))
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


def _join_rows(left: pa.Table, right: pa.Table, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into left, into right) of the rows with equal join keys."""
    keys = ["task", "doc_id", "image", "crop", "position", "token_kind"]
    lt = left.select(keys).append_column("_l", pa.array(np.arange(left.num_rows)))
    rt = right.select(keys).append_column("_r", pa.array(np.arange(right.num_rows)))
    joined = lt.join(rt, keys=keys, join_type="inner")
    li = joined.column("_l").to_numpy()
    ri = joined.column("_r").to_numpy()
    if len(np.unique(li)) != len(li) or len(np.unique(ri)) != len(ri):
        raise TraceError(f"{where}: several rows share one ({', '.join(JOIN_KEYS)})")
    return li, ri


def _compare_join(paths, by, batch_rows, tmp_dir=None) -> _Comparison:
    comp = _Comparison(len(paths), by)
    with tempfile.TemporaryDirectory(prefix="libmoe-compare-", dir=tmp_dir) as tmp:
        parts = [_partition(p, tmp, i, batch_rows) for i, p in enumerate(paths)]
        last = len(paths) - 1
        for key, final_file in parts[last].items():
            final = pq.read_table(final_file)
            n = final.num_rows
            mats, valid = [], []
            for i in range(len(paths)):
                where = f"{os.fspath(paths[i])} placement={key[0]} layer={key[1]}"
                if key not in parts[i]:
                    mats.append(None)
                    valid.append(np.zeros(n, bool))
                    continue
                table = final if i == last else pq.read_table(parts[i][key])
                comp.labels[i].update(pc.unique(table.column("checkpoint")).to_pylist())
                experts = list_matrix(table.column("experts").combine_chunks(), "experts")
                if experts is None:
                    raise TraceError(f"{where}: tokens with different numbers of experts")
                if i == last:
                    mats.append(experts)
                    valid.append(np.ones(n, bool))
                    continue
                li, ri = _join_rows(table, final, where)
                aligned = np.zeros((n, experts.shape[1]), experts.dtype)
                aligned[ri] = experts[li]
                ok = np.zeros(n, bool)
                ok[ri] = True
                mats.append(aligned)
                valid.append(ok)
            k = mats[last].shape[1]
            mats = [np.zeros((n, k), np.int32) if m is None else m for m in mats]
            batch = final.combine_chunks().to_batches()[0] if n else None
            if batch is None:
                continue
            gid = comp.groups.encode(batch)
            comp.add(gid, mats, where=f"placement={key[0]} layer={key[1]}", valid=valid)
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

    Returns a DataFrame with one row per (trace, placement, layer[, by]): ``trace``,
    ``checkpoint``, the key, ``matched`` (tokens compared), ``switch_rate`` and
    ``overlap`` against the previous trace (NaN for the first) and ``saturation``
    against the final trace (1 for the final itself).
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
