"""Dense group ids for rows: one id per (checkpoint, placement, layer[, task | token_kind]).

Per batch, the local dictionary codes and the layer are folded into one integer,
the few distinct values are looked up once, and every row gets its id with one
gather: no Python work per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .read import codes, ints
from .schema import check_by

_DENSE_LIMIT = 1 << 22  # fold-space size up to which bincount (not unique) finds the present keys


class StringIds:
    """Global ids for the values of one string column across batches."""

    def __init__(self):
        self.values: list[str] = []
        self._ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.values)

    def id(self, value: str) -> int:
        got = self._ids.get(value)
        if got is None:
            got = self._ids[value] = len(self.values)
            self.values.append(value)
        return got

    def encode(self, array: pa.Array, name: str) -> np.ndarray:
        """Global ids [n] of a string column of one batch."""
        local, dictionary = codes(array, name)
        table = np.fromiter((self.id(v) for v in dictionary), dtype=np.int64, count=len(dictionary))
        return table[local]


class GroupIndex:
    """Maps rows to dense group ids; ``keys[g]`` is ([checkpoint,] placement, layer[, by value]).

    ``with_checkpoint=False`` leaves the checkpoint out of the key (checkpoint comparison).
    """

    def __init__(self, by: str | None = None, with_checkpoint: bool = True):
        self.by = check_by(by)
        self.lead = ("checkpoint", "placement") if with_checkpoint else ("placement",)
        self.columns = self.lead + ((by,) if by else ())
        self.keys: list[tuple] = []
        self._lookup: dict[tuple, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def names(self) -> tuple[str, ...]:
        return self.lead + ("layer",) + ((self.by,) if self.by else ())

    def _gid(self, key: tuple) -> int:
        got = self._lookup.get(key)
        if got is None:
            got = self._lookup[key] = len(self.keys)
            self.keys.append(key)
        return got

    def encode(self, batch: pa.RecordBatch) -> np.ndarray:
        """Group id (int64) of every row of ``batch``."""
        n = batch.num_rows
        fold = np.zeros(n, dtype=np.int64)
        parts = []  # (dictionary or None for the layer, size, offset)
        for name in self.columns:
            local, dictionary = codes(batch.column(name), name)
            size = max(len(dictionary), 1)
            fold *= size
            fold += local
            parts.append((dictionary, size, 0))
        layer = ints(batch.column("layer"), "layer").astype(np.int64, copy=False)
        lo, hi = (int(layer.min()), int(layer.max())) if n else (0, 0)
        size = hi - lo + 1
        # the layer is folded last; _decode puts it back in its place in the key
        fold *= size
        fold += layer - lo
        parts.append((None, size, lo))
        space = 1
        for _, s, _ in parts:
            space *= s
        if space <= _DENSE_LIMIT:
            present = np.flatnonzero(np.bincount(fold, minlength=space))
            lut = np.zeros(space, dtype=np.int64)
            for code in present:
                lut[code] = self._gid(self._decode(int(code), parts))
            return lut[fold]
        present, inverse = np.unique(fold, return_inverse=True)
        ids = np.array([self._gid(self._decode(int(c), parts)) for c in present], dtype=np.int64)
        return ids[inverse]

    def _decode(self, code: int, parts) -> tuple:
        values = []
        for dictionary, size, offset in reversed(parts):
            code, rem = divmod(code, size)
            values.append(rem + offset if dictionary is None else dictionary[rem])
        values.reverse()
        # values: lead..., [by], layer  ->  lead..., layer, [by]
        layer = values.pop()
        n = len(self.lead)
        return (*values[:n], layer, *values[n:])
