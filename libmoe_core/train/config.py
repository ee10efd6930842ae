"""Training configuration: stage defaults, a YAML file, ``--set key=value`` overrides, validation.

Resolution order: the seed recipe's defaults for the stage (real presets) or the
tiny-preset defaults, then the config file, then ``--set`` overrides. Every value is
checked against its field's type; an unknown or ill-typed key is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STAGES = ("pretrain", "pft", "sft")
ZERO_STAGES = ("2", "3", "3-offload")
DATA_POLICIES = ("error", "skip")
PREVIOUS_STAGE = {"pretrain": None, "pft": "pretrain", "sft": "pft"}
LOCAL_MODEL_PATHS = {"vision_path": ("vision tower", "vision_hub"), "llm_path": ("language model", "llm_hub")}

# The seed's recipe (LibMoE scripts): learning rate, global batch, ZeRO for each stage.
# The seed (LibMoE) recipe; every stage in the model's chat template (LibMoE's pretrain scripts pass
# --version phi35 / phi3, so its 558K captions keep their instruction text).
SEED_RECIPE = {
    "pretrain": dict(learning_rate=1e-3, global_batch_size=256, zero_stage="2"),
    "pft": dict(learning_rate=2e-6, global_batch_size=24, zero_stage="3-offload"),
    "sft": dict(learning_rate=4e-6, global_batch_size=32, zero_stage="3"),
}
# The tiny preset on 2 CPU cores (the demo): larger learning rates, small batches, ZeRO-2,
# step counts sized so the three stages take a few minutes; one micro-batch per step (gradient
# accumulation costs a second pass of Python overhead per step: 0.39 s vs 0.24 s measured).
TINY_RECIPE = {
    "pretrain": dict(learning_rate=3e-3, global_batch_size=32, per_device_batch_size=32, zero_stage="2",
                     max_length=256, max_steps=120, template="plain"),  # LLaVA-1.5's image + caption format
    "pft": dict(learning_rate=1e-3, global_batch_size=32, per_device_batch_size=32, zero_stage="2",
                max_length=256, max_steps=160),
    "sft": dict(learning_rate=1e-3, global_batch_size=32, per_device_batch_size=32, zero_stage="2",
                max_length=256, max_steps=820),
}


@dataclass
class TrainConfig:
    """Everything one training stage needs. Paths are strings so the config is plain YAML."""

    stage: str = "sft"
    stage_tag: str | None = None  # e.g. the router, to keep several sft runs side by side
    preset: str = "tiny"
    # local copies of a hub preset's vision tower and LLM (a folder as `hf download REPO
    # --local-dir DIR` writes it) instead of the preset's hub repos; used where the stage builds its
    # model from the preset (pretrain, unless init_from); the saved models after it need neither
    vision_path: str | None = None
    llm_path: str | None = None
    run_dir: str = "runs/default"
    # data: "easyvqa" (the embedded dataset, built on first use), a manifest (a name listed by
    # `libmoe data list`, or a .yaml file) prepared under data_root, or a LLaVA-format JSON/JSONL path
    dataset: str = "easyvqa"
    data_root: str | None = None  # the --root of `libmoe data prepare`; only with a manifest
    image_folder: str | None = None  # default: the manifest's image folder under data_root
    data_policy: str = "error"
    max_skipped_fraction: float = 0.1  # skip policy: dropping a larger share of the records is an error
    decode_images: bool = False  # check images by decoding every pixel (catches truncated JPEGs; slower)
    max_samples: int | None = None
    template: str | None = None
    max_length: int = 2048
    # model: the previous stage's final model unless given
    init_from: str | None = None
    # optimisation (seed defaults: 1 epoch, cosine, 3 % warmup, weight decay 0)
    learning_rate: float = 4e-6
    global_batch_size: int = 32
    per_device_batch_size: int = 4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"  # a transformers SchedulerType needing no extra kwargs nor evaluation
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"  # auto: bf16 on a GPU with native bf16 (Ampere+), else fp32 (CPU, V100, T4)
    gradient_checkpointing: bool = False
    # distribution
    zero_stage: str = "2"
    num_procs: int = 1
    hostfile: str | None = None
    # checkpoints and logging
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 1
    # stop (no final model; checkpoints kept) after this many steps in a row with a NaN/inf loss or
    # gradients (DeepSpeed skips their updates); 0: never stop, only count them (nonfinite_steps)
    max_consecutive_nonfinite_steps: int = 10
    dataloader_num_workers: int = 0
    group_by_modality_length: bool = True  # LLaVA's length-grouped batches, image and text-only apart
    # MoE (sft stage): placements, router and sizes
    router: str = "smoe"
    num_experts: int = 4
    top_k: int = 2
    moe_vision: bool = True
    moe_projector: bool = False
    moe_llm_layers: typing.Any = None  # None | "all" | "every_other" | "second_half" | list[int]
    balance_coef: float | None = None  # None: the router's default (0.01; auxfree 1e-4)
    z_coef: float | None = None  # None: the router's default (0.001)
    router_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in LOCAL_MODEL_PATHS:  # a `~` no shell expanded (YAML, notebook parameters, a quoted --set)
            if isinstance(getattr(self, name), str):
                setattr(self, name, os.path.expanduser(getattr(self, name)))

    # ---- derived
    @property
    def stage_dir(self) -> Path:
        return Path(self.run_dir) / (self.stage if not self.stage_tag else f"{self.stage}-{self.stage_tag}")

    @property
    def final_dir(self) -> Path:
        return self.stage_dir / "final"

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            message = (
                f"global_batch_size={self.global_batch_size} is not divisible by per_device_batch_size "
                f"({self.per_device_batch_size}) x world size ({world_size}) = {per_step}; "
                f"choose a global batch that is a multiple of {per_step}"
            )
            if self.global_batch_size % world_size == 0:  # a per-device batch dividing global / world fits
                per_rank = self.global_batch_size // world_size
                # the largest divisor of the per-rank batch not above the current per-device batch
                # (so a micro-batch never grows), gradient accumulation making up the rest
                fit = max(d for d in range(1, min(per_rank, self.per_device_batch_size) + 1) if per_rank % d == 0)
                message += (
                    f", or a per_device_batch_size that divides {self.global_batch_size} / {world_size} = {per_rank}"
                    f" (e.g. per_device_batch_size={fit})"
                )
            else:
                message += f" (no per_device_batch_size fits: {self.global_batch_size} is not divisible by world size {world_size})"
            raise ValueError(message)
        return self.global_batch_size // per_step

    def resolved_init_from(self) -> str | None:
        """The model this stage starts from (None: built from the preset)."""
        if self.init_from:
            return self.init_from
        previous = PREVIOUS_STAGE[self.stage]
        return None if previous is None else str(Path(self.run_dir) / previous / "final")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value):
    """Check ``value`` against the type of field ``name``; error names the field."""
    if name not in _FIELDS:
        known = ", ".join(sorted(_FIELDS))
        raise ValueError(f"unknown training config key {name!r}; known keys: {known}")
    hint = typing.get_type_hints(TrainConfig)[name]
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if typing.Any in allowed:
        return value
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if kind in (bool, dict) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"training config key {name!r} must be {names}, got {value!r}")


def parse_overrides(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict; values parsed as YAML scalars/lists (``top_k=2``, ``moe_llm_layers=[0,2]``)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def resolve_config(stage: str, config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Stage defaults, then ``config_file``, then ``overrides``; validated."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    values: dict = {}
    if config_file:
        loaded = _load_config_file(config_file)
        if stage == "sft" and loaded.get("stage_tag") and loaded.get("stage_tag") == _router_tag(loaded.get("router")):
            del loaded["stage_tag"]  # a saved config's default tag: the (possibly overridden) router decides
        values.update(loaded)
    values.update(overrides or {})
    from ..model.presets import get_preset

    preset = values.get("preset", TrainConfig.preset)
    get_preset(preset)  # an unknown preset is an error, not the seed recipe's defaults
    defaults = dict(TINY_RECIPE if preset == "tiny" else SEED_RECIPE)[stage]
    merged = {**defaults, **values, "stage": stage}
    if stage == "sft" and not merged.get("stage_tag"):
        merged["stage_tag"] = _router_tag(merged.get("router", TrainConfig.router))  # one sft folder per router
    try:
        cfg = TrainConfig(**{k: _coerce(k, v) for k, v in merged.items()})
        validate(cfg)
    except ValueError as err:
        from_file = set(loaded) - set(overrides or {}) if config_file else set()
        if any(repr(key) in str(err) or str(err).startswith(key) for key in from_file):
            raise ValueError(f"{config_file}: {err}") from None  # the bad value came from this file
        raise
    return cfg


def _load_config_file(path: str) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"training config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a training config must be a mapping of keys to values")  # noqa: TRY004
    return loaded


def _router_tag(router) -> str:
    """The sft folder tag of a router: its canonical name (``smoe_sigmoidgating`` -> ``sigmoid``)."""
    from ..moe import resolve_router_name

    try:
        return resolve_router_name(router or TrainConfig.router)
    except (KeyError, ValueError):
        return str(router)  # validate() reports the unknown router


def _check_llm_layers(value) -> None:
    """``moe_llm_layers``' form (the range is checked against the model before launch)."""
    from ..model.placement import LAYER_SHORTCUTS, SPEC_DEFAULTS

    layers = value.get("layers", "all") if isinstance(value, dict) else value
    if isinstance(value, dict) and set(value) - set(SPEC_DEFAULTS):
        raise ValueError(f"moe_llm_layers: unknown field(s) {sorted(set(value) - set(SPEC_DEFAULTS))}; "
                         f"known: {sorted(SPEC_DEFAULTS)}")
    if layers is None or isinstance(layers, bool) or layers in LAYER_SHORTCUTS:
        return
    if not isinstance(layers, list) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise ValueError(f"moe_llm_layers must be None, true, one of {LAYER_SHORTCUTS}, a non-empty list of layer "
                         f"indices >= 0 or a placement dict, got {value!r}")


def _scheduler_problem(name: str) -> str | None:
    """Why transformers' scheduler ``name`` cannot train a stage as launched (None: it can).

    Training passes no ``lr_scheduler_kwargs`` and evaluates nothing: the scheduler is built here
    on a dummy optimizer, as the trainer builds it, so one that needs more arguments, or steps on
    an evaluation metric, is refused before launch rather than inside the launched ranks."""
    import torch
    from transformers import optimization

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        scheduler = optimization.get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)
    except (TypeError, ValueError) as err:  # e.g. min_lr, num_decay_steps: only lr_scheduler_kwargs give them
        return f"it needs scheduler arguments that training does not pass: {err}"
    on_metric = tuple(c for c in (torch.optim.lr_scheduler.ReduceLROnPlateau, getattr(optimization, "GreedyLR", None)) if c)
    if isinstance(scheduler, on_metric):  # transformers steps these with evaluate()'s metric
        return "it steps on an evaluation metric, and training stages do not evaluate"
    return None


def _check_scheduler(name: str) -> None:
    from transformers import SchedulerType

    known = [s.value for s in SchedulerType]
    problem = _scheduler_problem(name) if name in known else None
    if name in known and problem is None:
        return
    accepted = [s for s in known if _scheduler_problem(s) is None]
    reason = f" ({problem})" if problem else ""
    raise ValueError(f"lr_scheduler_type must be one of {accepted}, got {name!r}{reason}")


def _check_data(cfg: TrainConfig) -> None:
    from .stages import manifest_of

    try:
        manifest = manifest_of(cfg.dataset)
    except ValueError as err:  # a .yaml that is not a manifest
        raise ValueError(f"dataset: {err}") from None
    if manifest is not None and not cfg.data_root:
        raise ValueError(f"dataset {cfg.dataset!r} is a manifest: set data_root to the folder `libmoe data prepare "
                         f"{manifest.name} --root DIR` filled")
    if manifest is None and cfg.data_root:
        raise ValueError(f"data_root is for a prepared manifest (`libmoe data list`); dataset {cfg.dataset!r} "
                         f"is {'built in' if cfg.dataset == 'easyvqa' else 'a file: give image_folder for its images'}")


def _check_local_model_paths(cfg: TrainConfig) -> None:
    """``vision_path`` / ``llm_path``: only for a preset with hub weights; where the stage builds its model
    from the preset, each one given must be a model folder on this machine, where a single-node run's ranks
    load it (with a hostfile every node needs the same folders, as it needs the data). A stage that starts
    from a saved model does not use them (a config file shared by the stages may keep them)."""
    from ..model.presets import PRESETS, get_preset

    given = [name for name in LOCAL_MODEL_PATHS if getattr(cfg, name) is not None]
    if not given:
        return
    preset = get_preset(cfg.preset)
    if preset.vision_hub is None:
        hub = ", ".join(name for name, p in PRESETS.items() if p.vision_hub is not None)
        raise ValueError(f"preset {cfg.preset!r} has no pretrained weights; vision_path/llm_path apply to hub presets "
                         f"({hub}): leave {' and '.join(given)} unset")
    if cfg.resolved_init_from() is not None:
        return  # the stage starts from a saved model: the preset's towers are not loaded
    for name in given:
        what, hub = LOCAL_MODEL_PATHS[name]
        path = Path(getattr(cfg, name))
        if not path.is_dir():
            raise ValueError(f"{name}: no folder {path} (a local copy of the {what} {getattr(preset, hub)}, e.g. from "
                             f"`hf download {getattr(preset, hub)} --local-dir DIR`; unset: the hub or "
                             "the HF cache)")
        if not (path / "config.json").is_file():
            raise ValueError(f"{name}: {path} holds no config.json (give the folder of a downloaded copy of "
                             f"{getattr(preset, hub)}, the one with config.json and the weights)")


def validate(cfg: TrainConfig) -> None:
    """Value checks beyond types; each error names the field."""
    _check_data(cfg)
    _check_local_model_paths(cfg)
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    if cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {cfg.zero_stage!r}")
    if cfg.data_policy not in DATA_POLICIES:
        raise ValueError(f"data_policy must be one of {DATA_POLICIES}, got {cfg.data_policy!r}")
    if not 0 <= cfg.max_skipped_fraction <= 1:
        raise ValueError(f"max_skipped_fraction must be in [0, 1], got {cfg.max_skipped_fraction!r}")
    limit = cfg.max_consecutive_nonfinite_steps
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"max_consecutive_nonfinite_steps must be an integer >= 1, or 0 (never stop), got {limit!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    for name in ("learning_rate", "global_batch_size", "per_device_batch_size", "num_procs", "num_experts", "top_k",
                 "logging_steps", "save_steps", "max_length"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)!r}")
    if not math.isfinite(cfg.learning_rate):
        raise ValueError(f"learning_rate must be a finite number > 0, got {cfg.learning_rate!r}")
    if not (math.isfinite(cfg.num_train_epochs) and cfg.num_train_epochs > 0):
        raise ValueError(f"num_train_epochs must be > 0, got {cfg.num_train_epochs!r} (max_steps > 0 overrides it)")
    for name in ("balance_coef", "z_coef"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0 or None (the router's default), got {getattr(cfg, name)!r}")
    for name in ("weight_decay", "max_grad_norm", "dataloader_num_workers"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.template is not None:
        from ..data.templates import get_template

        try:
            get_template(cfg.template)
        except ValueError as err:
            raise ValueError(f"template: {err}") from None
    if cfg.save_total_limit < 1:
        raise ValueError(f"save_total_limit must be >= 1 (resuming needs a checkpoint), got {cfg.save_total_limit!r}")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None (all records), got {cfg.max_samples!r}")
    _check_scheduler(cfg.lr_scheduler_type)
    _check_llm_layers(cfg.moe_llm_layers)
    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"max_steps must be -1 (whole epochs) or > 0, got {cfg.max_steps!r}")
    if cfg.stage == "sft" and not (cfg.moe_vision or cfg.moe_projector or cfg.moe_llm_layers not in (None, False, [])):
        raise ValueError("sft needs at least one MoE placement: moe_vision, moe_projector or moe_llm_layers")
    if cfg.top_k > cfg.num_experts:
        raise ValueError(f"top_k={cfg.top_k} exceeds num_experts={cfg.num_experts}")
    from ..model.placement import placement_router_options
    from ..moe import check_router_options

    # an unknown router lists the known ones; the router's own checks run on a small copy of it,
    # with the model-wide sizes where a placement uses them (the llm placement's own ones below)
    llm_spec = isinstance(cfg.moe_llm_layers, dict)  # a placement dict ({} too: all layers, model-wide settings)
    llm = cfg.moe_llm_layers if llm_spec else {}
    model_wide_used = cfg.moe_vision or cfg.moe_projector or (bool(cfg.moe_llm_layers) and not llm_spec)
    sizes = dict(num_experts=cfg.num_experts, top_k=cfg.top_k) if model_wide_used else {}
    check_router_options(cfg.router, cfg.router_options, "router, router_options", **sizes,
                         balance_coef=cfg.balance_coef, z_coef=cfg.z_coef)
    if llm_spec:  # the llm placement's router, options and sizes, its own or inherited
        check_router_options(llm.get("router", cfg.router), placement_router_options(llm, cfg.router, cfg.router_options),
                             where="moe_llm_layers", num_experts=llm.get("num_experts", cfg.num_experts),
                             top_k=llm.get("top_k", cfg.top_k), balance_coef=llm.get("balance_coef", cfg.balance_coef),
                             z_coef=llm.get("z_coef", cfg.z_coef))
    if not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {cfg.seed!r}")
    if not cfg.hostfile:
        cfg.gradient_accumulation_steps(cfg.num_procs)
    elif (slots := hostfile_slots(cfg.hostfile)) is not None:  # the launcher runs one process per slot
        try:
            cfg.gradient_accumulation_steps(slots)
        except ValueError as err:
            raise ValueError(f"{err} (world size: the slots of hostfile {cfg.hostfile})") from None
    # else: the launcher reads the hostfile (where this process may not see it) and the ranks check the batch


def hostfile_slots(path: str) -> int | None:
    """The processes a DeepSpeed hostfile launches (``host slots=N`` lines, ``#`` comments); None when it
    is not readable here or not in that form (the launcher reports that)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    slots = [re.match(r"^\S+\s+slots=(\d+)", line.strip()) for line in lines
             if line.strip() and not line.strip().startswith("#")]
    return sum(int(m.group(1)) for m in slots) if slots and all(slots) else None
