"""What a stage notebook calls: validate its parameters, run the stage with a progress bar."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from ..train.config import TrainConfig, resolve_config
from ..train.launch import TrainingFailed, launch
from ..train.trainer import PROGRESS_PREFIX

# Notebook parameter -> training config key (None values mean "the stage recipe's default").
PARAMETER_KEYS = {
    "preset": "preset", "dataset": "dataset", "data_root": "data_root", "image_folder": "image_folder",
    "router": "router",
    "num_experts": "num_experts", "top_k": "top_k", "moe_vision": "moe_vision", "moe_projector": "moe_projector",
    "moe_llm_layers": "moe_llm_layers", "global_batch_size": "global_batch_size",
    "per_device_batch_size": "per_device_batch_size", "learning_rate": "learning_rate", "max_steps": "max_steps",
    "num_train_epochs": "num_train_epochs", "num_procs": "num_procs", "zero_stage": "zero_stage",
    "input_model": "init_from", "max_samples": "max_samples", "seed": "seed", "save_steps": "save_steps",
    "balance_coef": "balance_coef", "z_coef": "z_coef", "max_length": "max_length",
    "vision_path": "vision_path", "llm_path": "llm_path",
}
NON_CONFIG_PARAMETERS = {"run_name", "runs_root", "stage_tag", "resume"}
# Only the sft stage upcycles to MoE; pretrain and pft refuse these (they would be recorded, unused).
MOE_PARAMETERS = {"router", "num_experts", "top_k", "moe_vision", "moe_projector", "moe_llm_layers", "balance_coef",
                  "z_coef"}
# Only the pretrain stage builds its model from the preset; pft and sft start from a saved model and refuse these.
PRESET_WEIGHTS_PARAMETERS = {"vision_path", "llm_path"}


def notebook_parameters(namespace: dict) -> dict:
    """Every parameter in a notebook's namespace: each name its ``parameters`` cell or papermill's injected
    cell bound, known or not, so that a misspelt ``-p max_step 2`` reaches :func:`stage_config` and is
    reported. Left out: IPython's own names, private names, ``papermill --inject-paths``' ``PAPERMILL_*``
    names, and values papermill cannot inject (modules,
    functions, a later cell's ``cfg``), so re-running the cell in Jupyter works."""
    from IPython import get_ipython

    hidden = getattr(get_ipython(), "user_ns_hidden", {})
    injectable = (type(None), bool, int, float, str, list, dict)
    return {k: v for k, v in namespace.items()
            if k not in hidden and not k.startswith(("_", "PAPERMILL_")) and isinstance(v, injectable)}


def stage_config(stage: str, **params) -> TrainConfig:
    """Validated config for ``stage`` from notebook parameters; errors name the bad parameter."""
    unknown = sorted(set(params) - set(PARAMETER_KEYS) - NON_CONFIG_PARAMETERS)
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; known: {sorted(set(PARAMETER_KEYS) | NON_CONFIG_PARAMETERS)}")
    moe = sorted(k for k in set(params) & MOE_PARAMETERS if params[k] is not None)
    if stage != "sft" and moe:
        raise ValueError(f"parameter(s) {moe} are for the sft stage (MoE); {stage} trains a dense model")
    local = sorted(k for k in set(params) & PRESET_WEIGHTS_PARAMETERS if params[k] is not None)
    if stage != "pretrain" and local:
        raise ValueError(f"parameter(s) {local} are for the pretrain stage, which builds the model from the preset's "
                         f"weights; {stage} starts from a saved model (input_model, default: the previous stage's)")
    if not isinstance(params.get("resume", False), bool):  # papermill -p keeps "false" a (true) string
        raise ValueError(f"parameter 'resume' must be True or False, got {params['resume']!r}")  # noqa: TRY004
    run_name = params.get("run_name", "default")
    if not isinstance(run_name, str) or not run_name or "/" in run_name:
        raise ValueError(f"parameter 'run_name' must be a folder name, got {run_name!r}")
    overrides = {"run_dir": str(Path(params.get("runs_root") or "runs") / run_name)}
    if params.get("stage_tag"):
        overrides["stage_tag"] = params["stage_tag"]  # sft defaults to the router's name
    for name, key in PARAMETER_KEYS.items():
        if params.get(name) is not None:
            overrides[key] = params[name]
    if isinstance(overrides.get("zero_stage"), int):
        overrides["zero_stage"] = str(overrides["zero_stage"])
    try:
        return resolve_config(stage, overrides=overrides)
    except ValueError as err:
        reverse = {v: k for k, v in PARAMETER_KEYS.items()}
        message = str(err)
        for key, name in reverse.items():
            message = message.replace(f"'{key}'", f"'{name}'") if key != name else message
        raise ValueError(f"bad notebook parameter: {message}") from None


def run_stage(cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> Path:
    """Launch the stage; a tqdm bar follows its steps; on failure the last log lines are printed."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=cfg.stage_dir.name, unit="step", disable=not show_progress)
    tail: deque[str] = deque(maxlen=60)

    def on_line(line: str) -> None:
        if line.startswith(PROGRESS_PREFIX):
            record = json.loads(line[len(PROGRESS_PREFIX):])
            bar.total = record.get("max_steps") or bar.total
            bar.n = record["step"]
            bar.set_postfix(loss=record.get("lm_loss") or record.get("loss"))
            bar.refresh()
        elif line.startswith("libmoe: "):  # waiting for a busy folder, nothing left to train
            print(line, end="", flush=True)
        else:
            tail.append(line)

    try:
        return launch(cfg, resume=resume, on_line=on_line)
    except TrainingFailed as err:
        print("".join(err.tail[-40:]))
        raise
    finally:
        bar.close()
