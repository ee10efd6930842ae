"""What a resume keeps and says: config keys added since, metrics rows, TensorBoard points, checkpoints used."""

import json
from types import SimpleNamespace

from libmoe_core.train import checkpoints
from libmoe_core.train.config import resolve_config
from libmoe_core.train.stage_folder import config_changes, finished
from libmoe_core.train.trainer import MetricsFileCallback, ResumableTensorBoardCallback


def test_a_key_added_to_the_kit_since_the_run_counts_as_its_default(tmp_path):
    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path)})
    saved = cfg.to_dict()
    del saved["max_skipped_fraction"]  # a config.yaml written before the key existed
    saved["a_key_the_kit_dropped"] = 1
    assert config_changes(saved, cfg) == []
    del saved["data_root"]
    cfg.data_root = "/data"  # not the default: a real change
    assert config_changes(saved, cfg) == ["data_root"]
    cfg.data_root = None
    # the skip limit only decides whether loading fails, never which records train: it may change
    cfg.max_skipped_fraction = 1.0  # what runs before the limit had
    assert config_changes(saved, cfg) == []
    # a finished stage of that older kit still counts as finished
    cfg.final_dir.mkdir(parents=True)
    (cfg.final_dir / "config.json").write_text("{}")
    (cfg.final_dir / "libmoe_run.json").write_text(json.dumps({"config": saved, "global_step": 3}))
    assert finished(cfg)


def _checkpoint(root, step, complete):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        checkpoints.mark_complete(path, step)


def test_resume_notes_name_the_checkpoint_the_incomplete_ones_and_nothing_left(tmp_path):
    assert checkpoints.resume_notes(tmp_path, 10) == ["resuming from the start (no complete checkpoint)"]
    _checkpoint(tmp_path, 5, True)
    _checkpoint(tmp_path, 10, False)
    _checkpoint(tmp_path, 3, False)  # older than the one used: rotation's business, not news
    notes = checkpoints.resume_notes(tmp_path, 20)
    assert notes == [f"resuming from {tmp_path / 'checkpoint-5'}",
                     "not using checkpoint-10: incomplete (no COMPLETE marker; the run stopped while writing it)"]
    assert checkpoints.resume_notes(tmp_path, 5)[-1] == ("checkpoint-5 is at step 5 >= max_steps 5: nothing left "
                                                         "to train, its weights become the final model")
    assert not any("nothing left" in n for n in checkpoints.resume_notes(tmp_path, -1))  # whole epochs: HF decides


def test_metrics_of_a_resumed_run_drop_the_rows_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in [1, 2, 3, 4, 5, 6, 7]))
    callback = MetricsFileCallback(path)
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=5), None, logs={"loss": 0.4})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    before = path.read_text()
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=False, global_step=0), None)
    assert path.read_text() == before  # only the main process writes
    path.write_text(before + '{"step": 6, "lo')  # the kill cut the last line short
    callback.on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=5), None)
    assert path.read_text() == before


def test_read_metrics_leaves_out_a_cut_last_line_and_names_a_bad_one(tmp_path):
    import pytest

    from libmoe_core.pipeline.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="last line is cut short"):
        assert read_metrics(path)["step"].tolist() == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not JSON"):
        read_metrics(path)


def test_tensorboard_of_a_resumed_run_hides_the_points_after_its_checkpoint(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainingArguments

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    control = SimpleNamespace()

    def attempt(start, stop, resumed_at):
        callback = ResumableTensorBoardCallback()
        state = SimpleNamespace(is_world_process_zero=True, is_hyper_param_search=False, global_step=resumed_at)
        callback.on_train_begin(args, state, control)
        for step in range(start, stop):
            callback.tb_writer.add_scalar("train/loss", step / 10, step)
        callback.tb_writer.close()

    attempt(1, 8, 0)  # killed after step 7; its last checkpoint was at step 4
    attempt(5, 11, 4)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))


def test_a_checkpoint_is_synced_to_disk_before_its_marker(tmp_path, monkeypatch):
    import os
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/fd")
    ckpt = tmp_path / "checkpoint-7"
    (ckpt / "global_step7").mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.json", "global_step7/optim_states.pt"):
        (ckpt / name).write_text("x")
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    checkpoints.mark_complete(ckpt, 7)
    marker = next(i for i, p in enumerate(synced) if p.endswith(".COMPLETE.tmp-" + str(os.getpid())))
    before = set(synced[:marker])
    for name in ("model.safetensors", "trainer_state.json", "global_step7/optim_states.pt", "global_step7", "."):
        assert str((ckpt / name).resolve()) in before, name
    assert str(ckpt.resolve()) == synced[-1]  # the rename of the marker, synced through its folder


def test_final_changes_say_what_is_missing(tmp_path):
    from libmoe_core.train.stage_folder import final_changes, write_run_info

    cfg = resolve_config("pft", overrides={"run_dir": str(tmp_path)})
    assert final_changes(cfg) == ["(no final model)"]
    cfg.final_dir.mkdir(parents=True)
    (cfg.final_dir / "config.json").write_text("{}")
    assert final_changes(cfg) == ["(no libmoe_run.json recording the config the final model was made with)"]
    write_run_info(cfg.final_dir, cfg, 4)
    assert final_changes(cfg) == []
    cfg.max_steps, cfg.learning_rate = 8, 0.5
    assert final_changes(cfg) == ["learning_rate", "max_steps"]
