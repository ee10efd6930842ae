"""save_pretrained / from_pretrained round trips (model, Auto classes, processor)."""

import numpy as np
import pytest
import torch
from PIL import Image

import libmoe_core.model  # noqa: F401  (registers libmoe_vlm with the Auto classes)
from libmoe_core.model import LibMoEVLMForCausalLM
from libmoe_core.model.placement import placed_moe_layers
from libmoe_core.model.presets import build_model, build_processor
from libmoe_core.model.processor import LibMoEProcessor


def inputs(model, processor):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["<|user|>\n<image>\nwhat color is the circle?<|end|>\n<|assistant|>\n",
             "<|user|>\nis it red?<|end|>\n<|assistant|>\n"]
    return processor(texts, [ims[:1], None])


@pytest.mark.parametrize("router", ["smoe", "tcmoe", "auxfree", "hyper"])
def test_round_trip_is_exact(tmp_path, router):
    model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers="every_other", router=router,
                        noise=0.01).eval()
    processor = build_processor("tiny")
    batch = inputs(model, processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe == model.config.moe
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    for (_, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b)  # non-persistent router buffers rebuilt
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
        # one token, as in decoding: one-row products on weights left at unaligned offsets of the
        # memory-mapped file sum in another order, so values move by ~1e-7 (the routers' weights
        # are copied out: the hyper router's generated gate, a one-row product, made even the
        # multi-token logits above differ)
        one = batch["input_ids"][1:, -1:]
        a, b = model(input_ids=one), loaded(input_ids=one)
        for (_, _, saved), (_, _, again) in zip(placed_moe_layers(model), placed_moe_layers(loaded), strict=True):
            if saved.last_routing is not None:
                assert torch.equal(saved.last_routing.experts, again.last_routing.experts)
                torch.testing.assert_close(saved.last_routing.probs, again.last_routing.probs, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ["sigmoid", "tcmoe"])
def test_bf16_build_equals_its_reload(tmp_path, router):
    """One dtype throughout, as a reload has it: the router was left fp32 by the build (bf16 on
    reload) and RoPE's inv_freq cast to bf16 (fp32 on reload); the logits moved by up to 8e-3."""
    from libmoe_core.model.modeling import placed_moe_layers

    model = build_model("tiny", moe_llm_layers="all", router=router, dtype=torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path).eval()
    for m in (model, loaded):
        assert {layer.router.gate.weight.dtype for _, _, layer in placed_moe_layers(m)} == {torch.bfloat16}
    built, reloaded = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert built.keys() == reloaded.keys()
    assert {n: b.dtype for n, b in built.items()} == {n: b.dtype for n, b in reloaded.items()}
    ids = torch.randint(20, 400, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_from_pretrained_chooses_attention_as_build_model_does(tmp_path, monkeypatch):
    from libmoe_core.model import modeling

    build_model("tiny").save_pretrained(tmp_path)  # the kernel is not saved
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"  # CPU: sdpa
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"
    asked = []
    monkeypatch.setattr(modeling, "resolve_attn_implementation", lambda requested, dtype=None: asked.append((requested, dtype)) or "eager")
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "eager"  # was sdpa, always
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).config._attn_implementation == "eager"
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).config._attn_implementation == "eager"
    # the dtype reaches the choice (flash-attn needs fp16/bf16); by default ("auto") the checkpoint's own: fp32
    assert asked == [(None, torch.float32), (None, torch.float32), (None, torch.bfloat16)]
    monkeypatch.undo()
    # other values are transformers' own to take (they were refused as unknown)
    per_part = {"text_config": "eager", "vision_config": "sdpa"}
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path, attn_implementation=per_part).config.text_config._attn_implementation == "eager"
    assert LibMoEVLMForCausalLM.from_pretrained(tmp_path, attn_implementation="paged|eager") is not None


def test_resize_token_embeddings_resizes_the_language_model_and_its_config():
    model = build_model("tiny", moe_llm_layers=[1]).eval()
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 88)  # was: AttributeError halfway, input embeddings already resized
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == old + 88
    assert model.config.text_config.vocab_size == old + 88
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[old + 87]])).logits.shape[-1] == old + 88


def test_auxfree_bias_stays_fp32_in_a_bf16_load(tmp_path):
    from libmoe_core.model.modeling import placed_moe_layers

    model = build_model("tiny", moe_llm_layers="all", router="auxfree")
    with torch.no_grad():
        for _, i, layer in placed_moe_layers(model):
            layer.router.selection_bias.fill_(0.6 + 1e-3 * i)  # steps bf16 cannot hold at 0.6
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layers = list(placed_moe_layers(loaded))
    assert layers and all(layer.router.gate.weight.dtype == torch.bfloat16 for _, _, layer in layers)
    for _, i, layer in layers:
        assert layer.router.selection_bias.dtype == torch.float32
        assert layer.router.selection_bias.tolist() == [torch.tensor(0.6 + 1e-3 * i).item()] * 4


def test_auxfree_bias_is_exact_through_a_cast_and_back(tmp_path):
    # model.to(bf16) keeps the bias fp32; it must not round it through bf16 on the way (0.7001 -> 0.6992)
    from libmoe_core.model.modeling import placed_moe_layers

    model = build_model("tiny", moe_llm_layers="all", router="auxfree")
    with torch.no_grad():
        for _, _, layer in placed_moe_layers(model):
            layer.router.selection_bias.fill_(0.7001)
    model.to(torch.bfloat16).float()
    model.save_pretrained(tmp_path)
    for m in (model, LibMoEVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        for _, _, layer in placed_moe_layers(m):
            assert layer.router.selection_bias.dtype == torch.float32
            assert layer.router.selection_bias.tolist() == [torch.tensor(0.7001).item()] * 4


def test_hyper_routers_hypernetwork_stays_frozen_after_loading(tmp_path):
    from libmoe_core.train.stages import set_trainable

    model = build_model("tiny", moe_llm_layers="all", router="hyper")
    def frozen(m):
        return [n for n, p in m.named_parameters() if ".hypernet." in n and not p.requires_grad]
    def hypernet(m):
        return [n for n, _ in m.named_parameters() if ".hypernet." in n]
    assert frozen(model) == hypernet(model) != []
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path)
    assert frozen(loaded) == hypernet(loaded)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if ".embedding" in n)  # the trained part
    set_trainable(loaded, "sft")
    assert frozen(loaded) == hypernet(loaded)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if ".hypernet." not in n)


def test_auto_classes_load_after_import(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build_model("tiny", moe_llm_layers=[1]).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "libmoe_vlm"
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(auto, LibMoEVLMForCausalLM)
    ids = torch.randint(20, 400, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, auto(input_ids=ids).logits)


def test_processor_round_trip(tmp_path):
    processor = build_processor("tiny", image_aspect="resize")
    processor.save_pretrained(tmp_path)
    again = LibMoEProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    assert again.image_token_id == processor.image_token_id
    text = "<|user|>\n<image>\nwhat shape is it?<|end|>\n<|assistant|>\n"
    im = Image.fromarray(np.zeros((64, 32, 3), dtype=np.uint8))
    a, b = processor([text], [[im]]), again([text], [[im]])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_processor_pads_with_mean_colour_and_expands_placeholders():
    processor = build_processor("tiny")
    black_wide = Image.fromarray(np.zeros((32, 64, 3), dtype=np.uint8))  # 64 wide, 32 high
    out = processor(["<image>\nq", "no image here"], [[black_wide], None], padding_side="left")
    px = out["pixel_values"][0]  # [3, 64, 64], normalised with mean 0.5 / std 0.5
    assert torch.allclose(px[:, 0, :], torch.full_like(px[:, 0, :], (128 / 255 - 0.5) / 0.5), atol=0.02)  # pad rows
    assert torch.allclose(px[:, 32, :], torch.full_like(px[:, 32, :], -1.0), atol=0.02)  # the black image
    assert (out["input_ids"][0] == processor.image_token_id).sum() == processor.num_image_tokens
    assert out["image_counts"].tolist() == [1, 0]
    assert out["attention_mask"][1, 0] == 0 and out["attention_mask"][1, -1] == 1  # left padded
    right = processor(["<image>\nq", "no image here"], [[black_wide], None], padding_side="right")
    assert right["attention_mask"][1, 0] == 1
    with pytest.raises(ValueError, match="placeholder"):
        processor(["<image><image> two?"], [[black_wide]])


def test_processor_uses_the_conversation_template():
    templates = pytest.importorskip("libmoe_core.data.templates")
    processor = build_processor("tiny")
    prompt = processor.prompt("what color is the shape?")
    assert prompt == templates.get_template("phi35").prompt("<image>\nwhat color is the shape?")
    ids, labels = processor.render([{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}])
    assert ids.count(processor.image_token_id) == processor.num_image_tokens
    assert all(lab == -100 for tok, lab in zip(ids, labels) if tok == processor.image_token_id)
    assert any(lab != -100 for lab in labels)


def test_loading_refuses_what_it_would_fill_with_random_weights(tmp_path):
    import json

    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        LibMoEVLMForCausalLM.from_pretrained(tmp_path / "nope")
    model = build_model("tiny", moe_llm_layers=[1])
    model.save_pretrained(tmp_path / "moe")
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["moe"]["llm"]["layers"] = [1, 2]  # the config now wants an MoE layer the weights do not hold
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit its config \(missing_keys: .*layers\.2\.mlp\.experts"):
        LibMoEVLMForCausalLM.from_pretrained(tmp_path / "moe")
    loose = LibMoEVLMForCausalLM.from_pretrained(tmp_path / "moe", strict=False)  # asked for: loads
    assert loose.config.moe["llm"]["layers"] == [1, 2]
    model.language_model.save_pretrained(tmp_path / "phi3")  # a plain LLM checkpoint
    with pytest.raises(ValueError, match="holds a 'phi3' model, not a 'libmoe_vlm' checkpoint"):
        LibMoEVLMForCausalLM.from_pretrained(tmp_path / "phi3")


def test_from_pretrained_expands_a_home_folder(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HOME", str(tmp_path))
    model = build_model("tiny", moe_llm_layers=[1])
    model.save_pretrained(tmp_path / "ckpt")
    for path in ("~/ckpt", Path("~/ckpt")):
        loaded = LibMoEVLMForCausalLM.from_pretrained(path)  # strict: checked and loaded from the same folder
        assert loaded.config.moe == model.config.moe
    assert LibMoEVLMForCausalLM.from_pretrained("~/ckpt", strict=False).config.moe == model.config.moe
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        LibMoEVLMForCausalLM.from_pretrained("~/nope")


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_image_aspect_means_the_same_for_siglip_and_clip(tower):
    """A wide image, red left quarter, blue right quarter: ``resize`` keeps both (a CLIP processor
    centre-cropped them away), ``crop`` keeps the white centre, ``pad`` adds mean-colour rows."""
    from libmoe_core.model.presets import load_tiny_tokenizer
    from libmoe_core.model.processor import default_image_processor

    vision = {"image_size": 28, "model_type": "clip_vision_model" if tower == "clip" else "siglip_vision_model"}
    pixels = np.full((64, 256, 3), 255, dtype=np.uint8)
    pixels[:, :64] = (255, 0, 0)
    pixels[:, 192:] = (0, 0, 255)
    image = Image.fromarray(pixels)

    def unnormalised(aspect):  # [3, 28, 28] in 0..1
        proc = LibMoEProcessor(load_tiny_tokenizer(), default_image_processor(vision), num_image_tokens=4,
                               image_aspect=aspect)
        px = proc.preprocess_images([image])[0]
        ip = proc.image_processor
        return px * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]

    red, blue, white = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), torch.ones(3)
    stretched = unnormalised("resize")
    assert stretched.shape == (3, 28, 28)
    assert torch.allclose(stretched[:, 14, 0], red, atol=0.05) and torch.allclose(stretched[:, 14, -1], blue, atol=0.05)
    centre = unnormalised("crop")
    assert torch.allclose(centre[:, 14, 0], white, atol=0.05) and torch.allclose(centre[:, 14, -1], white, atol=0.05)
    padded = unnormalised("pad")
    assert torch.allclose(padded[:, 14, 0], red, atol=0.05)
    # LLaVA's expand2square colour, int(255 * mean) (round gave 128 and (123, 117, 104))
    fill = {"siglip": (127, 127, 127), "clip": (122, 116, 104)}[tower]
    assert torch.allclose(padded[:, 0, 14], torch.tensor(fill) / 255, atol=1e-6)
    with pytest.raises(ValueError, match="image_aspect must be one of"):
        LibMoEProcessor(load_tiny_tokenizer(), default_image_processor(vision), num_image_tokens=4, image_aspect="fit")


def test_reloaded_router_weights_are_aligned_and_the_hyper_gate_exact(tmp_path):
    """Weights a load leaves at unaligned offsets of the memory-mapped file take other BLAS paths in
    one-row products: the hyper router's gate, generated from one embedding vector, differed by
    ~1e-8 after every reload (logits by ~4e-7). Router tensors are copied to aligned memory."""
    model = build_model("tiny", router="hyper", moe_llm_layers=[1, 3]).eval()
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path).eval()
    routers = [layer.router for _, _, layer in placed_moe_layers(loaded)]
    assert routers and all(t.data_ptr() % 64 == 0 for r in routers for t in (*r.parameters(), *r.buffers()))
    with torch.no_grad():
        for saved, again in zip((layer.router for _, _, layer in placed_moe_layers(model)), routers, strict=True):
            assert torch.equal(saved._generate(), again._generate())


def test_from_pretrained_chooses_attention_for_the_older_torch_dtype_argument(tmp_path, monkeypatch):
    """transformers still loads in ``torch_dtype`` when ``dtype`` is not given: a bf16 checkpoint loaded
    with torch_dtype=torch.float32 is an fp32 model, and it got flash-attn (which refuses fp32)."""
    from libmoe_core.model import attention, modeling

    build_model("tiny").to(torch.bfloat16).save_pretrained(tmp_path)
    load_dtype = modeling._load_dtype
    assert load_dtype(str(tmp_path), {}) == torch.bfloat16  # "auto": the checkpoint's own
    assert load_dtype(str(tmp_path), {"torch_dtype": torch.float32}) == torch.float32
    assert load_dtype(str(tmp_path), {"torch_dtype": "float32"}) == torch.float32
    assert load_dtype(str(tmp_path), {"torch_dtype": "auto"}) == torch.bfloat16
    assert load_dtype(str(tmp_path), {"dtype": torch.float16, "torch_dtype": torch.float32}) == torch.float16  # dtype wins
    assert load_dtype(str(tmp_path), {"dtype": None, "torch_dtype": torch.float32}) == torch.float32
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)  # as on a GPU with flash-attn
    model = LibMoEVLMForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    assert model.dtype == torch.float32 and model.config.text_config._attn_implementation == "sdpa"
