"""Named model presets and the one entry point, :func:`build_model`.

``tiny`` (SigLIP vision + Phi-3 LM, random init, offline tokenizer) trains on 2 CPU
cores. The three seed presets (LibMoE's rows) load their towers and LLMs from the
Hugging Face hub, or from local directories (``vision_path=``, ``llm_path=``);
``load_weights=False`` builds them from the embedded configs (e.g. on the meta
device, to count parameters without downloading).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tokens import IMAGE_PLACEHOLDER
from .attention import resolve_attn_implementation
from .config import LibMoEVLMConfig
from .modeling import LibMoEVLMForCausalLM
from .placement import upcycle
from .projector import build_projector
from .vision import strip_vision_model

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"

SIGLIP_SO400M_224 = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
CLIP_L14_336 = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
    "projection_dim": 768, "layer_norm_eps": 1e-5,
}
PHI3_MINI = {  # microsoft/Phi-3-mini-4k-instruct (and Phi-3.5-mini's sizes; rope scaling omitted here)
    "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Preset:
    """A vision tower + LLM pairing and the LibMoE settings that go with it."""

    name: str
    vision_config: dict
    text_config: dict
    vision_hub: str | None = None
    llm_hub: str | None = None
    template: str = "phi35"
    image_aspect: str = "pad"
    model_fields: dict = field(default_factory=dict)  # LibMoEVLMConfig fields


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
            "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        },
        text_config={
            "model_type": "phi3", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "tie_word_embeddings": False,
        },
        template="phi35",
        model_fields={"vision_feature_layer": -2, "image_pool": 2, "projector_type": "mlp2x_gelu"},
    ),
    "siglip224-phi35": Preset(
        "siglip224-phi35", SIGLIP_SO400M_224, {**PHI3_MINI, "max_position_embeddings": 131072},
        vision_hub="google/siglip-so400m-patch14-224", llm_hub="microsoft/Phi-3.5-mini-instruct", template="phi35",
        model_fields={"vision_feature_layer": -2, "vision_scales": [1, 3], "projector_type": "mlp2x_gelu"},
    ),
    "siglip224-phi3": Preset(
        "siglip224-phi3", SIGLIP_SO400M_224, PHI3_MINI,
        vision_hub="google/siglip-so400m-patch14-224", llm_hub="microsoft/Phi-3-mini-4k-instruct", template="phi3",
        model_fields={"vision_feature_layer": -2, "vision_scales": [1, 3], "projector_type": "mlp2x_gelu"},
    ),
    "clip336-phi3": Preset(
        "clip336-phi3", CLIP_L14_336, PHI3_MINI,
        vision_hub="openai/clip-vit-large-patch14-336", llm_hub="microsoft/Phi-3-mini-4k-instruct", template="phi3",
        model_fields={"vision_feature_layer": -2, "vision_scales": [1, 3], "projector_type": "mlp2x_gelu"},
    ),
}


#: LibMoEVLMConfig fields and sub-config updates that build_model passes through ``**overrides``.
CONFIG_OVERRIDES = ("vision_feature_layer", "vision_scales", "image_pool", "projector_type", "image_token_id",
                    "vision_config", "text_config")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def load_tiny_tokenizer():
    """The tiny preset's byte-level BPE (ships with the package; rebuild: build_tiny_tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))


def eos_ids(tokenizer) -> list[int]:
    """End-of-answer ids for generation: eos plus every template's end-of-turn token present."""
    ids = [tokenizer.eos_token_id]
    for tok in ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids and tid is not None:
            ids.append(tid)
    return [i for i in ids if i is not None]


def _merge(base: dict, update: dict | None) -> dict:
    out = copy.deepcopy(base)
    out.update(update or {})
    return out


def _local_or_hub(path, hub_id: str) -> str:
    """A local copy's folder (``~`` expanded) when one is given, else the hub id."""
    return os.path.expanduser(os.fspath(path)) if path else hub_id


def _hub_paths(preset: Preset, vision_path, llm_path, local_copies: str | None = None) -> tuple[str, str]:
    """Local paths of the preset's tower and LLM, or a fail-fast error saying what to download;
    ``local_copies``: how the caller points the preset at downloaded folders (default: the Python call)."""
    from transformers import AutoConfig

    vision, llm = _local_or_hub(vision_path, preset.vision_hub), _local_or_hub(llm_path, preset.llm_hub)
    missing = []
    for what, path in (("vision tower", vision), ("language model", llm)):
        try:
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            missing.append(f"{what} '{path}' ({type(err).__name__})")
    if missing:
        raise OSError(
            f"preset {preset.name!r} loads pretrained weights that are not available here: {'; '.join(missing)}. "
            f"Download them where the hub is reachable, e.g. `hf download {preset.vision_hub}` and "
            f"`hf download {preset.llm_hub}` (or snapshot_download), then either use the HF cache or "
            f"point the preset at local copies (`hf download REPO --local-dir DIR`): "
            + (local_copies or f"build_model({preset.name!r}, vision_path='/path/to/vision', llm_path='/path/to/llm'). "
               "Use load_weights=False for a randomly initialised model of the same shape.")
        )
    return vision, llm


def check_preset_weights(preset: str, vision_path=None, llm_path=None, local_copies: str | None = None) -> None:
    """A hub preset's tower and LLM can be loaded here (the HF cache, the hub, or the local copies
    given), else the error of :func:`_hub_paths`; nothing to check for the tiny preset."""
    spec = get_preset(preset)
    if spec.vision_hub is not None:
        _hub_paths(spec, vision_path, llm_path, local_copies)


def _hub_tokenizer(llm: str, local_files_only: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm, local_files_only=local_files_only)
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def build_model(
    preset: str = "tiny",
    *,
    router: str = "smoe",
    num_experts: int = 4,
    top_k: int = 2,
    moe_vision=None,
    moe_projector=None,
    moe_llm_layers=None,
    balance_coef: float | None = None,
    z_coef: float | None = None,
    capacity_factor: float | None = None,
    router_options: dict | None = None,
    seed: int = 0,
    noise: float = 0.0,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    load_weights: bool = True,
    vision_path: str | None = None,
    llm_path: str | None = None,
    **overrides,
) -> LibMoEVLMForCausalLM:
    """Build a (dense or MoE) model from a preset.

    MoE placements (all off: the dense model of the pretrain / pft stages):
    ``moe_vision`` / ``moe_projector`` / ``moe_llm_layers``: None/False, True (all),
    a layer list, a shortcut (``all``, ``every_other``, ``second_half``), or a dict
    overriding router, num_experts, top_k, balance_coef, z_coef, ... for that placement.
    The dense model is built first, then upcycled, so every expert copies its dense MLP.

    ``overrides``: LibMoEVLMConfig fields (``vision_feature_layer``, ``image_pool``,
    ``projector_type``, ``vision_scales``) and ``vision_config`` / ``text_config`` dicts
    merged into the preset's sub-configs (e.g. ``text_config={"model_type": "llama"}``; the tiny
    preset, or a hub preset with ``load_weights=False``: refused for a hub preset's loaded tower
    and LLM, which keep their checkpoints' configs).
    ``vision_path`` / ``llm_path``: local copies of a hub preset's tower / LLM (``~`` expanded)
    instead of the hub repos or the HF cache.
    ``load_weights`` applies to hub presets (the tiny preset is always random).
    ``dtype``: of the whole model, fp32 by default (hub checkpoints are loaded in it, not in
    their own dtypes: Phi-3.5 ships bf16, SigLIP fp32).
    """
    spec = get_preset(preset)
    unknown = sorted(set(overrides) - set(CONFIG_OVERRIDES))
    if unknown:  # transformers would keep them as unused config attributes
        raise TypeError(f"build_model got unknown argument(s) {unknown}; config overrides it takes: {CONFIG_OVERRIDES}")
    vision_update = overrides.pop("vision_config", None)
    text_update = overrides.pop("text_config", None)
    fields = _merge(spec.model_fields, overrides)
    hub = spec.vision_hub is not None and load_weights
    if hub and (vision_update or text_update):
        _refuse_sub_config_overrides(spec, "build_model")
    attn = resolve_attn_implementation(attn_implementation, dtype=dtype or torch.float32)
    if spec.vision_hub is None or not load_weights:
        tokenizer = load_tiny_tokenizer() if spec.vision_hub is None else None
        vision_cfg = _merge(spec.vision_config, vision_update)
        text_cfg = _merge(spec.text_config, text_update)
        if tokenizer is not None:
            text_cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
            text_cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
            text_cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
            fields["image_token_id"] = _tokenizer_image_token_id(tokenizer, fields.get("image_token_id"))
        elif (hub_tokenizer := _reachable_tokenizer(spec, llm_path)) is not None:  # as build_processor's
            fields["image_token_id"] = _tokenizer_image_token_id(hub_tokenizer, fields.get("image_token_id"))
        else:  # no tokenizer here, so no processor either: a placeholder id
            fields.setdefault("image_token_id", text_cfg["vocab_size"] - 1)
        config = LibMoEVLMConfig(vision_config=vision_cfg, text_config=text_cfg, **fields)
        config._attn_implementation = attn
        model = LibMoEVLMForCausalLM(config)
    else:
        model, tokenizer = _build_from_hub(spec, vision_path, llm_path, fields, attn, dtype)
    if tokenizer is not None:
        # a checkpoint's own stop ids first (Phi-3's [32007, 32001, 32000]), then the templates' ends it lacks
        theirs = model.generation_config.eos_token_id if hub else None
        theirs = [theirs] if isinstance(theirs, int) else list(theirs or [])
        model.generation_config.eos_token_id = theirs + [i for i in eos_ids(tokenizer) if i not in theirs]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if dtype is not None and not hub:
        _cast_like_from_pretrained(model, dtype)
    upcycle(
        model, moe_vision=moe_vision, moe_projector=moe_projector, moe_llm_layers=moe_llm_layers,
        router=router, num_experts=num_experts, top_k=top_k, balance_coef=balance_coef, z_coef=z_coef,
        capacity_factor=capacity_factor, router_options=router_options or {}, seed=seed, noise=noise,
    )
    return model


def _cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, except that floating buffers that are not saved (RoPE's ``inv_freq``)
    keep their dtype, as ``from_pretrained(..., dtype=...)`` leaves them: a bf16 build then gives
    the logits its saved and reloaded copy does (a bf16 ``inv_freq`` moved them by up to 8e-3)."""
    computed = {}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_floating_point():
                computed[(module, name)] = buffer
    model.to(dtype)
    for (module, name), buffer in computed.items():
        module._buffers[name] = buffer


def _refuse_sub_config_overrides(spec: Preset, caller: str) -> None:
    where = ("they shape randomly initialised models (the tiny preset, or load_weights=False)" if caller == "build_model"
             else "a hub preset's processor takes its image settings from the tower checkpoint")
    raise TypeError(
        f"preset {spec.name!r} loads its vision tower and LLM with their checkpoints' configs, so vision_config / "
        f"text_config overrides cannot apply to {caller}; {where}"
    )


def _reachable_tokenizer(spec: Preset, llm_path):
    """The hub preset's tokenizer if it loads here (a local folder or the HF cache; nothing is
    downloaded: a weightless build is for counting parameters offline), else None."""
    try:
        return _hub_tokenizer(_local_or_hub(llm_path, spec.llm_hub), local_files_only=True)
    except (OSError, ValueError):
        return None


def _tokenizer_image_token_id(tokenizer, requested: int | None) -> int:
    """The tokenizer's ``<image>`` id; an ``image_token_id`` override must equal it (the
    processor inserts the tokenizer's id, so another one would find no image tokens)."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if requested is not None and requested != token_id:
        raise ValueError(f"image_token_id={requested!r} differs from the tokenizer's {IMAGE_PLACEHOLDER} id {token_id}; "
                         "leave it unset (it is taken from the tokenizer)")
    return token_id


def _hub_vision_config(path: str):
    """The vision config of a tower checkpoint (full SigLIP/CLIP checkpoints hold it as vision_config)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return getattr(cfg, "vision_config", cfg)


def _build_from_hub(spec: Preset, vision_path, llm_path, fields: dict, attn: str, dtype):
    """Pretrained tower + LLM (from the hub or local dirs), fresh projector, all in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32  # transformers would load each checkpoint in its own dtype

    vision, llm = _hub_paths(spec, vision_path, llm_path)
    vision_cfg = _hub_vision_config(vision)
    text_cfg = AutoConfig.from_pretrained(llm)
    tokenizer = _hub_tokenizer(llm)
    fields = {**fields, "image_token_id": _tokenizer_image_token_id(tokenizer, fields.get("image_token_id"))}
    config = LibMoEVLMConfig(vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(), **fields)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = LibMoEVLMForCausalLM(config)
    tower_cls = type(model.vision_tower.model)
    tower = tower_cls.from_pretrained(vision, dtype=dtype, attn_implementation=attn)
    model.vision_tower.model = strip_vision_model(tower, config.kept_vision_layers)
    model.language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=attn)
    if len(tokenizer) > model.language_model.get_input_embeddings().weight.shape[0]:
        model.language_model.resize_token_embeddings(len(tokenizer))
    model.config.text_config = model.language_model.config
    projector = build_projector(config.projector_type, config.vision_feature_width, config.text_config.hidden_size)
    for module in projector.modules():
        model._init_weights(module)
    model.projector = projector.to(dtype)
    llm_gen = model.language_model.generation_config
    if llm_gen.eos_token_id is not None:
        model.generation_config.eos_token_id = llm_gen.eos_token_id
    return model, tokenizer


def build_processor(
    preset: str = "tiny",
    *,
    template: str | None = None,
    image_aspect: str | None = None,
    vision_path: str | None = None,
    llm_path: str | None = None,
    **overrides,
):
    """The processor (tokenizer + image processor + template) matching :func:`build_model`'s model."""
    from .processor import LibMoEProcessor, default_image_processor

    spec = get_preset(preset)
    unknown = sorted(set(overrides) - set(CONFIG_OVERRIDES))
    if unknown:
        raise TypeError(f"build_processor got unknown argument(s) {unknown}; config overrides it takes: {CONFIG_OVERRIDES}")
    fields = _merge(spec.model_fields, {k: v for k, v in overrides.items() if k not in ("vision_config", "text_config")})
    vision_cfg = _merge(spec.vision_config, overrides.get("vision_config"))
    if spec.vision_hub is None:
        tokenizer = load_tiny_tokenizer()
        image_processor = default_image_processor(vision_cfg)
    else:
        from transformers import AutoImageProcessor

        if overrides.get("vision_config") or overrides.get("text_config"):
            _refuse_sub_config_overrides(spec, "build_processor")
        vision, llm = _hub_paths(spec, vision_path, llm_path)
        tokenizer = _hub_tokenizer(llm)
        image_processor = AutoImageProcessor.from_pretrained(vision, backend="pil")  # LLaVA's PIL path, as LibMoEProcessor
        vision_cfg = _hub_vision_config(vision).to_dict()
    config = LibMoEVLMConfig(vision_config=vision_cfg, text_config={"model_type": "phi3"}, **fields)
    return LibMoEProcessor(
        tokenizer, image_processor, template=template or spec.template,
        num_image_tokens=config.num_image_tokens, image_aspect=image_aspect or spec.image_aspect,
    )
