"""Streaming reads of a trace: column projection, record batches, no full load.

Files are read one row group at a time. Strings that name groups (checkpoint,
placement, task, token_kind) are read dictionary-encoded, so a batch carries small integer codes plus a tiny dictionary.
List columns are turned into ``[n, width]`` numpy views without copying.
Column types are checked against the schema from each file's footer, and NaN/inf router
values (``probs``, ``weights``) are errors, so bad input never reaches the metrics.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import LEGACY_COLUMNS, TRACE_SCHEMA

DEFAULT_BATCH_ROWS = 1 << 18
_DICT_COLUMNS = ("task", "checkpoint", "placement", "token_kind")


class TraceError(ValueError):
    """A trace that breaks the schema contract (the message names the file and the column)."""


def trace_files(path: str | os.PathLike) -> list[str]:
    """The Parquet files of a trace (a file, or every ``*.parquet`` below a directory), sorted."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"trace not found: {path}")
    files = []
    for root, _dirs, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.endswith(".parquet") and not n.startswith((".", "_"))]
    if not files:
        raise TraceError(f"trace directory {path} holds no .parquet files")
    return sorted(files)


def _value_kind(t: pa.DataType) -> str | None:
    """'integer', 'float' or 'string' for a scalar type (a dictionary counts as its values), else None."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    return None


def _type_kind(t: pa.DataType) -> str | None:
    """What a column type holds for the type check: e.g. 'integer' or 'list<float>' (any width,
    list layout or dictionary encoding of the values); None for anything else."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _value_kind(t.value_type)
        return None if inner is None or pa.types.is_dictionary(t.value_type) else f"list<{inner}>"
    if pa.types.is_null(t):
        return "null"
    return _value_kind(t)


#: Columns that may be null throughout (``probs``: router distribution not recorded).
_NULLABLE = ("probs",)
#: List columns of floats whose items must be finite (a missing distribution is a null list).
_FINITE_COLUMNS = ("weights", "probs")


def check_types(file: str, schema: pa.Schema) -> None:
    """Check the types of the :data:`~.schema.TRACE_SCHEMA` columns in ``schema`` (of ``file``).

    Any integer width, float width, string layout (plain, large, dictionary-encoded) or list
    layout (list, large or fixed-size) is accepted; a ``probs`` column of type null (nothing
    recorded) too. Raises :class:`TraceError` naming the file, the column, the expected and
    the found type.
    """
    for name in schema.names:
        if name not in TRACE_SCHEMA.names:
            continue
        expected = TRACE_SCHEMA.field(name).type
        found = schema.field(name).type
        want, got = _type_kind(expected), _type_kind(found)
        if got == want or (got == "null" and name in _NULLABLE):
            continue
        raise TraceError(
            f"trace file {file}: column {name} has type {found}, expected {want} (schema: {expected})"
        )


def check_columns(path: str | os.PathLike, columns: Iterable[str]) -> list[str]:
    """Check that every file of the trace has ``columns`` and that its trace columns have the
    schema's types (:func:`check_types`); return the files.

    Raises :class:`TraceError` naming the first file and column that is missing or mistyped (the
    :data:`~.schema.LEGACY_COLUMNS` may be missing: readers fill them in).
    Only Parquet footers are read.
    """
    files = trace_files(path)
    columns = list(columns)
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"trace file {f} is unreadable (truncated or corrupt?): {exc}") from exc
        names = set(schema.names)
        missing = [c for c in columns if c not in names and c not in LEGACY_COLUMNS]
        if missing:
            expected = ", ".join(f"{fld.name}: {fld.type}" for fld in TRACE_SCHEMA if fld.name in missing)
            raise TraceError(f"trace file {f} lacks required column(s) {', '.join(missing)} (expected {expected})")
        check_types(f, schema)
    return files


#: List columns whose items are probabilities (>= 0); ``weights`` may be negative (TC-MoE's negative slots).
_NONNEGATIVE_COLUMNS = ("probs",)


def _valid_items(values: pa.Array, name: str) -> pa.Array:
    """Per item of a flattened list column: finite (and >= 0 for a probability column); null is invalid."""
    ok = pc.is_finite(values)
    if name in _NONNEGATIVE_COLUMNS:
        ok = pc.and_(ok, pc.greater_equal(values, 0))
    return pc.fill_null(ok, False)


def _nonfinite_items(array: pa.Array, name: str) -> int:
    """How many items of a list<float> column are NaN, inf, null or (probs) negative (null lists do not count)."""
    if pa.types.is_null(array.type):
        return 0
    values = array.flatten()
    if len(values) == 0:
        return 0
    valid = pc.sum(_valid_items(values, name)).as_py() or 0
    return len(values) - valid


def _nonfinite_error(file: str, name: str) -> TraceError:
    """The error for a file whose ``name`` column holds non-finite items: how many rows (of the
    whole file, reading only that column) and the first one."""
    rows = first = total = 0
    try:
        with pq.ParquetFile(file) as pf:
            for batch in pf.iter_batches(columns=[name]):
                array = batch.column(0)
                values = array.flatten()
                bad = pc.invert(_valid_items(values, name))
                parents = pc.filter(pc.list_parent_indices(array), bad)
                if len(parents):
                    first = first if rows else total + pc.min(parents).as_py()
                    rows += pc.count_distinct(parents).as_py()
                total += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        return TraceError(f"trace file {file}: column {name} has NaN, inf{', negative' if name in _NONNEGATIVE_COLUMNS else ''} or null values ({exc})")
    what = "NaN, inf, negative or null" if name in _NONNEGATIVE_COLUMNS else "NaN, inf or null"
    return TraceError(
        f"trace file {file}: column {name} has {what} values in {rows} of {total} row(s) "
        f"(first at row {first}); a {name} value must be finite{' and >= 0' if name in _NONNEGATIVE_COLUMNS else ''}"
        + (" (a distribution that was not recorded is a null list)" if name in _NULLABLE else "")
    )


def _check_nulls(file: str, name: str, array: pa.Array, row: int) -> None:
    """Nulls (and null ids inside ``experts`` lists) are errors naming the file, the column and the
    rows (``row``: the file row of ``array[0]``); ``probs`` may be null."""
    if name in _NULLABLE:
        return
    rows = f"rows {row}-{row + len(array) - 1}"
    if array.null_count:
        raise TraceError(f"trace file {file}: column {name} has {array.null_count} null value(s) in {rows}; "
                         "only probs may be null")
    if name not in _FINITE_COLUMNS and _type_kind(array.type) == "list<integer>":  # float items: the finite check
        items = array.flatten().null_count
        if items:
            raise TraceError(f"trace file {file}: column {name} has {items} null item(s) inside its lists in {rows}")


def columns_to_read(columns: Sequence[str], available: Sequence[str]) -> list[str]:
    """What to read from a file with ``available`` columns to give ``columns``: the present ones,
    plus ``token_kind`` when a missing ``image`` is to be filled in from it."""
    present = [c for c in columns if c in available]
    if "image" in columns and "image" not in available and "token_kind" in available and "token_kind" not in present:
        present.append("token_kind")
    return present


def _legacy_column(name: str, data: pa.RecordBatch | pa.Table):
    """A :data:`~.schema.LEGACY_COLUMNS` column for ``data``: image 0 for image tokens and -1 for
    text (from ``token_kind``), crop 0."""
    int32 = TRACE_SCHEMA.field(name).type
    if name == "image" and "token_kind" in data.schema.names:
        is_image = pc.equal(data.column("token_kind").cast(pa.string()), "image")
        return pc.if_else(is_image, pa.scalar(0, int32), pa.scalar(-1, int32))
    return pa.repeat(pa.scalar(0, int32), data.num_rows)


def with_legacy_columns(data: pa.RecordBatch | pa.Table, columns: list[str]):
    """``data`` (a batch or a table, read by :func:`columns_to_read`) as ``columns`` in this order,
    absent :data:`~.schema.LEGACY_COLUMNS` filled in (no copy of the others)."""
    names = data.schema.names
    unknown = [c for c in columns if c not in names and c not in LEGACY_COLUMNS]
    if unknown:
        raise TraceError(f"no column(s) {', '.join(unknown)} in the trace (columns: {', '.join(names)})")
    arrays = [data.column(c) if c in names else _legacy_column(c, data) for c in columns]
    if isinstance(data, pa.RecordBatch):
        arrays = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    return type(data).from_arrays(arrays, names=columns)


def _file_batches(files: list[str], columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    dictionary = [c for c in _DICT_COLUMNS if c in columns]
    for f in files:
        try:
            pf = pq.ParquetFile(f, read_dictionary=dictionary)
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"trace file {f} is unreadable (truncated or corrupt?): {exc}") from exc
        present = columns_to_read(columns, pf.schema_arrow.names)
        finite = [c for c in _FINITE_COLUMNS if c in present]
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present, use_threads=True):
                if batch.num_rows:
                    for c in present:
                        _check_nulls(f, c, batch.column(c), row)
                    for c in finite:
                        if _nonfinite_items(batch.column(c), c):
                            raise _nonfinite_error(f, c)
                    yield with_legacy_columns(batch, columns)
                row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise TraceError(f"trace file {f} is unreadable (truncated or corrupt?): {exc}") from exc
        finally:
            pf.close()


def iter_batches(
    path: str | os.PathLike, columns: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS, prefetch: int = 2
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns``, files in sorted order, rows in file order.

    Files are read one row group at a time (``pyarrow.parquet.ParquetFile.iter_batches``),
    so memory is bounded by a row group plus ``prefetch`` batches decoded ahead by a
    background thread (decoding overlaps the caller's work; 0 disables the thread).
    """
    if batch_rows < 1:
        raise TraceError(f"batch_rows must be >= 1, got {batch_rows}")
    files = check_columns(path, columns)
    batches = _file_batches(files, list(columns), batch_rows)
    if prefetch <= 0:
        yield from batches
        return
    yield from _prefetched(batches, prefetch)


_END = object()


def _prefetched(source: Iterator, depth: int) -> Iterator:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the consumer)
            put(exc)

    thread = threading.Thread(target=work, name="trace-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- column helpers


def codes(array: pa.Array, name: str = "column") -> tuple[np.ndarray, list]:
    """(integer codes [n], values) of a string column, dictionary-encoding it if needed."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not pa.types.is_dictionary(array.type):
        array = pc.dictionary_encode(array)
    if array.null_count:
        raise TraceError(f"column {name} has {array.null_count} null value(s)")
    return array.indices.to_numpy(zero_copy_only=False), array.dictionary.to_pylist()


def ints(array: pa.Array, name: str = "column") -> np.ndarray:
    """An integer column as numpy (no nulls allowed)."""
    if array.null_count:
        raise TraceError(f"column {name} has {array.null_count} null value(s)")
    return array.to_numpy(zero_copy_only=False)


def list_widths(array: pa.Array) -> np.ndarray:
    """Length of every list of a list column."""
    if pa.types.is_fixed_size_list(array.type):
        return np.full(len(array), array.type.list_size, dtype=np.int64)
    offsets = array.offsets.to_numpy()
    return np.diff(offsets)


def list_matrix(array: pa.Array, name: str = "column") -> np.ndarray | None:
    """A list column whose lists all have one length as an ``[n, width]`` array (zero copy).

    Returns None when the lengths differ (the caller splits the rows by width).
    """
    if array.null_count:
        raise TraceError(f"column {name} has {array.null_count} null list(s)")
    inner_nulls = array.flatten().null_count
    if inner_nulls:  # a null expert id or weight inside a list (it read as expert 0, or as NaN)
        raise TraceError(f"column {name} has {inner_nulls} null item(s) inside its lists")
    n = len(array)
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
    else:
        offsets = array.offsets.to_numpy()
        total = int(offsets[-1] - offsets[0])
        if n == 0:
            width = 0
        else:
            width = total // n
            if width * n != total or int(offsets[1] - offsets[0]) != width:
                return None
            if not np.all(np.diff(offsets) == width):
                return None
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, width)
