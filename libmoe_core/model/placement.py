"""Where the MoE layers go: vision encoder MLPs, the projector, chosen LLM decoder MLPs.

A placement spec (stored in ``config.moe[placement]``, JSON-friendly)::

    {"router": "smoe", "num_experts": 4, "top_k": 2, "layers": [0, 1, 2],
     "balance_coef": None, "z_coef": None, "capacity_factor": None,
     "router_options": {}, "seed": 0, "noise": 0.0}

A placement that names a router other than the model-wide one does not inherit the model-wide
``router_options`` (they are that router's; :func:`placement_router_options`); give its own.
``layers`` accepts a list of indices (distinct ints in range; the projector has one site, 0)
or ``all`` / ``every_other`` (1, 3, 5, ...) / ``second_half`` when given to
:func:`normalize_placement`; the config stores the list (and checks specs given to it).
Each layer's router is seeded ``seed + PLACEMENT_SEED_OFFSET[placement] + layer``.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import nn

from ..moe import MoELayer, build_moe, check_router_options
from .config import PLACEMENTS, _is_int

LAYER_SHORTCUTS = ("all", "every_other", "second_half")
PLACEMENT_SEED_OFFSET = {"vision": 0, "projector": 10_000, "llm": 20_000}
SPEC_DEFAULTS = {
    "router": "smoe", "num_experts": 4, "top_k": 2, "layers": "all", "balance_coef": None, "z_coef": None,
    "capacity_factor": None, "router_options": {}, "seed": 0, "noise": 0.0,
}


def resolve_layers(layers, num_layers: int, placement: str) -> list[int]:
    """A layer selection (list or shortcut) as a sorted list of valid indices.

    Entries must be ints (not bools or floats), distinct and in ``0..num_layers - 1``.
    """
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        if layers == "every_other":
            return list(range(1, num_layers, 2))
        if layers == "second_half":
            return list(range(num_layers // 2, num_layers))
        raise ValueError(f"moe {placement} layers: unknown shortcut {layers!r}; use a list of ints or one of {LAYER_SHORTCUTS}")
    try:
        items = list(layers)
    except TypeError:
        raise ValueError(f"moe {placement} layers must be a list of ints or one of {LAYER_SHORTCUTS}, got {layers!r}") from None
    not_ints = [i for i in items if isinstance(i, bool) or not _is_int(i)]
    if not_ints:
        raise ValueError(f"moe {placement} layers must be integer indices, got non-integer {not_ints!r} in {items!r}")
    out = sorted(operator.index(i) for i in items)
    duplicates = sorted({i for i in out if out.count(i) > 1})
    if duplicates:
        raise ValueError(f"moe {placement} layers lists {duplicates} more than once: {items!r}")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"moe {placement} layers {bad} out of range: the {placement} has {num_layers} MoE "
            f"site{'s' if num_layers != 1 else ''}, valid layers 0..{num_layers - 1}"
        )
    if not out:
        raise ValueError(f"moe {placement} layers is empty; pass None to disable the placement")
    return out


def placement_router_options(value: dict, router: str | None, options: dict | None) -> dict:
    """The ``router_options`` of a placement dict ``value`` given the model-wide ``router`` and
    ``options``: its own, else the model-wide ones unless it names another router (aliases resolved)."""
    if "router_options" in value:
        return dict(value["router_options"] or {})
    if "router" in value and value["router"] != router:
        from ..moe import resolve_router_name

        try:
            same = resolve_router_name(value["router"]) == resolve_router_name(router)
        except (ValueError, TypeError):  # an unknown name is reported when the layer is built
            same = False
        if not same:
            return {}
    return dict(options or {})


def normalize_placement(value, placement: str, num_layers: int, defaults: dict | None = None) -> dict | None:
    """Turn a user value (None/False, True, shortcut, list, or dict) into a full spec (or None)."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    elif isinstance(value, (str, list, tuple, range)):
        value = {"layers": value}
    elif not isinstance(value, dict):
        raise TypeError(f"moe_{placement} must be None, a bool, a layer list/shortcut or a dict, got {value!r}")
    for fields in (value, defaults or {}):
        unknown = sorted(set(fields) - set(SPEC_DEFAULTS))
        if unknown:
            raise ValueError(f"moe_{placement}: unknown field(s) {unknown}; known: {sorted(SPEC_DEFAULTS)}")
    defaults = defaults or {}
    spec = {**SPEC_DEFAULTS, **defaults, **value}
    spec["router_options"] = placement_router_options(value, defaults.get("router"), defaults.get("router_options"))
    spec["layers"] = resolve_layers(spec["layers"], num_layers, placement)  # the projector: [0] only
    return spec


def mlp_slots(model, placement: str):
    """(layer index, parent module, attribute name) of every MLP this placement can replace."""
    if placement == "vision":
        return [(i, layer, "mlp") for i, layer in enumerate(model.vision_tower.layers)]
    if placement == "projector":
        return [(0, model, "projector")]
    if placement == "llm":
        return [(i, layer, "mlp") for i, layer in enumerate(decoder_layers(model.language_model))]
    raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an ``AutoModelForCausalLM`` (``model.layers`` in every tested family)."""
    base = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model.model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"cannot find decoder layers in {type(language_model).__name__}")
    return layers


def num_layers(model, placement: str) -> int:
    return len(mlp_slots(model, placement))


def apply_placement(model, placement: str, spec: dict, *, noise: bool = True) -> None:
    """Replace the chosen dense MLPs by MoE layers whose experts copy them (in place).

    ``spec`` is checked against the model (fields, layer range) and completed with defaults.
    """
    slots = {i: (parent, attr) for i, parent, attr in mlp_slots(model, placement)}
    spec = normalize_placement(spec, placement, len(slots))
    for i in spec["layers"]:
        parent, attr = slots[i]
        dense = getattr(parent, attr)
        if isinstance(dense, MoELayer):
            raise ValueError(f"{placement} layer {i} is already an MoE layer")  # noqa: TRY004  a model state, not a type
        if placement == "projector" and isinstance(dense, nn.Linear):
            raise ValueError("an MoE projector upcycles the mlp2x_gelu projector; projector_type='linear' has no MLP to copy")
        options = dict(spec["router_options"])
        check_router_options(spec["router"], options, where=f"moe_{placement} router_options")
        for key in ("balance_coef", "z_coef"):
            if spec.get(key) is not None:
                options[key] = spec[key]
        layer = build_moe(
            dense, spec["router"], spec["num_experts"], spec["top_k"],
            noise=float(spec.get("noise") or 0.0) if noise else 0.0,
            capacity_factor=spec.get("capacity_factor"),
            seed=int(spec.get("seed") or 0) + PLACEMENT_SEED_OFFSET[placement] + i,
            **options,
        )
        layer.router._libmoe_build = (spec["num_experts"], spec["top_k"], options)  # a fresh twin: restore_router_buffers
        setattr(parent, attr, layer)


_NAME_PATTERNS = {
    "vision": re.compile(r"^vision_tower\.model\.encoder\.layers\.(\d+)\.mlp$"),
    "projector": re.compile(r"^projector$"),
    "llm": re.compile(r"^language_model\..*layers\.(\d+)\.mlp$"),
}


def placement_of(name: str) -> tuple[str, int] | None:
    """(placement, layer index) for the qualified name of an MoE layer in our model."""
    for placement, pattern in _NAME_PATTERNS.items():
        m = pattern.match(name)
        if m:
            return placement, int(m.group(1)) if m.groups() else 0
    return None


def placed_moe_layers(model) -> list[tuple[str, int, MoELayer]]:
    """(placement, layer index, MoELayer) for every MoE layer of the model, in module order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            where = placement_of(name)
            if where is not None:
                out.append((*where, module))
    return out


def restore_router_buffers(model) -> None:
    """Recompute routers' non-persistent buffers (a meta-device load leaves them uninitialised):
    the :meth:`~libmoe_core.moe.Router.computed_buffers`, and any other one (a router of your own
    that does not list it there) copied from a freshly built twin of the router."""
    for _, _, layer in placed_moe_layers(model):
        router = layer.router
        router.reset_computed_buffers()
        others = sorted(router._non_persistent_buffers_set - set(router.computed_buffers()))
        if not others:
            continue
        num_experts, top_k, options = router._libmoe_build
        with torch.device("cpu"):
            fresh = type(router)(router.hidden_size, num_experts, top_k, **options)
        for name in others:
            setattr(router, name, getattr(fresh, name).to(getattr(router, name).device))


def freeze_fixed_router_parts(model) -> None:
    """Re-freeze every router's fixed submodules (loading or ``requires_grad_(True)`` unfreezes them)."""
    for _, _, layer in placed_moe_layers(model):
        layer.router.freeze_fixed()


def upcycle(
    model,
    *,
    moe_vision=None,
    moe_projector=None,
    moe_llm_layers=None,
    router: str = "smoe",
    num_experts: int = 4,
    top_k: int = 2,
    **common,
):
    """Upcycle a model's dense MLPs into MoE layers (in place) and record it in ``model.config.moe``.

    Each ``moe_*`` argument is None/False (off), True (all layers), a layer list or
    shortcut (``all``, ``every_other``, ``second_half``), or a dict overriding any spec
    field for that placement. ``common`` holds spec fields shared by all placements
    (balance_coef, z_coef, capacity_factor, router_options, seed, noise). Experts are
    copies of the current dense weights, so the output is unchanged (noise=0).
    """
    defaults = {"router": router, "num_experts": num_experts, "top_k": top_k, **common}
    requested = {"vision": moe_vision, "projector": moe_projector, "llm": moe_llm_layers}
    moe = dict(model.config.moe or {})
    for placement, value in requested.items():
        spec = normalize_placement(value, placement, num_layers(model, placement), defaults)
        if spec is None:
            continue
        if placement in moe:
            raise ValueError(f"the model already has an MoE {placement} placement")
        apply_placement(model, placement, spec, noise=True)
        moe[placement] = spec
    model.config.moe = moe or None
    return model
