"""A hub preset trained from local copies of its vision tower and LLM (``vision_path`` / ``llm_path``):
the stage that builds the model from the preset loads them, the stages after it load the saved model
without them, and the notebooks and the pipeline pass them."""

import shutil

import pytest
import torch
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook
from safetensors.torch import load_file

from libmoe_core.model.presets import load_tiny_tokenizer
from libmoe_core.pipeline.runner import NOTEBOOK_DIR, plan_pipeline
from libmoe_core.pipeline.stage import stage_config
from libmoe_core.train.config import resolve_config
from libmoe_core.train.stages import load_stage_model


def save_hub_layout_stand_ins(root):
    """Tiny stand-ins saved as ``hf download REPO --local-dir DIR`` leaves the real ones: a full SigLIP
    checkpoint (google/siglip-so400m-patch14-224 holds the dual encoder) with its preprocessor config, and
    a Phi-3 LLM in bf16, sharded, with its tokenizer (here the tiny preset's) and generation config."""
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(1234)  # not the stage's seed: the stage's own random init would not match
    tok = load_tiny_tokenizer()
    SiglipModel(SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=56, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, pad_token_id=1, bos_token_id=1, eos_token_id=2))).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(root / "siglip")
    llm = Phi3ForCausalLM(Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     tie_word_embeddings=False)).to(torch.bfloat16)
    llm.save_pretrained(root / "phi35", max_shard_size="100KB")
    tok.save_pretrained(root / "phi35")
    return root / "siglip", root / "phi35"


def saved_tensors(folder):
    """Every tensor of a checkpoint folder's safetensors files, as saved (no from_pretrained round trip)."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_a_stage_built_from_local_copies_loads_them_and_the_next_stages_do_not_need_them(tmp_path):
    vision, llm = save_hub_layout_stand_ins(tmp_path / "mirror")
    assert len(list(llm.glob("model-*.safetensors"))) > 1  # sharded, as the hub's Phi-3.5
    local = {"preset": "siglip224-phi35", "vision_path": str(vision), "llm_path": str(llm),
             "run_dir": str(tmp_path / "run"), "precision": "fp32"}
    model, processor = load_stage_model(resolve_config("pretrain", overrides=local))

    vision_saved, llm_saved = saved_tensors(vision), saved_tensors(llm)
    tower = model.vision_tower.model.state_dict()
    prefix = "" if all(name in vision_saved for name in tower) else "vision_model."  # the tower, or its transformer
    assert tower and all(torch.equal(t, vision_saved[prefix + name]) for name, t in tower.items())
    assert len(model.vision_tower.layers) == 2  # cut after the feature layer (-2) of the 3
    lm = model.language_model.state_dict()
    assert set(lm) == set(llm_saved)
    assert all(t.dtype == torch.float32 and torch.equal(t, llm_saved[name].float()) for name, t in lm.items())
    # the processor is the copies' too: their tokenizer, their image size
    assert processor.tokenizer.get_vocab() == load_tiny_tokenizer().get_vocab()
    size = processor.image_processor.size
    assert (size["height"], size["width"]) == (56, 56) and processor.num_image_tokens == (56 // 14) ** 2
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("projector.")}  # pretrain: the projector only

    # what the pretrain stage saves (runners/train.py: the model, then the processor), then the mirror goes
    final = tmp_path / "run" / "pretrain" / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    shutil.move(tmp_path / "mirror", tmp_path / "gone")
    # pft, with the keys still given (a config shared by the stages) and without them
    for overrides in (local, {k: v for k, v in local.items() if not k.endswith("_path")}):
        pft_model, pft_processor = load_stage_model(resolve_config("pft", overrides=overrides))
        reloaded = pft_model.state_dict()
        assert set(reloaded) == set(model.state_dict())
        assert all(torch.equal(reloaded[name], t) for name, t in model.state_dict().items())
        assert pft_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert pft_processor.num_image_tokens == processor.num_image_tokens
    pft_model.save_pretrained(tmp_path / "run" / "pft" / "final")
    pft_processor.save_pretrained(tmp_path / "run" / "pft" / "final")
    sft_model, _ = load_stage_model(resolve_config("sft", overrides={**local, "moe_vision": True}))
    assert sft_model.config.moe["vision"]["num_experts"] == 4
    assert torch.equal(sft_model.language_model.lm_head.weight, model.language_model.lm_head.weight)


def _run_until_config(nb, namespace):
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)  # noqa: S102
            if "stage_config(" in cell.source:
                return


def test_the_pretrain_notebook_and_the_pipeline_pass_the_local_copies(tmp_path):
    vision, llm = save_hub_layout_stand_ins(tmp_path / "mirror")
    paths = {"vision_path": str(vision), "llm_path": str(llm)}
    base = {"preset": "siglip224-phi35", "run_name": "t", "runs_root": str(tmp_path / "runs")}
    namespace = {}
    _run_until_config(parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / "pretrain.ipynb")),
                                            {**base, **paths}), namespace)
    assert (namespace["cfg"].vision_path, namespace["cfg"].llm_path) == (str(vision), str(llm))
    with pytest.raises(ValueError, match=r"bad notebook parameter: vision_path: no folder"):
        stage_config("pretrain", **base, vision_path=str(tmp_path / "missing"))
    # pft and sft start from a saved model: the parameters are refused, not silently unused
    for stage in ("pft", "sft"):
        with pytest.raises(ValueError, match=r"parameter\(s\) \['llm_path'\] are for the pretrain stage"):
            stage_config(stage, **base, llm_path=str(llm))
    plan = plan_pipeline(preset="siglip224-phi35", routers=["smoe"], stages=["pretrain", "pft", "sft"],
                         runs_root=tmp_path / "runs", stage_parameters={"pretrain": paths})
    configs = {step.name: step.config for step in plan.steps}
    assert (configs["pretrain"].vision_path, configs["pretrain"].llm_path) == (str(vision), str(llm))
    assert configs["pft"].vision_path is None and configs["sft-smoe"].llm_path is None
    with pytest.raises(ValueError, match=r"unknown pft notebook parameter\(s\) \['llm_path', 'vision_path'\]"):
        plan_pipeline(preset="siglip224-phi35", routers=["smoe"], runs_root=tmp_path / "runs",
                      stage_parameters={"pft": paths})


def test_stages_choose_attention_for_the_training_dtype(tmp_path, monkeypatch):
    """Stage models are built (or loaded) in fp32 and trained in bf16 on a GPU: the kernel is chosen
    for bf16 (flash-attn where present), not for the fp32 build, which gets sdpa."""
    from libmoe_core.model import attention, presets

    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    seen = []

    def build(preset, **kwargs):
        seen.append(kwargs.get("attn_implementation"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(presets, "build_model", build)
    for precision, expected in (("bf16", "flash_attention_2"), ("fp32", "sdpa")):
        cfg = resolve_config("pretrain", overrides={"precision": precision, "run_dir": str(tmp_path / precision)})
        with pytest.raises(RuntimeError, match="stop here"):
            load_stage_model(cfg)
        assert seen[-1] == expected


def test_a_stage_built_from_unavailable_hub_weights_fails_before_any_process_starts(tmp_path, monkeypatch):
    """The ranks found the missing weights: a DeepSpeed launch, two tracebacks and "exited with code 1".
    Now the launch stops first, with the CLI's way of pointing at local copies."""
    from libmoe_core.train.launch import launch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = resolve_config("pretrain", overrides={"preset": "siglip224-phi35", "run_dir": str(tmp_path), "max_steps": 2})
    with pytest.raises(OSError, match=r"(?s)`hf download microsoft/Phi-3.5-mini-instruct`.*--set vision_path=DIR --set llm_path=DIR"):
        launch(cfg, on_line=lambda line: pytest.fail(f"a process started: {line}"))
    assert not (cfg.stage_dir / "train.log").exists()
