"""The seed's stage rules: which model each stage starts from, what it trains, on which data.

pretrain: dense model from the preset (its hub weights, or the local copies ``vision_path`` /
          ``llm_path``), projector only (vision tower and LLM frozen).
pft:      the pretrain model, everything trains.
sft:      the pft model, upcycled to MoE (placements, router, experts, k from the config),
          everything trains including the routers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .config import TrainConfig

EASYVQA_FILES = {"pretrain": "easyvqa_caption_train.json", "pft": "easyvqa_caption_train.json", "sft": "easyvqa_qa_train.json"}


def cache_dir() -> Path:
    return Path(os.environ.get("LIBMOE_CACHE", Path.home() / ".cache" / "libmoe"))


def easyvqa_dir() -> Path:
    """The embedded dataset, built once from the easy-vqa package (offline)."""
    from ..data.easyvqa import FORMAT_VERSION, build_easyvqa

    root = cache_dir() / "easyvqa"
    meta = root / "easyvqa_meta.json"
    current = meta.is_file() and json.loads(meta.read_text()).get("format_version") == FORMAT_VERSION
    if not current:  # build aside, then move into place
        staging = root.with_name(f"easyvqa.tmp-{os.getpid()}")
        build_easyvqa(staging)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(staging, root)
    return root


def manifest_of(dataset: str):
    """The :class:`~libmoe_core.data.manifests.Manifest` a ``dataset`` value names (a shipped
    manifest's name, or a ``.yaml`` file), else None (``easyvqa`` and annotation files)."""
    from ..data.manifests import list_manifests, load_manifest

    if dataset == "easyvqa":
        return None
    if dataset.endswith((".yaml", ".yml")) or (dataset in list_manifests() and not Path(dataset).is_file()):
        return load_manifest(dataset)
    return None


def manifest_files(manifest, data_root: str | os.PathLike, image_folder: str | None) -> tuple[Path, Path]:
    """(annotation file, image folder) of a prepared manifest dataset under ``data_root``."""
    root = Path(data_root)
    files = [a["file"] for a in manifest.annotations]
    if len(files) != 1:
        raise ValueError(f"dataset: manifest {manifest.name!r} has {len(files)} annotation files "
                         f"({', '.join(files) or 'images only'}); train on a manifest with one, or give the "
                         f"annotation file itself as dataset")
    path = root / files[0]
    if not path.is_file():
        raise FileNotFoundError(f"dataset {manifest.name!r}: no {path}; fetch it with `libmoe data prepare "
                                f"{manifest.name} --root {root}` (and check with `libmoe data verify`)")
    return path, Path(image_folder) if image_folder else root / manifest.image_folder


def dataset_files(cfg: TrainConfig) -> tuple[Path, Path | None]:
    """(annotation file, image folder) of the stage's data: the embedded easyvqa, a manifest's
    under ``data_root``, or a LLaVA-format file with ``image_folder``."""
    if cfg.dataset == "easyvqa":
        root = easyvqa_dir()
        return root / EASYVQA_FILES[cfg.stage], root / "images"
    manifest = manifest_of(cfg.dataset)
    if manifest is not None:
        return manifest_files(manifest, cfg.data_root, cfg.image_folder)
    path = Path(cfg.dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset: no such file {path} (give 'easyvqa', a manifest name listed by "
                                f"`libmoe data list` with data_root, or a LLaVA-format JSON/JSONL file)")
    return path, Path(cfg.image_folder) if cfg.image_folder else None


def stage_template(cfg: TrainConfig, processor) -> str:
    """The conversation template the stage trains with: the config's (the tiny recipe pretrains on
    LLaVA-1.5's ``plain`` captions), else the model's chat template, as LibMoE trains every stage
    (its pretrain scripts pass ``--version phi35`` / ``phi3``)."""
    return cfg.template or processor.template


def saved_template(cfg: TrainConfig, processor) -> str:
    """The chat template the stage's model is saved with, which evaluation and the next stage prompt in:
    the one it trained with, unless that is no chat (``plain``: pretrain's captions), then the processor's."""
    from ..data.templates import ChatTemplate, get_template

    trained = stage_template(cfg, processor)
    return trained if isinstance(get_template(trained), ChatTemplate) else processor.template


def training_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the stage's model is cast to and trained in. ``precision: auto``: bf16 on a CUDA GPU
    with native bf16 (compute capability >= 8.0, Ampere or newer), else fp32 (a V100 or T4 only
    emulates bf16, slowly; ``precision`` offers no fp16). ``bf16`` on such a GPU is refused, naming it."""
    cuda = torch.cuda.is_available()
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if cfg.precision == "bf16" and cuda and not native_bf16:
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(f"precision: bf16 needs a GPU with native bf16 (compute capability >= 8.0, Ampere or "
                         f"newer); this GPU ({torch.cuda.get_device_name()}) has {major}.{minor}: use "
                         "precision: fp32 (or auto, which picks fp32 here)")
    if cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16):
        return torch.bfloat16
    return torch.float32


def check_init_model(cfg: TrainConfig) -> str | None:
    """The model folder this stage starts from (None: the preset); a clear error if it is missing."""
    source = cfg.resolved_init_from()
    if source is not None and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(
            f"{cfg.stage} starts from {source}, which holds no model: run the previous stage first "
            f"or set init_from (the notebooks' input_model) to a saved model folder"
        )
    if source is None:  # the stage builds the preset: its hub weights must be here before ranks start
        from ..model.presets import check_preset_weights

        check_preset_weights(cfg.preset, cfg.vision_path, cfg.llm_path, local_copies=(
            "`--set vision_path=DIR --set llm_path=DIR` (a config file's keys, the pretrain notebook's "
            "parameters of those names, `libmoe pipeline --set pretrain.vision_path=DIR`)."))
    return source


def _start_model_config(cfg: TrainConfig) -> dict:
    """The start model's saved config (``{}`` when the stage builds the preset)."""
    source = cfg.resolved_init_from()
    path = Path(source) / "config.json" if source is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _configured_moe(cfg: TrainConfig, placement: str) -> dict | None:
    """(router, num_experts, top_k) the config asks for at ``placement`` (None: no MoE there)."""
    from ..moe import resolve_router_name

    value = {"vision": cfg.moe_vision, "projector": cfg.moe_projector, "llm": cfg.moe_llm_layers}[placement]
    if value is None or value is False:
        return None
    own = value if isinstance(value, dict) else {}
    return {"router": resolve_router_name(own.get("router", cfg.router)), "num_experts": own.get("num_experts", cfg.num_experts),
            "top_k": own.get("top_k", cfg.top_k)}


def moe_mismatches(cfg: TrainConfig, moe: dict) -> list[str]:
    """How a start model that already has MoE (``config.moe``) differs from the config's MoE settings."""
    from ..moe import resolve_router_name

    problems = []
    for placement in ("vision", "projector", "llm"):
        want, have = _configured_moe(cfg, placement), (moe or {}).get(placement)
        if (want is None) != (have is None):
            problems.append(f"{placement}: {'MoE' if have else 'no MoE'} in the model, "
                            f"{'MoE' if want else 'no MoE'} in the config")
            continue
        if want is None:
            continue
        have = {**have, "router": resolve_router_name(have["router"])}
        problems += [f"{placement} {key}: {have.get(key)!r} in the model, {value!r} in the config"
                     for key, value in want.items() if have.get(key) != value]
    return problems


def check_moe_settings(cfg: TrainConfig) -> None:
    """Before launch (sft): the LLM layers exist, and a start model that already has MoE matches
    the config's MoE settings (it is trained as it is: a different router would be ignored)."""
    if cfg.stage != "sft":
        return
    from ..model.placement import normalize_placement
    from ..model.presets import get_preset

    saved = _start_model_config(cfg)
    if saved.get("moe"):
        problems = moe_mismatches(cfg, saved["moe"])
        if problems:
            raise ValueError(f"sft starts from {cfg.resolved_init_from()}, which already has MoE, but the config "
                             f"asks for other MoE settings ({'; '.join(problems)}); match them, or start from a "
                             "dense (pft) model")
        return
    layers = (saved.get("text_config") or get_preset(cfg.preset).text_config).get("num_hidden_layers")
    if layers:
        normalize_placement(cfg.moe_llm_layers, "llm", layers)  # raises naming the layers out of range


def load_stage_model(cfg: TrainConfig):
    """(model, processor) for the stage, with the stage's trainable parameters set."""
    from ..model import LibMoEVLMForCausalLM, resolve_attn_implementation
    from ..model.placement import upcycle
    from ..model.presets import build_model, build_processor
    from ..model.processor import LibMoEProcessor

    source = check_init_model(cfg)
    # built in fp32, trained in training_dtype: the attention kernel is chosen for the latter
    attn = resolve_attn_implementation(None, training_dtype(cfg))
    if source is None:
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        local = {"vision_path": cfg.vision_path, "llm_path": cfg.llm_path}  # None: the preset's hub repos
        model = build_model(cfg.preset, seed=cfg.seed, attn_implementation=attn, **local)
        processor = build_processor(cfg.preset, **local)
    else:
        model = LibMoEVLMForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attn)
        processor = LibMoEProcessor.from_pretrained(source)
    if cfg.stage == "sft" and not model.config.moe:
        upcycle(
            model, moe_vision=cfg.moe_vision or None, moe_projector=cfg.moe_projector or None,
            moe_llm_layers=cfg.moe_llm_layers, router=cfg.router, num_experts=cfg.num_experts, top_k=cfg.top_k,
            balance_coef=cfg.balance_coef, z_coef=cfg.z_coef, router_options=dict(cfg.router_options), seed=cfg.seed,
        )
        if not model.config.moe:
            raise ValueError("sft needs at least one MoE placement: set moe_vision, moe_projector or moe_llm_layers")
    elif cfg.stage == "sft" and (problems := moe_mismatches(cfg, model.config.moe)):
        raise ValueError(f"the start model's MoE differs from the config: {'; '.join(problems)}")
    set_trainable(model, cfg.stage)
    return model.to(training_dtype(cfg)), processor


def set_trainable(model, stage: str) -> None:
    """pretrain: projector only; pft and sft: everything (routers' frozen parts stay frozen)."""
    if stage == "pretrain":
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        return
    from ..model.placement import freeze_fixed_router_parts

    model.requires_grad_(True)
    freeze_fixed_router_parts(model)  # e.g. the hyper router's hypernetwork, frozen by design


def trainable_summary(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable}
