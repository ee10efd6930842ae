"""The ``--model_args`` contract between ``libmoe eval`` and the libmoe lmms-eval model classes.

lmms-eval turns ``--model_args k1=v1,k2=v2`` into constructor keywords with
``lmms_eval.utils.simple_parse_args_string``: values are split on commas (outside
quotes/brackets) and converted: ``true``/``false`` -> bool, digits -> int, a float
literal -> float, anything else stays a string. So list values are written with ``;``
(``layers_expert_selection=1;2;3`` arrives as the string ``"1;2;3"``, a single ``7``
arrives as the int ``7``); use :func:`parse_int_list` / :func:`parse_placements` in the
model class to read them back whatever their type.

Keys written by :func:`format_model_args`:

==========================  =====================================================
``pretrained``              checkpoint directory (or hub id)
``conv_template``           conversation template name (optional)
``return_id_experts``       record expert routing (bool)
``layers_expert_selection`` MoE layer indices to record, ``;``-separated (optional: all)
``placements``              ``vision;projector;llm`` subset to record (optional: all)
``trace_dir``               where the routing Parquet dataset goes (``<output>/traces``)
==========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .traces import PLACEMENTS

__all__ = ["LIST_SEP", "format_model_args", "parse_bool", "parse_int_list", "parse_placements"]

LIST_SEP = ";"
_FORBIDDEN = (",", "=", '"', "'")


def _check_value(key: str, value: str) -> str:
    bad = [c for c in _FORBIDDEN if c in value]
    if bad:
        raise ValueError(
            f"model argument {key}={value!r} contains {' '.join(bad)}, which lmms-eval's "
            "--model_args parser cannot carry; rename the path or value"
        )
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return LIST_SEP.join(str(v) for v in value)
    return str(value)


def format_model_args(
    pretrained: str,
    *,
    conv_template: str | None = None,
    return_id_experts: bool = False,
    layers: Iterable[int] | None = None,
    placements: Iterable[str] | None = None,
    trace_dir: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Build the ``--model_args`` string for a libmoe model (keys in the module docstring)."""
    args: dict[str, Any] = {"pretrained": pretrained}
    if conv_template:
        args["conv_template"] = conv_template
    if return_id_experts:
        args["return_id_experts"] = True
        if layers is not None:
            args["layers_expert_selection"] = [int(x) for x in layers]
        if placements is not None:
            args["placements"] = list(parse_placements(list(placements)))
        if trace_dir is not None:
            args["trace_dir"] = trace_dir
    for key, value in (extra or {}).items():
        if key in args:
            raise ValueError(f"model argument {key!r} is set twice")
        args[key] = value
    return ",".join(f"{k}={_check_value(k, _as_text(v))}" for k, v in args.items())


def parse_bool(value: Any) -> bool:
    """``True``/``"true"``/``1``/``"yes"`` -> True; ``None``/``False``/``"false"``/``0``/``"no"`` -> False."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off", "none"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_int_list(value: Any) -> list[int] | None:
    """``"1;2;3"``, ``"1 2 3"``, ``7``, ``[1, 2]`` -> list of ints; ``None``/``""``/``"all"`` -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"not a list of integers: {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, float) and value.is_integer():
        return [int(value)]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    text = str(value).strip().strip("[]")
    if text.lower() in ("", "all", "none"):
        return None
    try:
        return [int(tok) for tok in text.replace(LIST_SEP, " ").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"not a list of integers: {value!r} (write e.g. 1;2;3)") from None


def parse_placements(value: Any) -> tuple[str, ...]:
    """``"vision;llm"``, ``"vision,llm"``, ``["llm"]`` -> validated tuple; ``None``/``"all"`` -> all three."""
    if value is None:
        return PLACEMENTS
    if isinstance(value, str):
        items = value.replace(LIST_SEP, " ").replace(",", " ").split()
    else:
        items = [str(v) for v in value]
    if not items or items == ["all"]:
        return PLACEMENTS
    bad = [p for p in items if p not in PLACEMENTS]
    if bad:
        raise ValueError(f"unknown placement(s) {bad}; choose from {', '.join(PLACEMENTS)}")
    return tuple(dict.fromkeys(items))


def parse_batch_size(value: Any) -> int:
    """A positive integer batch size (``"8"``, ``8``); anything else is an error naming it."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return int(text)


def check_trace_selection(model, requested_placements: Any, placements: tuple[str, ...],
                          layers: list[int] | None, name: str) -> None:
    """An error when the routing to record selects nothing the model has: a placement asked for by
    name without MoE layers, or a layer index that is no MoE layer of the chosen placements (the
    run went through with an empty traces folder)."""
    from ..model.placement import placed_moe_layers

    placed = [(placement, index) for placement, index, _ in placed_moe_layers(model)]
    have = ", ".join(f"{p} {i}" for p, i in placed)
    if requested_placements is not None and placements != PLACEMENTS:  # named, not "all"
        empty = [p for p in placements if all(pp != p for pp, _ in placed)]
        if empty:
            raise ValueError(f"libmoe: placements {empty} of {name} have no MoE layers; its MoE layers: {have}")
    unknown = sorted({i for i in layers or () if i not in {index for p, index in placed if p in placements}})
    if unknown:
        raise ValueError(f"libmoe: layers_expert_selection {unknown} are no MoE layers of {name} in placements "
                         f"{list(placements)}; its MoE layers: {have}")
