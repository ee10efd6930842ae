"""Synthetic routing traces with the trace schema: for tests, the benchmark and tutorials.

* :func:`trace_table` builds a trace from hand-written arrays (closed-form tests).
* :func:`synthetic_trace` generates a routing pattern: ``"uniform"`` (perfect balance,
  uniform router distribution), ``"collapsed"`` (every token on expert 0) or
  ``"random"`` (softmax router with task / token-kind preferences, optional collapsed
  layers and checkpoint drift that vanishes at ``progress=1``).
* :func:`write_synthetic_trace` writes one in chunks (bounded memory) to a Parquet
  file or a directory of part files.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import TRACE_SCHEMA

PATTERNS = ("uniform", "collapsed", "random")


# --------------------------------------------------------------------------- array -> table


def _list(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    n, width = values.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))


def _strings(values, n: int) -> pa.Array:
    if isinstance(values, str):
        return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([values])).cast(pa.string())
    values = np.asarray(values)
    if len(values) != n:
        raise ValueError(f"string column has {len(values)} values for {n} rows")
    uniq, idx = np.unique(values.astype(str), return_inverse=True)
    return pa.DictionaryArray.from_arrays(idx.astype(np.int32), pa.array(list(uniq))).cast(pa.string())


def _ints(values, n: int, dtype) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(values, dtype=dtype), (n,))
    return np.ascontiguousarray(arr)


def trace_table(
    experts,
    weights=None,
    probs=None,
    *,
    num_experts: int | None = None,
    task="task",
    doc_id=0,
    checkpoint="final",
    placement="llm",
    layer=0,
    image=0,
    crop=0,
    position=None,
    token_kind="text",
) -> pa.Table:
    """A trace table from arrays. ``experts`` is [n, k]; every other column is a scalar
    (broadcast) or has n values.

    Defaults: ``weights`` 1/k each, ``probs`` the weights scattered onto the chosen
    experts, ``num_experts`` the probs width (else max expert + 1), ``position`` 0..n-1.
    """
    experts = np.asarray(experts, dtype=np.int32)
    if experts.ndim != 2:
        raise ValueError(f"experts must be [n, k], got shape {experts.shape}")
    n, k = experts.shape
    weights = np.full((n, k), 1.0 / k, np.float32) if weights is None else np.asarray(weights, np.float32)
    if num_experts is None:
        num_experts = np.asarray(probs).shape[1] if probs is not None else int(experts.max()) + 1
    if probs is None:
        probs = np.zeros((n, int(num_experts)), np.float32)
        np.put_along_axis(probs, experts.astype(np.int64), np.abs(weights), axis=1)
    probs = np.asarray(probs, np.float32)
    columns = {
        "task": _strings(task, n),
        "doc_id": pa.array(_ints(doc_id, n, np.int64)),
        "checkpoint": _strings(checkpoint, n),
        "placement": _strings(placement, n),
        "layer": pa.array(_ints(layer, n, np.int32)),
        "image": pa.array(_ints(image, n, np.int32)),
        "crop": pa.array(_ints(crop, n, np.int32)),
        "position": pa.array(_ints(np.arange(n) if position is None else position, n, np.int32)),
        "token_kind": _strings(token_kind, n),
        "experts": _list(experts, pa.int32()),
        "weights": _list(weights, pa.float32()),
        "probs": _list(probs, pa.float32()),
        "num_experts": pa.array(_ints(num_experts, n, np.int32)),
    }
    return pa.Table.from_pydict(columns, schema=TRACE_SCHEMA)


# --------------------------------------------------------------------------- generated patterns


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def synthetic_trace(
    num_docs: int = 8,
    tokens_per_doc: int = 16,
    *,
    num_experts: int = 4,
    top_k: int = 2,
    placements: Sequence[str] = ("vision", "projector", "llm"),
    num_layers: int = 2,
    tasks: Sequence[str] = ("vqa", "caption", "ocr"),
    checkpoint: str = "final",
    pattern: str = "random",
    seed: int = 0,
    specialisation: float = 1.0,
    temperature: float = 1.0,
    collapse: Mapping[tuple[str, int], float] | None = None,
    progress: float = 1.0,
    drift: float = 1.5,
    doc_offset: int = 0,
) -> pa.Table:
    """A generated trace of one checkpoint. Rows: doc -> placement -> layer -> position.

    Token kinds: vision/projector rows are ``image``; in the LLM the first half of the
    positions are ``image``, the last eighth (at least one) ``generated``, the rest
    ``text``. Task of a document: ``tasks[doc % len(tasks)]``.

    ``"random"``: logits = noise * temperature + specialisation * (task bias + token-kind
    bias / 2) + collapse strength on expert 0 of the named (placement, layer)s
    + drift * (1 - progress) * checkpoint noise. The noise depends on (seed, document)
    only, so two checkpoints of the same documents differ by the drift term alone and
    agree fully at ``progress=1``.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    n_p, n_l, n_t = len(placements), num_layers, tokens_per_doc
    per_doc = n_p * n_l * n_t
    n = num_docs * per_doc
    w = np.tile(np.arange(per_doc, dtype=np.int64), num_docs)
    doc = np.repeat(np.arange(doc_offset, doc_offset + num_docs, dtype=np.int64), per_doc)
    p_idx = w // (n_l * n_t)
    layer = (w // n_t) % n_l
    position = w % n_t
    task_idx = doc % len(tasks)
    kinds = np.array(["image", "text", "generated"])
    llm = np.array([p == "llm" for p in placements])[p_idx]
    n_gen = max(1, n_t // 8)
    kind_idx = np.where(position < n_t // 2, 0, np.where(position >= n_t - n_gen, 2, 1))
    kind_idx = np.where(llm, kind_idx, 0)
    e, k = num_experts, top_k

    if pattern == "uniform":
        group_row = doc * n_t + position - doc_offset * n_t  # index of the row inside its (placement, layer)
        experts = (group_row[:, None] + np.arange(k)) % e
        weights = np.full((n, k), 1.0 / k, np.float32)
        probs = np.full((n, e), 1.0 / e, np.float32)
    elif pattern == "collapsed":
        experts = np.broadcast_to(np.arange(k), (n, k))
        weights = np.zeros((n, k), np.float32)
        weights[:, 0] = 1.0
        probs = np.zeros((n, e), np.float32)
        probs[:, 0] = 1.0
    else:
        fixed = np.random.default_rng(_seed(seed, "bias"))
        task_bias = fixed.normal(size=(n_p, n_l, len(tasks), e)).astype(np.float32)
        kind_bias = fixed.normal(size=(n_p, n_l, 3, e)).astype(np.float32) / 2
        noise = np.random.default_rng(_seed(seed, "noise", doc_offset, num_docs)).standard_normal((n, e), np.float32)
        logits = noise * temperature
        logits += specialisation * (task_bias[p_idx, layer, task_idx] + kind_bias[p_idx, layer, kind_idx])
        for (place, lay), strength in (collapse or {}).items():
            if place in placements:
                hit = (p_idx == list(placements).index(place)) & (layer == lay)
                logits[hit, 0] += strength
        if progress < 1 and drift:
            ck = np.random.default_rng(_seed(seed, "ckpt", checkpoint, doc_offset, num_docs))
            logits += drift * (1 - progress) * ck.standard_normal((n, e), np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        experts = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        chosen = np.take_along_axis(probs, experts, axis=1)
        weights = chosen / chosen.sum(axis=1, keepdims=True)

    return trace_table(
        experts, weights, probs, num_experts=e,
        task=np.asarray(tasks)[task_idx], doc_id=doc, checkpoint=checkpoint,
        placement=np.asarray(placements)[p_idx], layer=layer, image=np.where(kind_idx == 0, 0, -1),
        position=position, token_kind=kinds[kind_idx],
    )


def write_trace(
    tables: pa.Table | Iterable[pa.Table], path: str | os.PathLike, files: int = 1, compression: str = "zstd"
) -> str:
    """Write trace table(s) to ``path``: a ``.parquet`` file, or a directory of ``files`` parts
    (tables go to the parts in turn)."""
    path = os.fspath(path)
    if isinstance(tables, pa.Table):
        tables = [tables]
    single = path.endswith(".parquet")
    if single and files != 1:
        raise ValueError("a .parquet path is one file; give a directory path for several parts")
    if not single:
        os.makedirs(path, exist_ok=True)
    writers: list[pq.ParquetWriter] = []
    try:
        for i, table in enumerate(tables):
            j = i % files
            if j == len(writers):
                target = path if single else os.path.join(path, f"part-{j:05d}.parquet")
                writers.append(pq.ParquetWriter(target, TRACE_SCHEMA, compression=compression))
            writers[j].write_table(table.cast(TRACE_SCHEMA))
    finally:
        for w in writers:
            w.close()
    return path


def write_synthetic_trace(
    path: str | os.PathLike, num_docs: int = 8, tokens_per_doc: int = 16, *, docs_per_chunk: int | None = None,
    files: int = 1, **kwargs,
) -> str:
    """Generate :func:`synthetic_trace` in chunks of documents and write it (see :func:`write_trace`)."""
    step = docs_per_chunk or num_docs

    def chunks():
        for start in range(0, num_docs, step):
            yield synthetic_trace(min(step, num_docs - start), tokens_per_doc, doc_offset=start, **kwargs)

    return write_trace(chunks(), path, files=files)


def write_demo_traces(
    directory: str | os.PathLike, num_checkpoints: int = 3, num_docs: int = 12, tokens_per_doc: int = 24,
    num_layers: int = 4, **kwargs,
) -> list[str]:
    """Traces of ``num_checkpoints`` checkpoints of one synthetic run (oldest first) for demos.

    Routing converges towards the final checkpoint (``progress`` 0 -> 1) and LLM layer 1
    is pushed towards collapse onto expert 0. Returns the paths, oldest first.
    """
    os.makedirs(directory, exist_ok=True)
    kwargs.setdefault("collapse", {("llm", 1): 8.0})
    paths = []
    for i in range(num_checkpoints):
        progress = i / max(num_checkpoints - 1, 1)
        name = f"step-{(i + 1) * 100:04d}"
        paths.append(write_synthetic_trace(os.path.join(os.fspath(directory), f"{name}.parquet"), num_docs,
                                           tokens_per_doc, num_layers=num_layers, checkpoint=name, progress=progress,
                                           **kwargs))
    return paths
