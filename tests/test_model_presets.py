"""Presets, build_model, hub presets offline / from local dirs, attention choice, tiny tokenizer asset."""

import pytest
import torch

from libmoe_core.model import resolve_attn_implementation
from libmoe_core.model.presets import PRESETS, build_model, build_processor, load_tiny_tokenizer
from libmoe_core.model.stats import parameter_counts


def test_tiny_preset_is_small_and_offline():
    model = build_model("tiny")
    counts = parameter_counts(model)
    assert counts["total"] == counts["active"] < 1_500_000
    assert model.config.moe is None and model.config.num_image_tokens == 16
    assert type(model.vision_tower.model).__name__ == "SiglipVisionModel"
    assert type(model.language_model).__name__ == "Phi3ForCausalLM"
    tok = load_tiny_tokenizer()
    assert len(tok) <= model.config.text_config.vocab_size
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    ids = tok("what color is the triangle?", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 8  # easy-VQA words are whole tokens


def test_moe_active_parameters():
    model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers="all", num_experts=4, top_k=1)
    counts = parameter_counts(model)
    dense = parameter_counts(build_model("tiny"))
    experts = sum(layer.experts.w_in.numel() + layer.experts.w_out.numel()
                  + sum(b.numel() for b in (layer.experts.b_in, layer.experts.b_out) if b is not None)
                  for _, _, layer in __import__("libmoe_core.model", fromlist=["x"]).placed_moe_layers(model))
    assert counts["total"] - counts["active"] == experts * 3 // 4
    assert counts["active"] > dense["total"]  # + routers


@pytest.mark.parametrize("name", ["siglip224-phi35", "siglip224-phi3", "clip336-phi3"])
def test_seed_presets_build_on_meta_from_embedded_configs(name):
    with torch.device("meta"):
        model = build_model(name, load_weights=False, moe_vision=True, moe_projector=True)
    counts = parameter_counts(model)
    assert 3.8e9 < counts["llm"] < 3.9e9  # Phi-3-mini
    assert counts["active"] < counts["total"]
    assert model.config.vision_scales == [1, 3]  # LibMoE's S^2 setting
    assert len(model.vision_tower.layers) == PRESETS[name].vision_config["num_hidden_layers"] - 1


def test_hub_preset_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"(?s)`hf download google/siglip-so400m-patch14-224`.*vision_path="):
        build_model("siglip224-phi35")
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("llava-13b")


def save_local_stand_ins(tmp_path, llm_eos=None):
    """A tiny SigLIP tower and Phi-3 LLM (with the tiny tokenizer) saved as a hub preset's local copies."""
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = load_tiny_tokenizer()
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                  num_attention_heads=4, image_size=28, patch_size=14))
    llm = Phi3ForCausalLM(Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                                     bos_token_id=0, eos_token_id=0)).to(torch.bfloat16)  # as Phi-3.5 ships
    if llm_eos is not None:
        llm.generation_config.eos_token_id = llm_eos
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    vision.config.to_json_file(tmp_path / "vision" / "config.json")
    SiglipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(tmp_path / "vision")
    return vision, llm, tok


def test_hub_preset_from_local_directories(tmp_path):
    vision, llm, _ = save_local_stand_ins(tmp_path)
    model = build_model("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm",
                        moe_llm_layers=[1])
    assert len(model.vision_tower.layers) == 2 and model.projector[0].in_features == 64  # 2 scales x 32
    assert torch.equal(model.vision_tower.layers[1].self_attn.q_proj.weight, vision.encoder.layers[1].self_attn.q_proj.weight)
    assert torch.equal(model.language_model.model.layers[1].mlp.experts.w_in[0],
                       llm.model.layers[1].mlp.gate_up_proj.weight.t().float())
    # one dtype throughout (fp32 by default, not the checkpoints' own: a bf16 LLM beside an fp32 tower)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    half = build_model("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm",
                       dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    processor = build_processor("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm")
    from PIL import Image

    batch = processor(["<image>\nwhat color?"], [[Image.new("RGB", (40, 20), "red")]])
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and processor.num_image_tokens == 4
    image_id = processor.image_token_id
    again = build_model("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm",
                        image_token_id=image_id)  # the tokenizer's own id is accepted
    assert again.config.image_token_id == image_id
    with pytest.raises(ValueError, match=f"image_token_id={image_id + 1} differs"):  # was silently replaced
        build_model("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm",
                    image_token_id=image_id + 1)


def test_attention_choice():
    assert resolve_attn_implementation(None) in ("flash_attention_2", "sdpa", "eager")
    assert resolve_attn_implementation("eager") == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash"):
            resolve_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        resolve_attn_implementation("xformers")
    model = build_model("tiny", attn_implementation="eager")
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_tower.model.config._attn_implementation == "eager"


def test_tiny_tokenizer_rebuild_is_deterministic(tmp_path):
    from libmoe_core.model.build_tiny_tokenizer import ASSET_DIR, build

    build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (ASSET_DIR / name).read_bytes(), name


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"topk": 1}, TypeError, r"unknown argument\(s\) \['topk'\]"),  # was kept as an unused config attribute
    ({"image_pool": True}, ValueError, "image_pool must be a positive integer"),
    # the processor inserts the tokenizer's <image> id: another one would place no image features
    ({"image_token_id": 5}, ValueError, r"image_token_id=5 differs from the tokenizer's <image> id"),
])
def test_build_model_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_model("tiny", **kwargs)
    if error is TypeError:
        with pytest.raises(error, match=message):
            build_processor("tiny", **kwargs)


@pytest.mark.parametrize(("layer", "message"), [(7, "outside the tower"), (True, "must be an integer"),
                                                (-2.0, "must be an integer")])
def test_config_refuses_a_bad_vision_feature_layer(layer, message):
    from libmoe_core.model.config import LibMoEVLMConfig
    from libmoe_core.model.presets import get_preset

    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match=message):
        LibMoEVLMConfig(vision_config=tiny.vision_config, text_config=tiny.text_config, vision_feature_layer=layer)


def test_hub_preset_details_a_user_meets(tmp_path, monkeypatch):
    """A checkpoint's own stop ids are kept (Phi-3's generation config lists <|assistant|> too), "~"
    paths work, sub-config overrides that cannot apply are refused (they were dropped silently), and
    a weightless build uses the reachable tokenizer's <image> id (its processor found no image tokens)."""
    save_local_stand_ins(tmp_path, llm_eos=[7, 0])
    monkeypatch.setenv("HOME", str(tmp_path))
    model = build_model("siglip224-phi35", vision_path="~/vision", llm_path="~/llm")
    tok = load_tiny_tokenizer()
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>") if t in tok.get_vocab()]
    assert model.generation_config.eos_token_id[:2] == [7, 0]
    assert set(ends + [tok.eos_token_id]) <= set(model.generation_config.eos_token_id)
    for override in ({"vision_config": {"image_size": 56}}, {"text_config": {"num_hidden_layers": 1}}):
        with pytest.raises(TypeError, match="cannot apply to build_model; .*load_weights=False"):
            build_model("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm", **override)
        with pytest.raises(TypeError, match="cannot apply to build_processor; .*from the tower checkpoint"):
            build_processor("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm", **override)
    with torch.device("meta"):
        weightless = build_model("siglip224-phi35", load_weights=False, llm_path=tmp_path / "llm")
    processor = build_processor("siglip224-phi35", vision_path=tmp_path / "vision", llm_path=tmp_path / "llm")
    assert weightless.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<image>")


def test_automatic_attention_gives_flash_attn_only_half_precision_models(monkeypatch):
    """flash-attn refuses fp32 inputs: an fp32 model (build_model's default) on a GPU with flash-attn
    failed at its first forward outside autocast."""
    from libmoe_core.model import attention

    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert resolve_attn_implementation(None, torch.float32) == "sdpa"
    assert resolve_attn_implementation(None, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation(None, torch.float16) == "flash_attention_2"
    assert resolve_attn_implementation(None) == "flash_attention_2"  # dtype not known (cast later, e.g. training)
    assert build_model("tiny").config.text_config._attn_implementation == "sdpa"  # fp32 by default


def test_a_weightless_build_never_downloads(monkeypatch):
    """It looks for the preset's tokenizer (for its <image> id) in local files only: online it fetched
    the tokenizer, offline without HF_HUB_OFFLINE it waited ~46 s in retries."""
    from transformers import AutoTokenizer

    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("not in the local cache")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    with torch.device("meta"):
        model = build_model("siglip224-phi35", load_weights=False)
    assert calls == [("microsoft/Phi-3.5-mini-instruct", {"local_files_only": True})]
    assert model.config.image_token_id == PRESETS["siglip224-phi35"].text_config["vocab_size"] - 1  # placeholder


def _pretend_cuda_gpu(monkeypatch, capability):
    """flash-attn "installed" and a CUDA GPU of ``capability`` (major, minor), on any machine."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: object() if name == "flash_attn" else find_spec(name, *a, **k))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])  # V100, T4
def test_flash_attn_needs_an_ampere_or_newer_gpu(monkeypatch, capability):
    """flash-attn 2 runs on compute capability >= 8.0 only: it was chosen on a V100 or T4 and failed at
    the first forward; asked for by name it is now a clear error naming the GPU's capability."""
    _pretend_cuda_gpu(monkeypatch, capability)
    assert resolve_attn_implementation(None, torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation(None) == "sdpa"
    with pytest.raises(ValueError, match=rf"compute capability >= 8\.0.*is {capability[0]}\.{capability[1]}"):
        resolve_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])  # A100, A10/RTX 30, H100
def test_flash_attn_is_chosen_on_ampere_and_newer_gpus(monkeypatch, capability):
    _pretend_cuda_gpu(monkeypatch, capability)
    assert resolve_attn_implementation(None, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation(None, torch.float32) == "sdpa"
    assert resolve_attn_implementation("flash_attention_2") == "flash_attention_2"
