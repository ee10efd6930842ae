"""Load LibMoE's published checkpoints (vision_language_model, Phi3.5-SigLIP / Phi3-CLIP).

Key names of their model code, mapped onto ours:

| LibMoE | ours |
|---|---|
| ``model.vision_tower.vision_model.{embeddings,pre_layrnorm}.*`` (``vision_model.*`` in ``clip.bin``) | ``vision_tower.model.*`` |
| ``...encoder.layers.i.{self_attn,layer_norm1,layer_norm2}.*`` | same under ``vision_tower.model.`` |
| ``...encoder.layers.i.mlp.fc{1,2}.*`` (dense) | same, or copied into every expert if the layer is MoE |
| ``...encoder.layers.i.moelayer.experts.j.fc1.{weight,bias}`` | ``...layers.i.mlp.experts.{w_in,b_in}[j]`` (transposed) |
| ``...encoder.layers.i.moelayer.experts.j.fc2.{weight,bias}`` | ``...layers.i.mlp.experts.{w_out,b_out}[j]`` (transposed) |
| ``...encoder.layers.i.moelayer.gate.weight`` | ``...layers.i.mlp.router.gate.weight`` |
| ``model.mm_projector.{0,2}.*`` (``mm_projector.bin``) | ``projector.{0,2}.*``, or every expert if MoE |
| ``model.mm_projector.moelayer.experts.j.{0,2}.*`` / ``.gate.weight`` | ``projector.experts.*[j]`` / ``projector.router.gate.weight`` |
| ``model.{embed_tokens,layers,norm}.*``, ``lm_head.*`` (Phi-3) | ``language_model.model.*``, ``language_model.lm_head.*`` |

A gate bias (v1.1 ``smoe_sigmoidgating``, early ``smoe_perturbed``) goes to our router's gate
bias or selection bias. Not mapped (reported in ``ImportReport.unused`` by their names): vision
layers after the feature layer (LibMoE stores all 27 SigLIP layers but uses the penultimate
output), ``post_layernorm`` / ``head``, ``image_newline``, and router parameters other than a
linear gate (xmoe / smoe_cosinegating / v2 smoe_perturbed route through ``inp_reduction`` and
``expert_embeddings`` and never use the ``gate`` they also save; hyperrouter's hypernetwork):
those routers keep their fresh initialisation, are listed in ``ImportReport.missing`` and
``fresh_routers``, and the import warns. A checkpoint's ``config.json`` MoE settings must
match the model (:func:`libmoe_config_mismatches`).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

VISION = re.compile(r"^(?:model\.)?(?:vision_tower\.)*vision_model\.(.+)$")
VISION_EXPERT = re.compile(r"^encoder\.layers\.(\d+)\.moelayer\.experts\.(\d+)\.fc([12])\.(weight|bias)$")
VISION_GATE = re.compile(r"^encoder\.layers\.(\d+)\.moelayer\.gate\.(weight|bias)$")
VISION_DENSE_MLP = re.compile(r"^encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)$")
VISION_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
PROJ_EXPERT = re.compile(r"^(?:model\.)?mm_projector\.moelayer\.experts\.(\d+)\.([02])\.(weight|bias)$")
PROJ_GATE = re.compile(r"^(?:model\.)?mm_projector\.moelayer\.gate\.(weight|bias)$")
# routers that route through a reduced projection and expert embeddings (X-MoE style: LibMoE's
# smoe_cosinegating, smoe_perturbed v2, xmoe): their ``gate`` Linear is created but never used
PROJECTED_ROUTER = re.compile(r"^(.*\.moelayer)\.(?:inp_reduction\.weight|expert_embeddings)$")
#: files the HF Trainer writes next to the weights
NOT_WEIGHTS = {"training_args.bin", "optimizer.bin", "scheduler.bin", "optimizer.pt", "scheduler.pt"}
PROJ_DENSE = re.compile(r"^(?:model\.)?mm_projector\.(.+)$")
LLM = re.compile(r"^model\.(embed_tokens|layers|norm)\.(.+)$")
LLM_DENSE_MLP = re.compile(r"^layers\.(\d+)\.mlp\.(gate_up_proj|down_proj)\.weight$")
LM_HEAD = re.compile(r"^lm_head\.(.+)$")

# (LibMoE piece, bias?) -> our stacked parameter
_PIECE = {("1", "weight"): "w_in", ("1", "bias"): "b_in", ("2", "weight"): "w_out", ("2", "bias"): "b_out",
          ("0", "weight"): "w_in", ("0", "bias"): "b_in"}


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)  # our keys written
    missing: list[str] = field(default_factory=list)  # our keys the checkpoint did not provide
    unused: dict[str, str] = field(default_factory=dict)  # their key -> why it was not used
    fresh_routers: list[str] = field(default_factory=list)  # checkpoint MoE layers whose router was not imported
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # our key -> their key
    moe_layers: list[str] = field(default_factory=list, repr=False)  # our MoE layers the checkpoint has experts for


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` / ``.bin`` file or of every such file in a directory."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(f for f in path.glob("*.bin") if f.name not in NOT_WEIGHTS)
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"no .safetensors or .bin files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


def convert_libmoe_state_dict(state_dict: dict, model) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Map LibMoE key names and layouts onto ``model``'s state dict (see the module docstring)."""
    ours = model.state_dict()
    kept = len(model.vision_tower.layers)
    report = ImportReport()
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # prefix -> expert -> piece -> tensor
    projected = {m.group(1) for k in state_dict if (m := PROJECTED_ROUTER.match(k))}  # their moelayer prefixes

    def put(target: str, value: torch.Tensor, key: str):
        """Our ``target`` gets their ``key``'s tensor (the name is kept to report it if unused)."""
        out[target] = value
        report.sources[target] = key

    def gate(prefix: str, kind: str, value: torch.Tensor, key: str):
        """LibMoE's linear gate: weight -> our router's gate; bias -> its gate bias or selection bias."""
        if key.rsplit(".gate.", 1)[0] in projected:
            report.unused[key] = ("this LibMoE router routes through inp_reduction / expert_embeddings; its "
                                  "gate Linear is created but never used")
            return
        targets = [f"{prefix}.router.gate.{kind}"] + ([f"{prefix}.router.selection_bias"] if kind == "bias" else [])
        put(next((t for t in targets if t in ours), targets[0]), value, key)

    def dense_or_broadcast(prefix: str, piece: str, name: str, value: torch.Tensor, key: str):
        """A dense MLP weight: to the same key if dense here, else copied into every expert."""
        target = f"{prefix}.{name}"
        if target in ours:
            out[target] = value
        elif f"{prefix}.experts.{piece}" in ours:
            stacked = ours[f"{prefix}.experts.{piece}"]
            single = value.t() if piece.startswith("w") else value
            if tuple(single.shape) != tuple(stacked.shape[1:]):
                raise ValueError(f"shape mismatch importing the LibMoE checkpoint: {key} {tuple(value.shape)} does not "
                                 f"fit the experts of {prefix} ({tuple(stacked.shape[1:])} each, stored transposed)")
            out[f"{prefix}.experts.{piece}"] = single.unsqueeze(0).expand_as(stacked).clone()
        else:
            report.unused[key] = f"no {target} in this model"

    for key, value in state_dict.items():
        m = VISION.match(key)
        if m:
            rest = m.group(1)
            layer = VISION_LAYER.match(rest)
            if layer and int(layer.group(1)) >= kept:
                report.unused[key] = f"vision layer {layer.group(1)} is after the feature layer (only {kept} kept)"
            elif rest.startswith(("post_layernorm.", "head.")):
                report.unused[key] = "final vision norm / pooling head: not used for LLaVA features"
            elif e := VISION_EXPERT.match(rest):
                prefix = f"vision_tower.model.encoder.layers.{e.group(1)}.mlp"
                experts.setdefault(prefix, {}).setdefault(int(e.group(2)), {})[_PIECE[(e.group(3), e.group(4))]] = value
            elif g := VISION_GATE.match(rest):
                gate(f"vision_tower.model.encoder.layers.{g.group(1)}.mlp", g.group(2), value, key)
            elif d := VISION_DENSE_MLP.match(rest):
                prefix = f"vision_tower.model.encoder.layers.{d.group(1)}.mlp"
                dense_or_broadcast(prefix, _PIECE[(d.group(2), d.group(3))], f"fc{d.group(2)}.{d.group(3)}", value, key)
            else:
                put(f"vision_tower.model.{rest}", value, key)
        elif e := PROJ_EXPERT.match(key):
            experts.setdefault("projector", {}).setdefault(int(e.group(1)), {})[_PIECE[(e.group(2), e.group(3))]] = value
        elif g := PROJ_GATE.match(key):
            gate("projector", g.group(1), value, key)
        elif p := PROJ_DENSE.match(key):
            rest = p.group(1)
            piece = re.match(r"^([02])\.(weight|bias)$", rest)
            if piece:
                dense_or_broadcast("projector", _PIECE[(piece.group(1), piece.group(2))], rest, value, key)
            else:
                put(f"projector.{rest}", value, key)
        elif m := LLM.match(key):
            rest = f"{m.group(1)}.{m.group(2)}"
            mlp = LLM_DENSE_MLP.match(rest)
            if mlp:
                prefix = f"language_model.model.layers.{mlp.group(1)}.mlp"
                piece = "w_in" if mlp.group(2) == "gate_up_proj" else "w_out"
                dense_or_broadcast(prefix, piece, f"{mlp.group(2)}.weight", value, key)
            else:
                put(f"language_model.model.{rest}", value, key)
        elif m := LM_HEAD.match(key):
            put(f"language_model.lm_head.{m.group(1)}", value, key)
        else:
            report.unused[key] = "not part of this model (LibMoE-only parameter)"

    for prefix, by_expert in experts.items():
        n = len(by_expert)
        target = f"{prefix}.experts.w_in"
        if target not in ours:
            raise ValueError(f"the checkpoint has {n} experts at {prefix} but the model has a dense MLP there; "
                             "build the model with that MoE placement")
        have = ours[target].shape[0]
        if sorted(by_expert) != list(range(have)):
            raise ValueError(f"{prefix}: checkpoint experts {sorted(by_expert)} but the model has {have} experts")
        for piece in ("w_in", "b_in", "w_out", "b_out"):
            if f"{prefix}.experts.{piece}" not in ours:
                continue
            parts = [by_expert[j].get(piece) for j in range(have)]
            if any(t is None for t in parts):
                continue
            out[f"{prefix}.experts.{piece}"] = torch.stack([t.t() if piece.startswith("w") else t for t in parts])
    report.moe_layers = sorted(experts)
    return out, report


def libmoe_config_mismatches(model, config: dict) -> list[str]:
    """How a LibMoE checkpoint's ``config.json`` (``moe_name``, ``num_experts``, ``num_selected``,
    ``clip_smoe``, ``mlp_smoe``) differs from ``model``'s MoE placements; [] if it has no MoE settings."""
    if "moe_name" not in config:
        return []
    from ..moe import resolve_router_name

    try:
        router = resolve_router_name(str(config["moe_name"]))
    except ValueError:
        router = None  # a LibMoE router this kit does not have
    ours = getattr(model.config, "moe", None) or {}
    out = []
    for flag, placement in (("clip_smoe", "vision"), ("mlp_smoe", "projector")):
        if flag not in config:
            continue
        if bool(config[flag]) != (placement in ours):
            out.append(f"{flag}={config[flag]} but the model has {'an' if placement in ours else 'no'} MoE {placement}")
            continue
        if not config[flag]:
            continue
        spec = ours[placement]
        if spec["router"] != router:
            out.append(f"{placement}: checkpoint moe_name={config['moe_name']!r} (ours: {router}) vs model router "
                       f"{spec['router']!r}")
        for theirs, key in (("num_experts", "num_experts"), ("num_selected", "top_k")):
            if config.get(theirs) is not None and int(config[theirs]) != spec[key]:
                out.append(f"{placement}: checkpoint {theirs}={config[theirs]} vs model {key}={spec[key]}")
    return out


def load_libmoe_checkpoint(model, source, *, strict: bool = False, config: dict | None = None) -> ImportReport:
    """Load a LibMoE checkpoint (path(s) or a state dict) into ``model``; returns what mapped.

    Shapes must match exactly (a clear error names each mismatch). ``strict`` also
    fails when a model parameter was not provided by the checkpoint. The checkpoint's
    MoE settings (``config``, else the ``config.json`` of a directory source) must match the
    model's: router kind, experts and top-k (:func:`libmoe_config_mismatches`).
    """
    if isinstance(source, dict):
        state = source
    else:
        sources = source if isinstance(source, (list, tuple)) else [source]
        state = {}
        for s in sources:
            state.update(read_checkpoint(s))
            if config is None and Path(s).is_dir() and (Path(s) / "config.json").is_file():
                config = json.loads((Path(s) / "config.json").read_text())
    mismatches = libmoe_config_mismatches(model, config or {})
    if mismatches:
        raise ValueError("the LibMoE checkpoint's MoE settings differ from the model's; build the model with "
                         "them:\n  " + "\n  ".join(mismatches))
    converted, report = convert_libmoe_state_dict(state, model)
    ours = model.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
           for k, v in converted.items() if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        raise ValueError("shape mismatch importing the LibMoE checkpoint (check the preset / placements / "
                         "vision_scales):\n  " + "\n  ".join(bad))
    unknown = [k for k in converted if k not in ours]
    for k in unknown:
        report.unused[report.sources.get(k, k)] = f"mapped to {k}, which this model does not have"
        converted.pop(k)
    model.load_state_dict(converted, strict=False)
    report.loaded = sorted(converted)
    report.missing = sorted(k for k in ours if k not in converted)
    report.fresh_routers = sorted({k.split(".router.")[0] for k in report.missing if ".router." in k}
                                  & set(report.moe_layers))  # a dense checkpoint's upcycled layers start fresh
    if strict and report.missing:
        raise ValueError(f"{len(report.missing)} model parameters not in the checkpoint, e.g. {report.missing[:5]}")
    if report.fresh_routers:
        warnings.warn(f"LibMoE import: the routers of {len(report.fresh_routers)} MoE layer(s) were not in the "
                      f"checkpoint in a form this model's router takes and keep their fresh initialisation "
                      f"({', '.join(report.fresh_routers[:4])}{', ...' if len(report.fresh_routers) > 4 else ''}): "
                      "routing is not LibMoE's until they are trained (report.fresh_routers, report.unused)",
                      stacklevel=2)
    return report
