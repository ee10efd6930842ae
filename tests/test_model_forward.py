"""Forward/backward of every MoE placement combination, upcycling equality, image-token accounting."""

import itertools

import pytest
import torch

from libmoe_core.model import ImageTokenMismatchError, LibMoEVLMConfig
from libmoe_core.model.placement import upcycle
from libmoe_core.model.presets import build_model

T = 16  # tiny preset: 8x8 patches pooled 2x2


def batch(model, images_per_sample=(1, 0, 2), length=24, seed=0, shrink=0):
    """input_ids with expanded image tokens (text-only and multi-image samples), labels, and
    pixel_values when some sample has an image; row i has ``length - shrink * i`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    tok = model.config.image_token_id
    rows = []
    for i, n in enumerate(images_per_sample):
        text = torch.randint(20, 400, (length - shrink * i,), generator=g).tolist()
        rows.append(text[:3] + [tok] * (T * n) + text[3:])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 1)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    out = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill((ids == tok) | (mask == 0), -100))
    if sum(images_per_sample):
        out["pixel_values"] = torch.randn(sum(images_per_sample), 3, 64, 64, generator=g)
        out["image_counts"] = torch.tensor(images_per_sample)
    return out


COMBOS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("vision,projector,llm", COMBOS)
def test_forward_backward_every_placement(vision, projector, llm):
    model = build_model("tiny", moe_vision=vision, moe_projector=projector, moe_llm_layers="every_other" if llm else None)
    out = model(**batch(model))
    placements = {p for p, on in zip(("vision", "projector", "llm"), (vision, projector, llm)) if on}
    assert {k.split("/")[0] for k in out.aux_losses} == placements
    for p in placements:
        assert {f"{p}/balance", f"{p}/z"} <= set(out.aux_losses)
    expected = out.lm_loss + sum(out.aux_losses.values()) if placements else out.lm_loss
    torch.testing.assert_close(out.loss, expected)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if ".router." in name or "projector" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    routers = [n for n, _ in model.named_parameters() if n.endswith("router.gate.weight")]
    assert len(routers) == 2 * vision + projector + 2 * llm  # 2 kept vision layers, LLM layers 1 and 3


@pytest.mark.parametrize("router", ["smoe", "sigmoid", "cosine"])
def test_upcycled_model_equals_dense_model(router):
    dense = build_model("tiny").eval()
    moe = build_model("tiny").eval()
    moe.load_state_dict(dense.state_dict())
    upcycle(moe, moe_vision=True, moe_projector=True, moe_llm_layers="all", router=router, num_experts=4, top_k=2)
    assert set(moe.config.moe) == {"vision", "projector", "llm"}
    inputs = batch(dense)
    with torch.no_grad():
        a, b = dense(**inputs), moe(**inputs)
    real = inputs["attention_mask"].bool()  # padded positions are not routed (their MLP output is 0)
    torch.testing.assert_close(b.logits[real], a.logits[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.lm_loss, a.lm_loss, atol=1e-5, rtol=1e-5)


def test_vision_features_are_the_penultimate_layer_and_later_layers_are_gone():
    from transformers import SiglipVisionModel

    model = build_model("tiny", image_pool=1).eval()
    cfg = model.config
    assert len(model.vision_tower.layers) == cfg.vision_config.num_hidden_layers - 1
    assert not hasattr(model.vision_tower.model, "head")
    full = SiglipVisionModel(cfg.vision_config).eval()
    full.load_state_dict(model.vision_tower.model.state_dict(), strict=False)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = full(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = model.vision_tower(px)
    torch.testing.assert_close(got, want)
    assert cfg.num_image_tokens == 64


def test_clip_tower_drops_cls_and_pools():
    model = build_model("tiny", vision_config={"model_type": "clip_vision_model", "hidden_act": "quick_gelu"})
    assert model.vision_tower.num_prefix_tokens == 1
    feats = model.vision_tower(torch.randn(3, 3, 64, 64))
    assert feats.shape == (3, T, 64)
    out = model(**batch(model))
    out.loss.backward()


def test_s2_scales_concatenate_features():
    model = build_model("tiny", vision_scales=[1, 2], moe_vision=True)
    feats = model.vision_tower(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, T, 128)  # 2 scales x 64 channels
    assert model.projector[0].in_features == 128
    out = model(**batch(model, (1, 1)))
    assert "vision/balance" in out.aux_losses


def test_image_token_accounting_errors_are_clear():
    model = build_model("tiny")
    good = batch(model)
    with pytest.raises(ImageTokenMismatchError, match="found 48 image tokens .* 2 image"):
        model(**{**good, "pixel_values": good["pixel_values"][:2], "image_counts": None})
    with pytest.raises(ImageTokenMismatchError, match="per sample"):
        model(**{**good, "image_counts": torch.tensor([2, 0, 1])})
    no_images = {k: v for k, v in good.items() if k not in ("pixel_values", "image_counts")}
    with pytest.raises(ImageTokenMismatchError, match="0 image"):
        model(**no_images)
    ids = good["input_ids"].clone()
    ids[0, 3] = 5  # one image token short
    with pytest.raises(ImageTokenMismatchError):
        model(**{**good, "input_ids": ids})


def test_text_only_batch_has_no_vision_aux():
    model = build_model("tiny", moe_vision=True, moe_llm_layers=[0])
    first = model(**batch(model))
    assert "vision/balance" in first.aux_losses
    out = model(**batch(model, (0, 0)))
    assert set(out.aux_losses) == {"llm/balance", "llm/z"}  # no stale vision routing from the first call


def test_placement_errors():
    with pytest.raises(ValueError, match="out of range"):
        build_model("tiny", moe_llm_layers=[7])
    with pytest.raises(ValueError, match="unknown shortcut"):
        build_model("tiny", moe_llm_layers="odd")
    with pytest.raises(ValueError, match="linear"):
        build_model("tiny", projector_type="linear", moe_projector=True)
    with pytest.raises(ValueError, match="unknown field"):
        build_model("tiny", moe_vision={"experts": 4})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        _ = LibMoEVLMConfig(vision_config={"num_hidden_layers": 2}, vision_feature_layer=-5).kept_vision_layers


def test_a_zero_coefficient_keeps_an_infinite_term_out_of_the_loss():
    """The model weighs each placement's terms itself: 0 * inf made the training loss NaN although
    the term was switched off. Oracle: the language loss alone, and the term still reported."""
    model = build_model("tiny", moe_llm_layers={"layers": [1], "z_coef": 0.0, "balance_coef": 0.0})
    layer = model.language_model.model.layers[1].mlp
    layer.register_forward_hook(lambda module, args, output: setattr(
        module.last_routing, "aux_terms", {**module.last_routing.aux_terms, "z": torch.tensor(float("inf"))}))
    out = model(**batch(model, (0, 0)))
    assert torch.isinf(out.aux_terms["llm/z"])
    assert out.aux_losses["llm/z"] == 0 and out.aux_loss == 0
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_per_placement_settings_and_layer_shortcuts():
    model = build_model("tiny", moe_vision={"router": "cosine", "num_experts": 2, "top_k": 1, "balance_coef": 0.1},
                        moe_llm_layers="second_half", num_experts=3)
    moe = model.config.moe
    assert moe["vision"]["layers"] == [0, 1] and moe["vision"]["num_experts"] == 2
    assert moe["llm"]["layers"] == [2, 3] and moe["llm"]["num_experts"] == 3
    layer = model.vision_tower.layers[0].mlp
    assert layer.router.name == "cosine" and layer.router.coefs["balance"] == 0.1


@pytest.mark.parametrize("kwargs,message", [
    ({"moe_llm_layers": {"layers": [0.5, 2.9]}}, r"moe llm layers must be integer indices, got non-integer \[0.5, 2.9\]"),
    ({"moe_llm_layers": [True]}, r"moe llm layers must be integer indices, got non-integer \[True\]"),
    ({"moe_llm_layers": [1, 1]}, r"moe llm layers lists \[1\] more than once"),
    ({"moe_llm_layers": [9]}, r"moe llm layers \[9\] out of range: .*valid layers 0\.\.3"),
    ({"moe_projector": {"layers": [7]}}, r"moe projector layers \[7\] out of range: .*valid layers 0\.\.0"),
    ({"vision_scales": [1, 2.7]}, r"vision_scales must start with 1 and hold positive integers, got \[1, 2\.7\]"),
    ({"vision_scales": [1, True]}, r"vision_scales must start with 1 and hold positive integers"),
    ({"vision_scales": [1, 1]}, r"vision_scales must not repeat a scale, got \[1, 1\]"),
])
def test_invalid_layers_scales_and_fields_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", **kwargs)


def test_upcycle_rejects_an_unknown_shared_field():
    with pytest.raises(ValueError, match=r"moe_llm: unknown field\(s\) \['topk'\]"):
        upcycle(build_model("tiny"), moe_llm_layers=[1], topk=1)  # was stored, then ignored


def test_projector_layers_may_be_absent_or_the_one_site():
    for value in (True, {"layers": [0]}, {"layers": "all"}, {"router": "cosine"}):
        assert build_model("tiny", moe_projector=value).config.moe["projector"]["layers"] == [0]


def test_moe_specs_in_the_config_are_checked_and_completed(tmp_path):
    import json

    from libmoe_core.model import LibMoEVLMForCausalLM
    from libmoe_core.model.placement import SPEC_DEFAULTS

    base = build_model("tiny").config.to_dict()
    base.pop("moe", None)
    with pytest.raises(ValueError, match=r"moe llm layers \[9\] out of range: the llm has 4 .*0\.\.3"):
        LibMoEVLMConfig(**base, moe={"llm": {**SPEC_DEFAULTS, "layers": [9]}})
    with pytest.raises(ValueError, match=r"moe_llm: unknown field\(s\) \['topk'\]"):
        LibMoEVLMConfig(**base, moe={"llm": {**SPEC_DEFAULTS, "layers": [0], "topk": 1}})
    with pytest.raises(ValueError, match=r"moe projector layers \[7\] out of range"):
        LibMoEVLMConfig(**base, moe={"projector": {"layers": [7]}})
    config = LibMoEVLMConfig(**base, moe={"llm": {"layers": [0], "top_k": 1}, "vision": {"layers": "all"}})
    assert config.moe["llm"] == {**SPEC_DEFAULTS, "layers": [0], "top_k": 1}  # missing fields: the defaults
    assert config.moe["vision"]["layers"] == [0, 1]
    model = LibMoEVLMForCausalLM(config)
    assert model.language_model.model.layers[0].mlp.router.top_k == 1
    # an edited config.json gets the same checks when loading
    build_model("tiny", moe_llm_layers=[1]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["moe"]["llm"]["topk"] = 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['topk'\]"):
        LibMoEVLMForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("router", ["smoe", "sigmoid", "cosine", "hyper", "xmoe", "shared"])
def test_stored_moe_specs_survive_the_config_checks(router):
    # what upcycle stores, the config keeps as it is (so checkpoints of the current code load)
    model = build_model("tiny", router=router, moe_vision="every_other", moe_projector=True, moe_llm_layers=[0, 3],
                        num_experts=3, top_k=2, balance_coef=0.02, seed=5)
    again = LibMoEVLMConfig.from_dict(model.config.to_dict())
    assert again.moe == model.config.moe
