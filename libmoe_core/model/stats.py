"""Parameter counts: total and active per token (MoE layers count top_k of their experts)."""

from __future__ import annotations

from .placement import placed_moe_layers


def parameter_counts(model) -> dict[str, int]:
    """``total``, ``active`` (per token) and per-component totals (vision / projector / llm).

    Active = total minus, in every MoE layer, the experts a token does not use
    (num_experts - top_k of them). Works on meta-device models.
    """
    parts = {"vision": model.vision_tower, "projector": model.projector, "llm": model.language_model}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, _, layer in placed_moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.experts.num_experts
        inactive += (layer.experts.num_experts - layer.router.top_k) * per_expert
    return {"total": total, "active": total - inactive, **counts}
