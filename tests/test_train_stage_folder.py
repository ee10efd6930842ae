"""A stage folder that already holds a run: fresh launches refused, resumes checked, finished runs left alone.

No training here: the folder's state is made by hand, and ``launch`` runs a stand-in command
(the real resume is in test_train_stages.py).
"""

import json
import sys

import pytest

from libmoe_core.train import checkpoints
from libmoe_core.train import launch as launch_module
from libmoe_core.train.config import resolve_config
from libmoe_core.train.stage_folder import RUN_INFO, StageFolderError, write_run_info
from libmoe_core.train.stages import check_moe_settings

COMMON = {"max_steps": 6, "save_steps": 2, "per_device_batch_size": 4, "global_batch_size": 8}


@pytest.fixture
def ran(monkeypatch, tmp_path):
    """launch() with a stand-in training command that records its argv and writes final/."""
    calls = []

    def command(cfg, config_path, resume=False):
        final = cfg.final_dir
        code = (f"import pathlib; p = pathlib.Path({str(final)!r}); p.mkdir(parents=True, exist_ok=True); "
                "(p / 'config.json').write_text('{}')")
        calls.append({"resume": resume})
        return [sys.executable, "-c", code]

    monkeypatch.setattr(launch_module, "build_command", command)
    return calls


def config(tmp_path, **overrides):
    return resolve_config("pretrain", overrides={"run_dir": str(tmp_path), **COMMON, **overrides})


def earlier_run(cfg, steps=(2, 4), complete=True, metrics=True):
    """The traces of an earlier run: checkpoints, metrics, its config.yaml."""
    for step in steps:
        path = cfg.checkpoint_dir / f"checkpoint-{step}"
        path.mkdir(parents=True)
        if complete:
            checkpoints.mark_complete(path, step)
    if metrics:
        (cfg.stage_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    cfg.save(cfg.stage_dir / "config.yaml")


def test_a_fresh_launch_refuses_a_folder_holding_an_earlier_run(tmp_path, ran):
    # Before: rotation deleted the new run's checkpoints (the old ones had higher steps) and a
    # later resume continued the old run.
    cfg = config(tmp_path)
    earlier_run(cfg)
    with pytest.raises(StageFolderError, match=r"holds an earlier run \(checkpoint-2, checkpoint-4, metrics.jsonl\)"):
        launch_module.launch(cfg, on_line=lambda line: None)
    assert ran == []
    launch_module.launch(config(tmp_path / "elsewhere"), on_line=lambda line: None)  # a clean folder is fine
    assert ran == [{"resume": False}]


def test_a_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, ran):
    earlier_run(config(tmp_path))
    with pytest.raises(StageFolderError, match=r"global_batch_size: 8 -> 16, learning_rate: 0\.003 -> 1e-05"):
        launch_module.launch(config(tmp_path, learning_rate=1e-5, global_batch_size=16), resume=True,
                             on_line=lambda line: None)
    assert ran == []
    launch_module.launch(config(tmp_path, max_steps=10, save_steps=5), resume=True, on_line=lambda line: None)
    assert ran == [{"resume": True}]  # how long and how often to save may change


def test_a_resume_of_a_finished_run_does_nothing(tmp_path, ran):
    cfg = config(tmp_path)
    earlier_run(cfg, steps=(4, 6))
    cfg.final_dir.mkdir()
    (cfg.final_dir / "config.json").write_text("{}")
    write_run_info(cfg.final_dir, cfg, global_step=6)
    assert launch_module.launch(cfg, resume=True, on_line=lambda line: None) == cfg.final_dir
    assert ran == []  # before: one more step was trained and checkpointed
    # a longer run from the same checkpoints is not finished
    launch_module.launch(config(tmp_path, max_steps=8), resume=True, on_line=lambda line: None)
    assert ran == [{"resume": True}]
    assert json.loads((cfg.final_dir / RUN_INFO).read_text())["global_step"] == 6


def test_a_resume_without_a_complete_checkpoint_starts_over_cleanly(tmp_path, ran):
    cfg = config(tmp_path)
    earlier_run(cfg, steps=(2,), complete=False)
    (cfg.stage_dir / "tb").mkdir()
    launch_module.launch(cfg, resume=True, on_line=lambda line: None)
    assert ran == [{"resume": True}]
    assert not (cfg.stage_dir / "metrics.jsonl").exists() and not (cfg.stage_dir / "tb").exists()
    assert checkpoints.checkpoints(cfg.checkpoint_dir) == []


def test_sft_from_a_model_that_already_has_moe_must_match_it(tmp_path):
    from libmoe_core.model.presets import build_model

    start = tmp_path / "start"
    from libmoe_core.model.presets import build_processor

    build_model("tiny", moe_vision=True, router="smoe").save_pretrained(start)
    build_processor("tiny").save_pretrained(start)
    same = resolve_config("sft", overrides={"init_from": str(start), "router": "smoe"})
    check_moe_settings(same)
    other = resolve_config("sft", overrides={"init_from": str(start), "router": "sigmoid", "num_experts": 8, "top_k": 1,
                                             "moe_llm_layers": "all"})
    with pytest.raises(ValueError, match=r"already has MoE.*vision router: 'smoe' in the model, 'sigmoid' in the config"
                                         r".*vision num_experts: 4 in the model, 8.*llm: no MoE in the model, MoE in"):
        check_moe_settings(other)
    from libmoe_core.train.stages import load_stage_model

    with pytest.raises(ValueError, match=r"start model's MoE differs.*vision router: 'smoe' in the model"):
        load_stage_model(other)  # the worker checks too (runners/train.py run without launch)


def test_llm_layers_beyond_the_model_are_refused_before_launch(tmp_path):
    cfg = resolve_config("sft", overrides={"run_dir": str(tmp_path), "moe_llm_layers": [1, 9]})
    with pytest.raises(ValueError, match=r"llm layers \[9\] out of range"):
        check_moe_settings(cfg)
    check_moe_settings(resolve_config("sft", overrides={"run_dir": str(tmp_path), "moe_llm_layers": [1, 3]}))
