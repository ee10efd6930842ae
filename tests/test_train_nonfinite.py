"""Non-finite training steps: logged as NaN, counted (``nonfinite_steps``), no router update on a skipped
step, and ``max_consecutive_nonfinite_steps`` of them in a row stop the stage before its final model.

The DeepSpeed tests run the real runner (ZeRO-2, tiny preset, one auxfree MoE layer in the LLM) in
subprocesses of this module, which injects a NaN token into the MoE layer's input from step
``NAN_FROM`` on (``always``) or at that step only (``once``), and records the router's bias and load
counts at the start of every training forward (one per step: no gradient accumulation).
"""

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ranks import run_ranks

from libmoe_core.pipeline.report import read_metrics, stage_summary
from libmoe_core.train import checkpoints
from libmoe_core.train.config import resolve_config
from libmoe_core.train.stage_folder import config_changes

REPO = Path(__file__).resolve().parents[1]
NAN_FROM = 3
STEPS = 6
RUN = {"max_steps": STEPS, "save_steps": 2, "logging_steps": 1, "per_device_batch_size": 2, "max_samples": 16,
       "router": "auxfree", "moe_vision": False, "moe_llm_layers": [1], "max_length": 128, "save_total_limit": 5}


def _worker(stage_dir: Path, mode: str) -> None:
    """One rank of a run (the environment names it); NaN injected on rank 0 only."""
    sys.path.insert(0, str(REPO / "runners"))
    import train as runner

    from libmoe_core.moe import moe_layers
    from libmoe_core.train import stages

    rank, trace, load = int(os.environ["RANK"]), [], stages.load_stage_model

    def nan_from_step(module, args):
        if not module.training:
            return None
        trace.append({"bias": module.router.selection_bias.tolist(), "load": int(module.router.load_counts.sum())})
        step = len(trace)
        if rank == 0 and (step == NAN_FROM or (mode == "always" and step > NAN_FROM)):
            x = args[0].clone()
            x.view(-1, x.shape[-1])[0, 0] = float("nan")
            return (x,)
        return None

    def patched(cfg):
        model, processor = load(cfg)
        moe_layers(model)[0][1].register_forward_pre_hook(nan_from_step)
        return model, processor

    stages.load_stage_model = patched
    try:
        runner.main(["--config", str(stage_dir / "config.yaml")])
    finally:
        (stage_dir / f"trace{rank}.json").write_text(json.dumps(trace))


def _run(tmp_path, mode: str, ranks: int = 1, **overrides):
    """Launch the stage (``ranks`` processes); (config, [(returncode, output) per rank], rank 0's trace)."""
    from libmoe_core.model.presets import build_model, build_processor

    start = tmp_path / "start"
    build_model("tiny", seed=0).save_pretrained(start)
    build_processor("tiny").save_pretrained(start)
    cfg = resolve_config("sft", overrides={**RUN, "run_dir": str(tmp_path), "init_from": str(start),
                                           "global_batch_size": 2 * ranks, "num_procs": ranks, **overrides})
    cfg.save(cfg.stage_dir / "config.yaml")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    results = run_ranks([sys.executable, __file__, str(cfg.stage_dir), mode], ranks, tmp_path,
                        env={"DS_ACCELERATOR": "cpu", "PYTHONPATH": pythonpath})
    trace = json.loads((cfg.stage_dir / "trace0.json").read_text())
    return cfg, results, trace


def _rows(stage_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_one_nan_step_is_logged_counted_and_leaves_the_router_bias_alone(tmp_path):
    cfg, [(code, output)], trace = _run(tmp_path, "once")
    assert code == 0, output[-4000:]
    assert (cfg.final_dir / "config.json").is_file()
    rows = _rows(cfg.stage_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert math.isnan(rows[NAN_FROM - 1]["loss"]) and math.isnan(rows[NAN_FROM - 1]["lm_loss"])  # not 0.0
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != NAN_FROM)  # the next windows start clean
    assert [r["nonfinite_steps"] for r in rows] == [0] * (NAN_FROM - 1) + [1] * (STEPS - NAN_FROM + 1)
    assert f"step {NAN_FROM}: non-finite " in output and "lm_loss" in output.split(f"step {NAN_FROM}: non-finite ")[1]
    # the bias moves after every applied step, not after the skipped one; every step starts with no load counted
    bias = [t["bias"] for t in trace]
    assert len(bias) == STEPS and bias[1] != bias[0] and bias[NAN_FROM - 1] != bias[NAN_FROM - 2]
    assert bias[NAN_FROM] == bias[NAN_FROM - 1], "the auxfree bias moved on the skipped step"
    assert bias[NAN_FROM + 1] != bias[NAN_FROM]
    assert [t["load"] for t in trace] == [0] * STEPS
    summary = stage_summary(cfg.stage_dir, read_metrics(cfg.stage_dir / "metrics.jsonl"))
    assert summary["non-finite steps"].tolist() == [1]


@pytest.mark.slow
def test_nan_steps_in_a_row_stop_the_stage_before_its_final_model(tmp_path):
    cfg, [(code, output)], _ = _run(tmp_path, "always", max_consecutive_nonfinite_steps=2)
    stop = NAN_FROM + 1  # the second non-finite step in a row
    assert code != 0
    assert f"training stopped at step {stop}: 2 steps in a row" in output, output[-4000:]
    assert "max_consecutive_nonfinite_steps=2" in output
    assert not cfg.final_dir.exists() and not (cfg.stage_dir / ".final-staging").exists()
    # the checkpoints before the stop stay for a resume; none is written at the stopping step
    assert checkpoints.last_complete_checkpoint(cfg.checkpoint_dir).name == "checkpoint-2"
    assert not (cfg.checkpoint_dir / f"checkpoint-{stop}").exists()
    rows = _rows(cfg.stage_dir)
    assert rows[-1]["step"] == stop and rows[-1]["nonfinite_steps"] == 2 and math.isnan(rows[-1]["loss"])


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step_when_one_rank_has_nans(tmp_path):
    cfg, results, _ = _run(tmp_path, "always", ranks=2, max_consecutive_nonfinite_steps=2)
    for rank, (code, output) in enumerate(results):
        assert code != 0 and f"training stopped at step {NAN_FROM + 1}: 2 steps" in output, (rank, output[-4000:])
    assert not cfg.final_dir.exists()


def test_max_consecutive_nonfinite_steps_is_checked_and_may_change_on_resume(tmp_path):
    base = {"run_dir": str(tmp_path)}
    for bad in (-1, 1.5, True, "ten"):
        with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps"):
            resolve_config("pretrain", overrides={**base, "max_consecutive_nonfinite_steps": bad})
    assert resolve_config("pretrain", overrides=base).max_consecutive_nonfinite_steps == 10
    cfg = resolve_config("pretrain", overrides={**base, "max_consecutive_nonfinite_steps": 0})  # 0: never stop
    saved = cfg.to_dict()
    cfg.max_consecutive_nonfinite_steps = 50  # raised to resume a stopped run
    assert config_changes(saved, cfg) == []


def test_a_nan_loss_counts_even_when_the_update_was_applied_and_the_count_survives_a_resume():
    """Without DeepSpeed nothing skips the update: the loss alone makes the step non-finite."""
    from libmoe_core.train.trainer import NonfiniteStepCallback, NonfiniteTrainingError

    args, state, control = SimpleNamespace(device="cpu"), SimpleNamespace(global_step=7, stateful_callbacks={}), \
        SimpleNamespace(should_log=False, should_save=True)
    callback = NonfiniteStepCallback(max_consecutive=2)
    callback.on_train_begin(args, state, control)
    callback.note({"aux/llm/balance"})
    callback.on_step_end(args, state, control, optimizer=None)
    assert (callback.nonfinite_steps, callback.in_a_row, control.should_save) == (1, 1, True)
    resumed = NonfiniteStepCallback(max_consecutive=2)
    resumed.on_train_begin(args, SimpleNamespace(stateful_callbacks={"NonfiniteStepCallback": callback.state()}), control)
    resumed.note({"loss"})
    resumed.on_step_end(args, SimpleNamespace(global_step=8), control, optimizer=SimpleNamespace(step_was_skipped=False))
    assert (resumed.nonfinite_steps, control.should_log, control.should_save) == (2, True, False)
    with pytest.raises(NonfiniteTrainingError, match="step 8: 2 steps in a row"):
        resumed.on_log(args, state, control, logs={"loss": float("nan")})


def test_a_checkpoint_from_before_the_callback_resumes(tmp_path):
    """trainer_state.json written before NonfiniteStepCallback existed lacks its entry, and transformers'
    checkpoint save looks every ExportableState callback up there: the resumed run's first save raised
    KeyError. The callback adds its entry (counts from 0) when training begins."""
    from transformers import TrainerControl, TrainerState

    from libmoe_core.train.trainer import NonfiniteStepCallback

    old = TrainerState(global_step=2, stateful_callbacks=[TrainerControl()])
    old.save_to_json(str(tmp_path / "trainer_state.json"))
    state = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    assert "NonfiniteStepCallback" not in state.stateful_callbacks
    callback = NonfiniteStepCallback()
    callback.on_train_begin(SimpleNamespace(device="cpu"), state, SimpleNamespace())
    # what Trainer._save_checkpoint does for each ExportableState callback
    assert not isinstance(state.stateful_callbacks["NonfiniteStepCallback"], list)
    state.stateful_callbacks["NonfiniteStepCallback"] = callback.state()
    assert callback.nonfinite_steps == 0 and callback.in_a_row == 0


def test_stage_summary_shows_nonfinite_steps_only_when_there_were_some(tmp_path):
    def summary(counts):
        path = tmp_path / "metrics.jsonl"
        path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "nonfinite_steps": n}) + "\n"
                                for s, n in enumerate(counts, 1)))
        return stage_summary(tmp_path, read_metrics(path))

    assert "non-finite steps" not in summary([0, 0, 0])
    assert summary([0, 1, 2, 2])["non-finite steps"].tolist() == [2]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
