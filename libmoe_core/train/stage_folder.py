"""What a stage folder that already holds a run allows: a fresh start, a resume, or nothing.

Checked by ``launch`` before any process starts:

- a fresh run (no ``resume``) refuses a folder with an earlier run's checkpoints or metrics
  (its checkpoints would be taken for the new run's: rotation deleted the new ones, and a
  later resume continued the old run);
- a resume refuses a config that changed beyond :data:`RESUME_MAY_CHANGE` (the optimizer
  and scheduler state come from the checkpoint, so a new learning rate was silently ignored);
- a resume of a finished run (``final/`` written by this very config) does nothing;
- a resume without a complete checkpoint starts over, clearing the earlier run's metrics,
  TensorBoard events and incomplete checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from . import checkpoints
from .config import TrainConfig

#: Keys a resumed run may change (how long, how often to save and log, how to load).
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "save_steps", "save_total_limit", "logging_steps", "dataloader_num_workers", "hostfile",
    "gradient_checkpointing", "run_dir",
    "max_skipped_fraction",  # decides only whether loading fails, never which records are kept
    "max_consecutive_nonfinite_steps",  # decides only whether training stops: raised to resume after a stop
})
RUN_INFO = "libmoe_run.json"  # written into final/ by the runner: the config that produced it


class StageFolderError(RuntimeError):
    """The stage folder holds a run that this launch would mix with."""


def earlier_run(cfg: TrainConfig) -> list[str]:
    """What of an earlier run's training state the stage folder holds (empty: nothing)."""
    return earlier_run_in(cfg.stage_dir)


def earlier_run_in(stage_dir: Path) -> list[str]:
    found = [path.name for _, path, _ in checkpoints.checkpoints(Path(stage_dir) / "checkpoints")]
    metrics = Path(stage_dir) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append(metrics.name)
    return found


def clear_run(stage_dir: Path) -> None:
    """Delete a stage folder's training products (checkpoints, metrics, TensorBoard, final model, log)."""
    stage_dir = Path(stage_dir)
    for name in ("checkpoints", "tb", "final"):
        shutil.rmtree(stage_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml", "train.log"):
        (stage_dir / name).unlink(missing_ok=True)


def check_fresh_start(cfg: TrainConfig) -> None:
    found = earlier_run(cfg)
    if found:
        raise StageFolderError(
            f"{cfg.stage_dir} holds an earlier run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); "
            "resume it (--resume / resume=True), or start elsewhere (another run_name) or after deleting the folder"
        )


def saved_value(old: dict, key: str):
    """``key`` of a saved config; a key the kit added since is that field's default (what the run had)."""
    if key in old:
        return old[key]
    default = next(f for f in dataclasses.fields(TrainConfig) if f.name == key)
    return default.default_factory() if default.default is dataclasses.MISSING else default.default


def config_changes(old: dict, new: TrainConfig) -> list[str]:
    """Keys whose value differs between a saved config and ``new``, beyond :data:`RESUME_MAY_CHANGE`
    (a key the saved config lacks counts as the field's default; one the kit dropped is not compared)."""
    current = new.to_dict()
    keys = set(current) - RESUME_MAY_CHANGE
    return sorted(k for k in keys if saved_value(old, k) != current[k])


def check_resume_config(cfg: TrainConfig) -> None:
    """A resume must train what the checkpoint was trained with (``config.yaml`` of the last launch)."""
    saved = cfg.stage_dir / "config.yaml"
    if checkpoints.last_complete_checkpoint(cfg.checkpoint_dir) is None or not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    changed = config_changes(old, cfg)
    if changed:
        details = ", ".join(f"{k}: {saved_value(old, k)!r} -> {getattr(cfg, k, None)!r}" for k in changed)
        raise StageFolderError(
            f"cannot resume {cfg.stage_dir} with a changed config ({details}); the checkpoint's optimizer and "
            f"schedule would ignore it. Resume with the saved values, or start a new run "
            f"(a resume may change only {', '.join(sorted(RESUME_MAY_CHANGE))})"
        )


def final_changes(cfg: TrainConfig) -> list[str]:
    """How ``cfg`` differs from the config that wrote ``final/`` (``max_steps`` included: a resume may
    change it, but then there is more to train); one entry saying so when there is no final model or
    no record of its config."""
    info = cfg.final_dir / RUN_INFO
    if not (cfg.final_dir / "config.json").is_file():
        return ["(no final model)"]
    if not info.is_file():
        return [f"(no {RUN_INFO} recording the config the final model was made with)"]
    produced_by = json.loads(info.read_text()).get("config", {})
    steps = [] if saved_value(produced_by, "max_steps") == cfg.max_steps else ["max_steps"]
    return config_changes(produced_by, cfg) + steps


def finished(cfg: TrainConfig) -> bool:
    """``final/`` was written by a run of this very config (nothing left to train)."""
    return not final_changes(cfg)


def clear_for_restart(cfg: TrainConfig) -> None:
    """A resume without a complete checkpoint starts over: drop the earlier run's progress."""
    if checkpoints.last_complete_checkpoint(cfg.checkpoint_dir) is not None:
        return
    for _, path, _ in checkpoints.checkpoints(cfg.checkpoint_dir):
        shutil.rmtree(path, ignore_errors=True)
    (cfg.stage_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(cfg.stage_dir / "tb", ignore_errors=True)


def write_run_info(final_dir: Path, cfg: TrainConfig, global_step: int) -> None:
    checkpoints.write_atomic(Path(final_dir) / RUN_INFO, json.dumps({"config": cfg.to_dict(), "global_step": global_step}))
