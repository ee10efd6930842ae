"""Drop-top-1 ablation: every MoE layer routes each token without its first choice.

Inside :func:`drop_top1`, each :class:`~libmoe_core.moe.MoELayer`'s router output
loses rank 0; the remaining k-1 weights are rescaled so that their absolute sum equals
the absolute sum of all k original weights (for routers whose weights sum to 1 this
is plain renormalisation over the rest). With k = 2 a token is computed by its second
expert alone. The router probabilities and aux losses are left as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..moe import moe_layers


def drop_first_choice(out, where: str = "router"):
    """A RouterOutput without each token's rank-0 choice, weights rescaled over the rest."""
    k = out.experts.shape[-1]
    if k < 2:
        raise ValueError(f"{where}: drop-top-1 needs top_k >= 2 (this forward routed k={k})")
    w = out.weights
    rest = w[..., 1:]
    scale = w.abs().sum(-1, keepdim=True) / rest.abs().sum(-1, keepdim=True).clamp_min(1e-20)
    return dataclasses.replace(out, experts=out.experts[..., 1:], weights=rest * scale)


@contextlib.contextmanager
def drop_top1(model: nn.Module):
    """Context manager: route ``model`` (or one MoE layer) without each token's top-1 expert.

    Implemented with a forward hook on every MoE layer's router; the hooks are removed
    on exit, also when the body raises.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer to ablate")
    handles = []
    try:
        for name, layer in layers:
            where = name or type(layer).__name__
            handles.append(layer.router.register_forward_hook(lambda _m, _i, out, where=where: drop_first_choice(out, where)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _accuracy(result, metric: str) -> float:
    if isinstance(result, Mapping):
        if metric not in result:
            raise KeyError(f"evaluate_fn returned keys {sorted(result)}, not {metric!r}")
        result = result[metric]
    return float(result)


def drop_top1_accuracy_change(
    evaluate_fn: Callable[[nn.Module], float | Mapping[str, float]], model: nn.Module, metric: str = "accuracy"
) -> dict[str, float]:
    """Run ``evaluate_fn(model)`` as is and under :func:`drop_top1`.

    ``evaluate_fn`` returns an accuracy or a mapping holding ``metric``. Returns
    ``{"baseline": a, "ablated": b, "change": b - a}``.
    """
    with torch.no_grad():
        baseline = _accuracy(evaluate_fn(model), metric)
        with drop_top1(model):
            ablated = _accuracy(evaluate_fn(model), metric)
    return {"baseline": baseline, "ablated": ablated, "change": ablated - baseline}
