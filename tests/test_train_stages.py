"""The three stages under DeepSpeed on CPU (2 processes), resume after a kill, data errors.

Each DeepSpeed test launches real processes through `libmoe train`'s launcher (the
pipeline test covers the three stages under ZeRO-2 with one process, the resume test ZeRO-2
with two; the three-stage test here runs ZeRO-3, the one with MoE leaf modules).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from libmoe_core.train import checkpoints
from libmoe_core.train.config import resolve_config
from libmoe_core.train.launch import TrainingFailed, build_command, launch, launch_env

SMALL = {"max_steps": 2, "save_steps": 2, "per_device_batch_size": 4, "global_batch_size": 8, "num_procs": 2,
         "max_samples": 64}


def metrics(stage_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}  # the last row of a step wins (resumed runs)


def load(path):
    from libmoe_core.model import LibMoEVLMForCausalLM

    return LibMoEVLMForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.slow
def test_three_stages_under_zero3(tmp_path):
    run = {"run_dir": str(tmp_path), "zero_stage": "3", **SMALL}
    pretrain = resolve_config("pretrain", overrides=run)
    launch(pretrain, on_line=lambda line: None)
    launch(resolve_config("pft", overrides={**run, "template": "phi3"}), on_line=lambda line: None)
    sft = resolve_config("sft", overrides={**run, "router": "sigmoid", "moe_projector": True, "moe_llm_layers": [1]})
    launch(sft, on_line=lambda line: None)

    # each model is saved with the chat template it trained with (pft's override reaches sft and eval)
    from libmoe_core.model.processor import LibMoEProcessor

    assert [LibMoEProcessor.from_pretrained(tmp_path / s / "final").template for s in ("pretrain", "pft")] == ["phi35", "phi3"]
    assert LibMoEProcessor.from_pretrained(sft.final_dir).template == "phi3"

    # pretrain trained the projector only: everything else is bit-identical to the start
    from libmoe_core.train.stages import load_stage_model

    start, after = load_stage_model(pretrain)[0], load(pretrain.final_dir)
    before_state, after_state = start.state_dict(), after.state_dict()
    assert before_state.keys() == after_state.keys()
    for name, value in before_state.items():
        if name.startswith("projector."):
            continue
        assert torch.equal(value, after_state[name]), f"frozen parameter {name} changed in pretrain"
    assert any(not torch.equal(before_state[n], after_state[n]) for n in before_state if n.startswith("projector."))

    # pft changed the LLM; sft holds MoE layers in all three placements and loads as an HF model
    pft = load(tmp_path / "pft" / "final")
    assert any(not torch.equal(after_state[n], v) for n, v in pft.state_dict().items() if n.startswith("language_model."))
    from transformers import AutoModelForCausalLM

    import libmoe_core.model  # noqa: F401  (registers the model type)

    moe = AutoModelForCausalLM.from_pretrained(sft.final_dir)
    assert set(moe.config.moe) == {"vision", "projector", "llm"}
    assert moe.config.moe["llm"]["router"] == "sigmoid"
    logged = metrics(sft.stage_dir)[2]
    for key in ("lm_loss", "aux/vision/balance", "aux/projector/z", "aux/llm/balance", "router/vision/balance",
                "learning_rate", "grad_norm", "tokens_per_s"):
        assert key in logged, key
    assert (sft.stage_dir / "tb").is_dir() and any((sft.stage_dir / "tb").iterdir())
    assert (sft.stage_dir / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    common = {"max_steps": 10, "save_steps": 3, "per_device_batch_size": 8, "global_batch_size": 16, "num_procs": 2,
              "max_samples": 400, "learning_rate": 3e-3}
    straight = resolve_config("pretrain", overrides={"run_dir": str(tmp_path / "a"), **common})
    assert straight.zero_stage == "2" and straight.num_procs == 2
    launch(straight, on_line=lambda line: None)

    killed = resolve_config("pretrain", overrides={"run_dir": str(tmp_path / "b"), **common})
    killed.stage_dir.mkdir(parents=True)
    killed.save(killed.stage_dir / "config.yaml")
    proc = subprocess.Popen(build_command(killed, killed.stage_dir / "config.yaml"), env=launch_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed.checkpoint_dir / "checkpoint-3" / "COMPLETE"
    deadline = time.time() + 1800
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its first checkpoint"
    assert not killed.final_dir.exists(), "the run finished before it could be killed"

    launch(killed, resume=True, on_line=lambda line: None)
    assert json.loads((killed.final_dir / "libmoe_run.json").read_text())["global_step"] == 10
    lines = (killed.stage_dir / "metrics.jsonl").read_text()
    launch(killed, resume=True, on_line=lambda line: None)  # finished: nothing more is trained
    assert (killed.stage_dir / "metrics.jsonl").read_text() == lines
    a, b = metrics(straight.stage_dir), metrics(killed.stage_dir)
    assert sorted(b) == list(range(1, 11))
    for step in range(4, 11):
        assert b[step]["lm_loss"] == pytest.approx(a[step]["lm_loss"], rel=1e-4, abs=1e-5), step
        assert b[step]["learning_rate"] == pytest.approx(a[step]["learning_rate"])
    # one row and one TensorBoard point per step: the killed attempt's steps after checkpoint-3 were trained again
    rows = [json.loads(line) for line in lines.splitlines()]
    assert sorted(r["step"] for r in rows if "lm_loss" in r) == list(range(1, 11))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed.stage_dir / "tb")).Reload()
    assert sorted(e.step for e in events.Scalars("train/lm_loss")) == list(range(1, 11))

    # killed after its last checkpoint was marked complete, before final/ was published: the resume
    # trains nothing (transformers ran one more step, to 11) and publishes that checkpoint's weights
    assert checkpoints.last_complete_checkpoint(straight.checkpoint_dir).name == "checkpoint-10"
    published = load_file(straight.final_dir / "model.safetensors")
    straight_lines = (straight.stage_dir / "metrics.jsonl").read_text()
    shutil.rmtree(straight.final_dir)
    said = []
    launch(straight, resume=True, on_line=said.append)
    assert json.loads((straight.final_dir / "libmoe_run.json").read_text())["global_step"] == 10
    assert any("nothing left to train" in line for line in said)
    assert (straight.stage_dir / "metrics.jsonl").read_text() == straight_lines  # no row for no step
    again = load_file(straight.final_dir / "model.safetensors")
    assert all(torch.equal(published[k], again[k]) for k in published)


@pytest.mark.slow
def test_bad_record_fails_with_its_id_unless_skipped(tmp_path):
    from libmoe_core.train.stages import easyvqa_dir

    root = easyvqa_dir()
    records = json.loads((root / "easyvqa_qa_train.json").read_text())[:40]
    records[5]["image"] = "train/no_such_image.png"
    records[9]["conversations"] = records[9]["conversations"][:1]  # no answer
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    run = {"run_dir": str(tmp_path), "dataset": str(data), "image_folder": str(root / "images"),
           "max_steps": 1, "per_device_batch_size": 4, "global_batch_size": 4}
    with pytest.raises(TrainingFailed) as err:
        launch(resolve_config("pretrain", overrides=run), on_line=lambda line: None)
    log = "".join(err.value.tail)
    assert records[5]["id"] in log and "no_such_image.png" in log
    assert records[9]["id"] in log
    # the message leads with the rank's exception, not only "exited with code 1"
    assert "DataValidationError" in str(err.value).splitlines()[0], str(err.value).splitlines()[0]
    assert "data_policy=skip" in log

    skipped = resolve_config("pretrain", overrides={**run, "data_policy": "skip", "run_dir": str(tmp_path / "skip")})
    lines = []
    launch(skipped, on_line=lines.append)
    assert any("skip" in line and "2" in line for line in lines), "the skip count is not logged"


def test_sft_keeps_the_routers_own_coefficients_unless_set(tmp_path):
    """The config's balance_coef / z_coef default to None: each router keeps its default (auxfree 1e-4)."""
    from libmoe_core.model.modeling import placed_moe_layers
    from libmoe_core.train.stages import load_stage_model

    dense, processor = load_stage_model(resolve_config("pretrain", overrides={"run_dir": str(tmp_path)}))
    dense.save_pretrained(tmp_path / "pft" / "final")
    processor.save_pretrained(tmp_path / "pft" / "final")
    for overrides, expected in (({}, {"balance": 1e-4, "z": 1e-3}), ({"balance_coef": 0.05, "z_coef": 0}, {"balance": 0.05, "z": 0.0})):
        cfg = resolve_config("sft", overrides={"run_dir": str(tmp_path), "router": "auxfree", **overrides})
        layers = [layer for _, _, layer in placed_moe_layers(load_stage_model(cfg)[0])]
        assert layers and all(layer.router.coefs == expected for layer in layers), overrides


def test_evaluation_batches_stay_out_of_the_training_metrics(tmp_path):
    """HF's evaluate() calls compute_loss too (model in eval mode): not a training micro-step."""
    import torch
    from transformers import TrainingArguments

    from libmoe_core.model.presets import build_model
    from libmoe_core.train.trainer import MoETrainer

    model = build_model("tiny", moe_llm_layers=[1])
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = MoETrainer(model=model, args=args)
    ids = torch.randint(20, 400, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainer.compute_loss(model.train(), inputs)
    sums = dict(trainer._sums)
    assert trainer._micro_steps == 1 and trainer._tokens == 16 and "llm/balance" in " ".join(sums)
    loss = trainer.compute_loss(model.eval(), inputs)
    assert torch.isfinite(loss)
    assert trainer._micro_steps == 1 and trainer._tokens == 16 and dict(trainer._sums) == sums


def test_loss_falls_on_a_fixed_batch(tmp_path):
    """In-process (no DeepSpeed): the MoE trainer drives the sft model's loss down on one batch."""
    from transformers import TrainingArguments

    from libmoe_core.data.collator import VLMCollator
    from libmoe_core.data.dataset import LLaVADataset
    from libmoe_core.train.stages import dataset_files, load_stage_model, stage_template
    from libmoe_core.train.trainer import MetricsFileCallback, MoETrainer, RouterScheduleCallback

    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path)})
    dense, processor = load_stage_model(cfg)
    dense.save_pretrained(tmp_path / "pft" / "final")
    processor.save_pretrained(tmp_path / "pft" / "final")
    cfg = resolve_config("sft", overrides={"run_dir": str(tmp_path), "moe_llm_layers": "all", "router": "hyper"})
    model, processor = load_stage_model(cfg)
    annotations, images = dataset_files(cfg)
    batch = LLaVADataset.from_files(annotations, images).records[:8]
    dataset = LLaVADataset(batch * 4, images)
    template = stage_template(cfg, processor)
    collator = VLMCollator(processor.tokenizer, template, lambda im: processor.preprocess_images([im])[0],
                           processor.image_token_id, processor.num_image_tokens, pad_token_id=processor.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=12,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = MoETrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                         callbacks=[RouterScheduleCallback(), MetricsFileCallback(tmp_path / "m.jsonl")])
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    lm = [r["lm_loss"] for r in rows if "lm_loss" in r]
    assert len(lm) == 12 and lm[-1] < 0.6 * lm[0], lm
    for r in rows:  # the logged loss is the mean over accumulation steps, not their sum
        if "lm_loss" in r:
            aux = sum(v for k, v in r.items() if k.startswith("aux/"))
            assert r["loss"] == pytest.approx(r["lm_loss"] + aux, rel=1e-3), r
    hyper_k = [r["hyper_k"] for r in rows if "hyper_k" in r]
    assert hyper_k[0] == 1 and hyper_k[-1] == 2, hyper_k  # k annealed from k_min to top_k by the trainer
