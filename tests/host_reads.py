"""Counting the ops that read tensor values back to the host: on a GPU each makes the host wait for it."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# item/float/int/bool, comparisons read as bools, and ops whose output size depends on the values
READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
         torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.bincount.default,
         torch.ops.aten.masked_select.default}


def _bool_index(func, args) -> bool:
    """``t[mask]``: a boolean index, whose output size is the mask's count."""
    return func is torch.ops.aten.index.Tensor and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def host_reads(fn, monkeypatch) -> list[str]:
    """The ops ``fn()`` runs that read values to the host (``tolist`` too, which is no dispatched op)."""
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in READS or _bool_index(func, args):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", lambda t: seen.append("tolist") or tolist(t))
        with Log():
            fn()
    return seen
