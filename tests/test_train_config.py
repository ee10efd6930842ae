"""Training config resolution, validation, DeepSpeed configs and atomic checkpoint bookkeeping."""

import json

import pytest

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
    with pytest.raises(ValueError, match="not divisible"):
        resolve_config("sft", overrides={"global_batch_size": 30, "per_device_batch_size": 4, "num_procs": 2})


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
