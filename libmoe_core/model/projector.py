"""The vision-to-language projector (LLaVA's ``linear`` and ``mlp2x_gelu``).

An MoE projector is the ``mlp2x_gelu`` one upcycled by :mod:`libmoe_core.model.placement`.
"""

from __future__ import annotations

from torch import nn

from .config import PROJECTOR_TYPES


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Module:
    """``linear``: Linear(in, out); ``mlp2x_gelu``: Sequential(Linear(in, out), GELU, Linear(out, out))."""
    if projector_type == "linear":
        return nn.Linear(in_features, out_features)
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
    raise ValueError(f"unknown projector_type {projector_type!r}; choose one of {PROJECTOR_TYPES}")
