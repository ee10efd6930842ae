"""Streamed Parquet writer for expert-routing traces recorded during evaluation.

One evaluation run writes one Parquet dataset, ``<output_path>/traces/part-r0-00000.parquet``,
``part-r0-00001.parquet``, ... (``r<rank>``: one series per evaluation process). Every row is one token at one MoE layer::

    task        string     lmms-eval task name
    doc_id      int64      document index inside the task's split
    checkpoint  string     checkpoint name or path
    placement   string     "vision" | "projector" | "llm"
    layer       int32      MoE layer index inside that placement
    image       int32      image index in the document (vision/projector rows, llm image tokens); -1 text
    crop        int32      0 = the whole image, 1.. = its S^2 tiles (vision rows); 0 elsewhere
    position    int32      token position in the sequence the layer saw
    token_kind  string     "image" | "text" | "generated"
    experts     list<int32>    the k selected experts, in router order
    weights     list<float32>  their combine weights (k)
    probs       list<float32>  the full router distribution (E); null when not recorded
    num_experts int32      E

Memory is bounded: rows are buffered as Arrow tables built from whole numpy blocks
(no Python object per row) and written out as a part file every ``rows_per_part`` rows.
Read the dataset back with :func:`read_traces` (or ``pyarrow.parquet.read_table(dir)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..analysis.read import columns_to_read, with_legacy_columns
from ..analysis.schema import TRACE_SCHEMA

__all__ = [
    "PLACEMENTS",
    "TOKEN_KINDS",
    "TRACE_SCHEMA",
    "TraceWriter",
    "read_traces",
]

PLACEMENTS = ("vision", "projector", "llm")
#: Token kinds; an integer code ``i`` in ``token_kinds`` means ``TOKEN_KINDS[i]``.
TOKEN_KINDS = ("image", "text", "generated")


_TOKEN_KIND_DICT = pa.array(TOKEN_KINDS, pa.string())
_TOKEN_KIND_CODE = {kind: i for i, kind in enumerate(TOKEN_KINDS)}


def _per_token(values, n: int, name: str) -> np.ndarray:
    """``[n]`` int32 values from one value for the block or ``n`` values."""
    arr = _to_numpy(values, np.int32).reshape(-1)
    if arr.shape[0] == 1:
        return np.repeat(arr, n)
    if arr.shape[0] != n:
        raise ValueError(f"{name} must be one value or {n} values, got {arr.shape[0]}")
    return arr


def _to_numpy(x, dtype) -> np.ndarray:
    """A numpy array of ``dtype`` from a numpy array, a (CPU or GPU) torch tensor or a sequence."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach()
        if getattr(x, "dtype", None) is not None and str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _fixed_size_lists(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """``list<value_type>`` array with one row per row of the 2-D ``values`` (flat buffer + offsets)."""
    n, width = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), value_type))


class TraceWriter:
    """Buffer routing rows and write them as Parquet part files of ``rows_per_part`` rows.

    Args:
        root: the dataset directory (``<output_path>/traces``); created if missing.
        rows_per_part: rows per part file (every part but the last has exactly this many).
        overwrite: remove ``<prefix>-*.parquet`` files already in ``root``; without it an
            existing part with the same prefix is an error (one dataset per run).
        prefix: part-file prefix, e.g. ``"part-r1"`` for a second process of the same run.
        compression: Parquet codec.

    Use as a context manager, or call :meth:`close` (which writes the last, partial part).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        rows_per_part: int = 250_000,
        *,
        overwrite: bool = False,
        prefix: str = "part",
        compression: str = "zstd",
    ) -> None:
        if rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
        self.root = Path(root)
        self.rows_per_part = int(rows_per_part)
        self.prefix = prefix
        self.compression = compression
        self.root.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.root.glob(f"{prefix}-*.parquet"))
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.root} already holds trace parts ({existing[0].name}, ...): "
                    "choose another output path or pass overwrite=True"
                )
            for path in existing:
                path.unlink()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._closed = False
        self.rows_written = 0
        self.parts: list[Path] = []

    # ------------------------------------------------------------------ writing
    def add_block(
        self,
        task: str,
        doc_id: int,
        checkpoint: str,
        placement: str,
        layer: int,
        positions,
        token_kinds,
        experts,
        weights,
        probs=None,
        num_experts: int | None = None,
        images=0,
        crops=0,
    ) -> None:
        """Append one block of ``n`` tokens routed by one layer.

        Args:
            positions: ``[n]`` token positions.
            token_kinds: one kind for the whole block (``"text"``), ``[n]`` kind strings,
                or ``[n]`` integer codes into :data:`TOKEN_KINDS`.
            experts: ``[n, k]`` selected expert ids.
            weights: ``[n, k]`` combine weights.
            probs: ``[n, E]`` router probabilities, or ``None`` (written as null).
            num_experts: ``E``; taken from ``probs`` when given, required otherwise.
            images: image index in the document, one for the block or ``[n]`` (-1: a text token).
            crops: 0 = the whole image, 1.. = its S^2 tiles; one for the block or ``[n]``.

        Arrays may be numpy arrays or torch tensors (any device).
        """
        if self._closed:
            raise RuntimeError(f"TraceWriter for {self.root} is closed")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        pos = _to_numpy(positions, np.int32).reshape(-1)
        n = pos.shape[0]
        exp = _to_numpy(experts, np.int32)
        wts = _to_numpy(weights, np.float32)
        if exp.ndim == 1:
            exp, wts = exp[:, None], wts.reshape(-1, 1)
        if exp.ndim != 2 or exp.shape[0] != n:
            raise ValueError(f"experts must have shape [n={n}, k], got {exp.shape}")
        if wts.shape != exp.shape:
            raise ValueError(f"weights must have the shape of experts {exp.shape}, got {wts.shape}")
        if probs is not None:
            prb = _to_numpy(probs, np.float32)
            if prb.ndim != 2 or prb.shape[0] != n:
                raise ValueError(f"probs must have shape [n={n}, E], got {prb.shape}")
            if num_experts is not None and num_experts != prb.shape[1]:
                raise ValueError(f"num_experts={num_experts} but probs has {prb.shape[1]} columns")
            num_experts = prb.shape[1]
            probs_arr = _fixed_size_lists(prb, pa.float32())
        else:
            if num_experts is None:
                raise ValueError("num_experts is required when probs is None")
            probs_arr = pa.nulls(n, pa.list_(pa.float32()))
        if n == 0:
            return
        if exp.size and (exp.min() < 0 or exp.max() >= num_experts):
            raise ValueError(f"expert ids must lie in [0, {num_experts}), got range [{exp.min()}, {exp.max()}]")

        table = pa.Table.from_arrays(
            [
                pa.repeat(pa.scalar(task, pa.string()), n),
                pa.repeat(pa.scalar(int(doc_id), pa.int64()), n),
                pa.repeat(pa.scalar(checkpoint, pa.string()), n),
                pa.repeat(pa.scalar(placement, pa.string()), n),
                pa.repeat(pa.scalar(int(layer), pa.int32()), n),
                pa.array(_per_token(images, n, "images"), pa.int32()),
                pa.array(_per_token(crops, n, "crops"), pa.int32()),
                pa.array(pos, pa.int32()),
                self._token_kind_array(token_kinds, n),
                _fixed_size_lists(exp, pa.int32()),
                _fixed_size_lists(wts, pa.float32()),
                probs_arr,
                pa.repeat(pa.scalar(int(num_experts), pa.int32()), n),
            ],
            schema=TRACE_SCHEMA,
        )
        self._pending.append(table)
        self._pending_rows += n
        while self._pending_rows >= self.rows_per_part:
            self._flush(self.rows_per_part)

    @staticmethod
    def _token_kind_array(token_kinds, n: int) -> pa.Array:
        if isinstance(token_kinds, str):
            if token_kinds not in TOKEN_KINDS:
                raise ValueError(f"token kind must be one of {TOKEN_KINDS}, got {token_kinds!r}")
            return pa.repeat(pa.scalar(token_kinds, pa.string()), n)
        kinds = token_kinds if hasattr(token_kinds, "detach") else np.asarray(token_kinds)
        if isinstance(kinds, np.ndarray) and kinds.dtype.kind in "US":
            bad = set(np.unique(kinds).tolist()) - set(TOKEN_KINDS)
            if bad:
                raise ValueError(f"token kinds must be in {TOKEN_KINDS}, got {sorted(bad)}")
            uniq, inverse = np.unique(kinds.reshape(-1), return_inverse=True)
            codes = np.array([_TOKEN_KIND_CODE[u] for u in uniq.tolist()], dtype=np.int8)[inverse]
        else:
            codes = _to_numpy(kinds, np.int8)
            if codes.size and (codes.min() < 0 or codes.max() >= len(TOKEN_KINDS)):
                raise ValueError(f"token kind codes must lie in [0, {len(TOKEN_KINDS)})")
        codes = np.asarray(codes, dtype=np.int8).reshape(-1)
        if codes.shape[0] != n:
            raise ValueError(f"token_kinds must have {n} entries, got {codes.shape[0]}")
        return pa.DictionaryArray.from_arrays(pa.array(codes), _TOKEN_KIND_DICT).cast(pa.string())

    def _flush(self, max_rows: int | None) -> None:
        """Write one part of ``max_rows`` rows (all pending rows when ``None``)."""
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        take = table.num_rows if max_rows is None else min(max_rows, table.num_rows)
        path = self.root / f"{self.prefix}-{len(self.parts):05d}.parquet"
        pq.write_table(table.slice(0, take), path, compression=self.compression)
        self.parts.append(path)
        self.rows_written += take
        rest = table.slice(take)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def flush(self) -> None:
        """Write everything buffered now (as one part, possibly shorter than ``rows_per_part``)."""
        self._flush(None)

    def close(self) -> None:
        """Write the last part; further :meth:`add_block` calls are errors. Idempotent."""
        if not self._closed:
            self._flush(None)
            self._closed = True

    @property
    def buffered_rows(self) -> int:
        return self._pending_rows

    def __enter__(self) -> TraceWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_traces(root: str | os.PathLike, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a trace dataset directory (all ``*.parquet`` parts, in name order) as one table."""
    root = Path(root)
    parts = sorted(root.glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"no trace parts (*.parquet) in {root}")
    names = list(TRACE_SCHEMA.names if columns is None else columns)
    tables = []
    for part in parts:  # traces written before the image/crop columns get them filled in
        present = columns_to_read(names, pq.read_schema(part).names)
        table = with_legacy_columns(pq.read_table(part, columns=present), names)
        tables.append(table.cast(TRACE_SCHEMA) if columns is None else table)  # normalises list field names
    return pa.concat_tables(tables)
