"""Training config resolution, validation, DeepSpeed configs and atomic checkpoint bookkeeping."""

import json
from functools import partial

import pytest
import yaml

from libmoe_core.train import checkpoints
from libmoe_core.train.config import SEED_RECIPE, parse_overrides, resolve_config
from libmoe_core.train.launch import build_command, deepspeed_config


def test_seed_recipe_defaults_for_real_presets():
    for stage, expected in SEED_RECIPE.items():
        cfg = resolve_config(stage, overrides={"preset": "siglip224-phi35", "per_device_batch_size": 4,
                                                "global_batch_size": expected["global_batch_size"]})
        assert cfg.learning_rate == expected["learning_rate"]
        assert cfg.zero_stage == expected["zero_stage"]
        assert (cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.num_train_epochs, cfg.weight_decay) == ("cosine", 0.03, 1.0, 0.0)


def test_file_then_overrides(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("router: cosine\ntop_k: 1\nlearning_rate: 0.01\n")
    cfg = resolve_config("sft", str(f), parse_overrides(["router=sigmoid", "moe_llm_layers=[0, 1]", "max_steps=2"]))
    assert (cfg.router, cfg.top_k, cfg.learning_rate, cfg.moe_llm_layers, cfg.max_steps) == ("sigmoid", 1, 0.01, [0, 1], 2)
    assert resolve_config("sft", overrides=parse_overrides(["learning_rate=3e-3"])).learning_rate == 0.003
    assert cfg.stage_dir.name == "sft-sigmoid"  # one sft folder per router
    assert resolve_config("sft", overrides={"stage_tag": "x"}).stage_dir.name == "sft-x"
    assert resolve_config("pft").stage_dir.name == "pft"


def test_gradient_accumulation_is_derived_and_checked():
    cfg = resolve_config("sft", overrides={"global_batch_size": 32, "per_device_batch_size": 4})
    assert cfg.gradient_accumulation_steps(2) == 4
    with pytest.raises(ValueError, match="not divisible") as err:
        resolve_config("sft", overrides={"global_batch_size": 30, "per_device_batch_size": 4, "num_procs": 2})
    # both fixes: another global batch, or a per-device batch dividing 30 / 2 = 15 (the largest not above 4: 3)
    assert "a multiple of 8, or a per_device_batch_size that divides 30 / 2 = 15 (e.g. per_device_batch_size=3)" in str(err.value)


@pytest.mark.parametrize("global_batch,per_device,world,suggestion", [
    (32, 32, 2, "divides 32 / 2 = 16 (e.g. per_device_batch_size=16)"),  # the tiny recipe on 2 processes
    (24, 16, 1, "divides 24 / 1 = 24 (e.g. per_device_batch_size=12)"),
    (24, 5, 2, "divides 24 / 2 = 12 (e.g. per_device_batch_size=4)"),
    (12, 8, 3, "divides 12 / 3 = 4 (e.g. per_device_batch_size=4)"),
])
def test_batch_error_suggests_a_per_device_batch_that_divides(global_batch, per_device, world, suggestion):
    cfg = resolve_config("sft", overrides={"global_batch_size": global_batch, "per_device_batch_size": 1})
    cfg.per_device_batch_size = per_device
    with pytest.raises(ValueError, match="not divisible") as err:
        cfg.gradient_accumulation_steps(world)
    assert suggestion in str(err.value)
    fit = int(suggestion.rsplit("=", 1)[1].rstrip(")"))
    cfg.per_device_batch_size = fit
    assert cfg.gradient_accumulation_steps(world) * fit * world == global_batch  # the suggestion works


def test_batch_error_without_a_per_device_fix_says_so():
    cfg = resolve_config("sft", overrides={"global_batch_size": 32, "per_device_batch_size": 4})
    with pytest.raises(ValueError, match=r"multiple of 12 \(no per_device_batch_size fits: 32 is not divisible by world size 3\)"):
        cfg.gradient_accumulation_steps(3)


@pytest.mark.parametrize("key,value,needle", [
    ("learning_rat", 1.0, "unknown training config key 'learning_rat'"),
    ("top_k", "two", "'top_k' must be int"),
    ("zero_stage", "4", "zero_stage must be one of"),
    ("router", "nope", "unknown router 'nope'"),
    ("data_policy", "ignore", "data_policy"),
    ("top_k", 9, "top_k=9 exceeds num_experts"),
    ("max_steps", 0, "max_steps"),
    ("balance_coef", -0.01, "balance_coef must be >= 0 or None"),
    ("z_coef", "lots", "'z_coef' must be float or NoneType"),
])
def test_bad_values_name_the_field(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_config("sft", overrides={key: value})


def test_unknown_stage_and_bad_set_syntax():
    with pytest.raises(ValueError, match="unknown stage"):
        resolve_config("finetune")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["router"])


def test_init_from_follows_the_pipeline():
    assert resolve_config("pretrain").resolved_init_from() is None
    assert resolve_config("sft", overrides={"run_dir": "r"}).resolved_init_from() == "r/pft/final"
    assert resolve_config("sft", overrides={"init_from": "m"}).resolved_init_from() == "m"


def test_deepspeed_configs_shipped():
    assert deepspeed_config("2")["zero_optimization"]["stage"] == 2
    z3 = deepspeed_config("3")["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    off = deepspeed_config("3-offload")
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert all(deepspeed_config(z)["optimizer"]["params"]["torch_adam"] for z in ("2", "3", "3-offload"))
    with pytest.raises(ValueError, match="zero stage"):
        deepspeed_config("1")


def test_launcher_command(tmp_path):
    cfg = resolve_config("sft", overrides={"num_procs": 2, "per_device_batch_size": 4, "global_batch_size": 8})
    cmd = build_command(cfg, tmp_path / "c.yaml", resume=True)
    assert cmd[0].endswith("deepspeed") and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[-3:] == ["--config", str(tmp_path / "c.yaml"), "--resume"]
    cfg.hostfile = "hosts.txt"
    assert "--hostfile" in build_command(cfg, tmp_path / "c.yaml")


def test_checkpoint_marker_and_rotation(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4, 6):
        checkpoints.mark_complete(tmp_path / f"checkpoint-{step}", step)
    # checkpoint-8 was being written when the run died: it must not count
    assert checkpoints.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert json.loads((tmp_path / "checkpoint-6" / "COMPLETE").read_text())["step"] == 6
    removed = checkpoints.rotate(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert [s for s, _, _ in checkpoints.checkpoints(tmp_path)] == [4, 6, 8]
    checkpoints.unmark(tmp_path / "checkpoint-6")
    assert checkpoints.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert checkpoints.last_complete_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize(("overrides", "message"), [
    ({"preset": "Tiny"}, "unknown preset 'Tiny'"),  # was: the seed recipe's lr / ZeRO / length, silently
    ({"num_train_epochs": 0}, "num_train_epochs must be > 0"),  # was: 0 steps and the start model published
    ({"num_train_epochs": -1}, "num_train_epochs must be > 0"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite"),
    ({"max_samples": -5}, "max_samples must be >= 1"),  # was: all records but the last 5
    ({"max_samples": 0}, "max_samples must be >= 1"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"dataloader_num_workers": -2}, "dataloader_num_workers must be >= 0"),
    ({"save_total_limit": 0}, "save_total_limit must be >= 1"),
    ({"lr_scheduler_type": "cosinee"}, "lr_scheduler_type must be one of"),  # was: an error in the worker
    ({"moe_llm_layers": "evry_other"}, "moe_llm_layers must be"),
    ({"moe_llm_layers": 3.5}, "moe_llm_layers must be"),
    ({"moe_llm_layers": [0.5, 2]}, "moe_llm_layers must be"),
    ({"moe_llm_layers": [True]}, "moe_llm_layers must be"),
    ({"moe_llm_layers": {"layers": "all", "topk": 1}}, "unknown field"),
    ({"template": "phi-3"}, "template: unknown conversation template 'phi-3'"),  # was: an error in the worker
    ({"max_skipped_fraction": 1.5}, r"max_skipped_fraction must be in \[0, 1\]"),
])
def test_bad_values_are_refused_before_launch(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("sft", overrides=overrides)


def test_good_llm_layer_forms_pass():
    for value in (None, True, False, "all", "every_other", "second_half", [0, 2], {"layers": [1], "top_k": 1}):
        assert resolve_config("sft", overrides={"moe_llm_layers": value}).moe_llm_layers == value


def test_a_saved_config_reused_with_another_router_gets_that_routers_folder(tmp_path):
    saved = resolve_config("sft", overrides={"router": "smoe", "run_dir": str(tmp_path)})
    saved.save(tmp_path / "config.yaml")
    again = resolve_config("sft", str(tmp_path / "config.yaml"), {"router": "sigmoid"})
    assert again.stage_dir.name == "sft-sigmoid"  # was sft-smoe: it would overwrite the smoe run
    assert resolve_config("sft", str(tmp_path / "config.yaml")).stage_dir.name == "sft-smoe"
    # a LibMoE alias names the folder after our router, where the pipeline and eval look
    assert resolve_config("sft", overrides={"router": "smoe_sigmoidgating"}).stage_dir.name == "sft-sigmoid"
    # an explicit tag of one's own is kept
    tagged = resolve_config("sft", overrides={"router": "smoe", "stage_tag": "mine", "run_dir": str(tmp_path)})
    tagged.save(tmp_path / "tagged.yaml")
    assert resolve_config("sft", str(tmp_path / "tagged.yaml"), {"router": "cosine"}).stage_dir.name == "sft-mine"


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("top_k: two\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: training config key 'top_k' must be int"):
        resolve_config("sft", str(f))
    with pytest.raises(FileNotFoundError, match="training config file not found"):
        resolve_config("sft", str(tmp_path / "missing.yaml"))
    f.write_text("top_k: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML"):
        resolve_config("sft", str(f))


def test_libmoe_train_reports_config_errors_without_a_traceback(tmp_path, capsys):
    from libmoe_core.cli import main

    assert main(["train", "--stage", "sft", "--set", "top_k=two"]) == 2
    assert "libmoe train: error: training config key 'top_k' must be int" in capsys.readouterr().err
    assert main(["train", "--stage", "sft", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "training config file not found" in capsys.readouterr().err


def test_build_easyvqa_refuses_a_non_positive_image_count(tmp_path, capsys):
    from libmoe_core.cli import main

    for n in ("0", "-3"):  # 0 built the whole dataset, -3 all but the last 3 images
        assert main(["data", "build-easyvqa", str(tmp_path / "out"), "--max-images", n]) == 2
        assert "max_images must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_model_is_saved_with_the_template_it_trained_with():
    """Evaluation and the next stage prompt in the saved processor's template: an override must reach it
    (it was used for training only, and evaluation prompted in the preset's template)."""
    from types import SimpleNamespace

    from libmoe_core.train.stages import saved_template, stage_template

    processor = SimpleNamespace(template="phi35")
    pft = resolve_config("pft", overrides={"template": "chatml"})
    assert stage_template(pft, processor) == saved_template(pft, processor) == "chatml"
    sft = resolve_config("sft")
    assert stage_template(sft, processor) == saved_template(sft, processor) == "phi35"
    pretrain = resolve_config("pretrain")  # tiny: plain captions; later stages keep the chat template
    assert (stage_template(pretrain, processor), saved_template(pretrain, processor)) == ("plain", "phi35")
    # the real presets pretrain in the chat template, as LibMoE's scripts do (--version phi35)
    libmoe = resolve_config("pretrain", overrides={"preset": "siglip224-phi35"})
    assert stage_template(libmoe, processor) == saved_template(libmoe, processor) == "phi35"
    chat_pretrain = resolve_config("pretrain", overrides={"template": "chatml"})  # a chat is kept, any stage
    assert stage_template(chat_pretrain, processor) == saved_template(chat_pretrain, processor) == "chatml"
    plain_sft = resolve_config("sft", overrides={"template": "plain"})
    assert (stage_template(plain_sft, processor), saved_template(plain_sft, processor)) == ("plain", "phi35")


def test_the_schedulers_validate_accepts_are_the_ones_a_stage_can_train_with(tmp_path):
    """Oracle: transformers' own Trainer building the scheduler from the TrainingArguments a stage passes
    (lr_scheduler_type, a warmup ratio, no lr_scheduler_kwargs, no evaluation). It was: min_lr, wsd and the
    metric-driven schedulers passed validate() and failed inside the launched ranks."""
    from torch import nn
    from transformers import SchedulerType, Trainer, TrainingArguments

    def trains(name):
        try:
            args = TrainingArguments(output_dir=str(tmp_path / "out"), lr_scheduler_type=name, warmup_steps=0.03,
                                     use_cpu=True, report_to="none")
            Trainer(model=nn.Linear(2, 1), args=args).create_optimizer_and_scheduler(num_training_steps=10)
        except (TypeError, ValueError):
            return False
        return True

    def accepted(name):
        try:
            resolve_config("pretrain", overrides={"lr_scheduler_type": name, "run_dir": str(tmp_path)})
        except ValueError as err:
            assert str(err).startswith("lr_scheduler_type must be one of ['linear', 'cosine'"), err
            return False
        return True

    names = [s.value for s in SchedulerType]
    assert {n: accepted(n) for n in names} == {n: trains(n) for n in names}
    for name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau",
                 "greedy"):
        assert not accepted(name), name
    assert accepted("cosine") and accepted("linear")


def test_with_a_hostfile_the_global_batch_is_checked_against_its_slots(tmp_path):
    """deepspeed --hostfile starts one process per slot and ignores num_procs (it was checked against num_procs)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=1\n")  # 3 processes
    batch = {"per_device_batch_size": 4, "global_batch_size": 8, "hostfile": str(hosts)}
    with pytest.raises(ValueError, match=r"world size \(3\) = 12.*slots of hostfile"):
        resolve_config("sft", overrides={**batch, "num_procs": 1})  # 8 = 4 x 1 x 2, but 8 is no multiple of 4 x 3
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    assert resolve_config("sft", overrides={**batch, "num_procs": 3}).hostfile == str(hosts)  # 8 = 4 x 2
    # a hostfile this process cannot read is the launcher's (and the ranks') to check
    assert resolve_config("sft", overrides={**batch, "hostfile": str(tmp_path / "elsewhere")}).hostfile


def _model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_local_copies_of_a_hub_presets_weights_are_config_keys(tmp_path, monkeypatch):
    from libmoe_core.train.config import TrainConfig, validate

    vision, llm = _model_folder(tmp_path / "vision"), _model_folder(tmp_path / "llm")
    hub = {"preset": "siglip224-phi35"}
    assert (resolve_config("pretrain", overrides=hub).vision_path, resolve_config("pretrain").llm_path) == (None, None)
    cfg = resolve_config("pretrain", overrides={**hub, "vision_path": str(vision), "llm_path": str(llm)})
    assert (cfg.vision_path, cfg.llm_path) == (str(vision), str(llm))
    # `~` expanded (YAML, --set, notebook parameters: no shell expands it), from a file or --set
    monkeypatch.setenv("HOME", str(tmp_path))
    f = tmp_path / "pretrain.yaml"
    f.write_text("preset: siglip224-phi3\nvision_path: ~/vision\n")
    cfg = resolve_config("pretrain", str(f), parse_overrides(["llm_path=~/llm"]))
    assert (cfg.vision_path, cfg.llm_path) == (str(vision), str(llm))
    # the config the launcher saves is what the ranks load and validate (runners/train.py)
    cfg.save(tmp_path / "saved.yaml")
    again = TrainConfig(**yaml.safe_load((tmp_path / "saved.yaml").read_text()))
    validate(again)
    assert again == cfg
    # the stages after pretrain start from its saved model: the keys (e.g. of a config file shared by the
    # stages) are kept but unused, so a mirror no longer there is no error
    later = resolve_config("pft", overrides={**hub, "vision_path": str(tmp_path / "moved"), "run_dir": "r"})
    assert later.resolved_init_from() == "r/pretrain/final" and later.vision_path == str(tmp_path / "moved")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"vision_path": ["a"]}, r"training config key 'vision_path' must be str or NoneType, got \['a'\]"),
    ({"llm_path": True}, "training config key 'llm_path' must be str or NoneType, got True"),
    ({"vision_path": "{tmp}/missing"}, (r"vision_path: no folder {tmp}/missing \(a local copy of the vision tower "
                                        r"google/siglip-so400m-patch14-224, e\.g\. from `hf download")),
    ({"llm_path": "{tmp}/missing"}, (r"llm_path: no folder {tmp}/missing \(a local copy of the language model "
                                     r"microsoft/Phi-3\.5-mini-instruct")),
    ({"llm_path": "{tmp}"}, r"llm_path: {tmp} holds no config\.json"),
    ({"llm_path": "{tmp}/file"}, r"llm_path: no folder {tmp}/file"),
    ({"preset": "tiny", "vision_path": "{tmp}/vision"},
     (r"preset 'tiny' has no pretrained weights; vision_path/llm_path apply to hub presets \(siglip224-phi35, "
      r"siglip224-phi3, clip336-phi3\): leave vision_path unset")),
    ({"preset": "tiny", "vision_path": "{tmp}/vision", "llm_path": "{tmp}/vision"}, "leave vision_path and llm_path unset"),
])
def test_local_weight_paths_are_refused_naming_the_key(tmp_path, overrides, message):
    _model_folder(tmp_path / "vision")
    (tmp_path / "file").write_text("")
    overrides = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ValueError, match=message.replace("{tmp}", str(tmp_path))):
        resolve_config("pretrain", overrides={"preset": "siglip224-phi35", **overrides})
    if overrides.get("preset") == "tiny":  # a contradiction in any stage's config
        with pytest.raises(ValueError, match="has no pretrained weights"):
            resolve_config("pft", overrides=overrides)


def test_libmoe_train_reports_a_missing_local_copy(tmp_path, capsys):
    from libmoe_core.cli import main

    f = tmp_path / "pretrain.yaml"
    f.write_text(f"preset: clip336-phi3\nllm_path: {tmp_path / 'phi3'}\n")
    assert main(["train", "--stage", "pretrain", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"libmoe train: error: {f}: llm_path: no folder {tmp_path / 'phi3'}" in err
    assert "microsoft/Phi-3-mini-4k-instruct" in err
    assert main(["train", "--stage", "pretrain", "--set", "vision_path=/no/such/siglip"]) == 2  # preset tiny
    assert "preset 'tiny' has no pretrained weights" in capsys.readouterr().err


def _precision_config(run_dir, precision):
    return resolve_config("pretrain", overrides={"precision": precision, "run_dir": str(run_dir)})


def _pretend_gpu(monkeypatch, capability):
    """A CUDA GPU of ``capability``; native bf16 from 8.0 (earlier ones emulate it)."""
    import inspect

    import torch

    # the real signature, which training_dtype relies on
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU sm_{capability[0]}{capability[1]}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability >= (8, 0))


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])  # V100, T4
def test_precision_auto_trains_in_fp32_on_gpus_without_native_bf16(tmp_path, monkeypatch, capability):
    """auto picked bf16 on any CUDA GPU; a V100 or T4 only emulates it. bf16 asked for there is refused."""
    import torch

    from libmoe_core.train.stages import training_dtype

    _pretend_gpu(monkeypatch, capability)
    cfg = partial(_precision_config, tmp_path)
    assert training_dtype(cfg("auto")) == torch.float32
    assert training_dtype(cfg("fp32")) == torch.float32
    with pytest.raises(ValueError, match=rf"native bf16.*sm_{capability[0]}{capability[1]}\) has {capability[0]}\.{capability[1]}"):
        training_dtype(cfg("bf16"))
    from libmoe_core.train import launch as launch_module

    with pytest.raises(ValueError, match="native bf16"):  # refused before any process starts
        launch_module.launch(cfg("bf16"), on_line=lambda line: pytest.fail(f"a process started: {line}"))
    assert not (cfg("bf16").stage_dir / "train.log").exists()


def test_precision_auto_trains_in_bf16_on_ampere_and_newer_and_fp32_on_cpu(tmp_path, monkeypatch):
    import torch

    from libmoe_core.train.stages import training_dtype

    cfg = partial(_precision_config, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [training_dtype(cfg(p)) for p in ("auto", "fp32", "bf16")] == [torch.float32, torch.float32, torch.bfloat16]
    for capability in ((8, 0), (9, 0)):
        _pretend_gpu(monkeypatch, capability)
        assert [training_dtype(cfg(p)) for p in ("auto", "fp32", "bf16")] == [torch.bfloat16, torch.float32, torch.bfloat16]
