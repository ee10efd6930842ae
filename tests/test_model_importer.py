"""LibMoE checkpoint importer, checked on synthetic state dicts with their exact key names."""

import pytest
import torch
import torch.nn.functional as F

from libmoe_core.model.importer import convert_libmoe_state_dict, load_libmoe_checkpoint
from libmoe_core.model.presets import build_model

E = 4


def libmoe_state_dict(model, moe=True, seed=0):
    """What LibMoE's Phi3-SigLIP model would save at this size: all tower layers, moelayer experts."""
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision_config, model.config.text_config
    d, f, D, Fh = v.hidden_size, v.intermediate_size, t.hidden_size, t.intermediate_size
    r = lambda *shape: torch.randn(*shape, generator=g)
    sd = {}
    pre = "model.vision_tower.vision_model."
    sd[pre + "embeddings.patch_embedding.weight"] = r(d, 3, 8, 8)
    sd[pre + "embeddings.patch_embedding.bias"] = r(d)
    sd[pre + "embeddings.position_embedding.weight"] = r(64, d)
    for i in range(v.num_hidden_layers):  # 3 layers stored, 2 used
        lp = f"{pre}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[lp + f"self_attn.{proj}.weight"], sd[lp + f"self_attn.{proj}.bias"] = r(d, d), r(d)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[lp + f"{ln}.weight"], sd[lp + f"{ln}.bias"] = r(d), r(d)
        if moe:
            sd[lp + "moelayer.gate.weight"] = r(E, d)
            for j in range(E):
                sd[lp + f"moelayer.experts.{j}.fc1.weight"], sd[lp + f"moelayer.experts.{j}.fc1.bias"] = r(f, d), r(f)
                sd[lp + f"moelayer.experts.{j}.fc2.weight"], sd[lp + f"moelayer.experts.{j}.fc2.bias"] = r(d, f), r(d)
        else:
            sd[lp + "mlp.fc1.weight"], sd[lp + "mlp.fc1.bias"] = r(f, d), r(f)
            sd[lp + "mlp.fc2.weight"], sd[lp + "mlp.fc2.bias"] = r(d, f), r(d)
    if moe:
        sd["model.mm_projector.moelayer.gate.weight"] = r(E, d)
        for j in range(E):
            p = f"model.mm_projector.moelayer.experts.{j}."
            sd[p + "0.weight"], sd[p + "0.bias"], sd[p + "2.weight"], sd[p + "2.bias"] = r(D, d), r(D), r(D, D), r(D)
    else:
        sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = r(D, d), r(D)
        sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = r(D, D), r(D)
    sd["model.embed_tokens.weight"] = r(t.vocab_size, D)
    for i in range(t.num_hidden_layers):
        lp = f"model.layers.{i}."
        sd[lp + "self_attn.qkv_proj.weight"], sd[lp + "self_attn.o_proj.weight"] = r(3 * D, D), r(D, D)
        sd[lp + "mlp.gate_up_proj.weight"], sd[lp + "mlp.down_proj.weight"] = r(2 * Fh, D), r(D, Fh)
        sd[lp + "input_layernorm.weight"], sd[lp + "post_attention_layernorm.weight"] = r(D), r(D)
    sd["model.norm.weight"], sd["lm_head.weight"] = r(D), r(t.vocab_size, D)
    sd["model.image_newline"] = r(D)
    return sd


def test_sft_moe_checkpoint_maps_every_parameter():
    model = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=E)
    sd = libmoe_state_dict(model)
    report = load_libmoe_checkpoint(model, sd, strict=True)
    assert report.missing == []
    assert set(report.unused) == {k for k in sd if ".layers.2." in k and "vision" in k} | {"model.image_newline"}
    # an independent oracle: their expert j of vision layer 1 is fc2(gelu_tanh(fc1 x)) + routing gate
    x = torch.randn(5, 64)
    pre = "model.vision_tower.vision_model.encoder.layers.1.moelayer."
    layer = model.vision_tower.layers[1].mlp
    for j in range(E):
        h = F.gelu(F.linear(x, sd[pre + f"experts.{j}.fc1.weight"], sd[pre + f"experts.{j}.fc1.bias"]), approximate="tanh")
        want = F.linear(h, sd[pre + f"experts.{j}.fc2.weight"], sd[pre + f"experts.{j}.fc2.bias"])
        torch.testing.assert_close(layer.experts.expert_forward(j, x), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.router.scores(x), x @ sd[pre + "gate.weight"].t(), atol=1e-4, rtol=1e-4)
    proj = model.projector
    xp = torch.randn(3, 64)
    p = "model.mm_projector.moelayer.experts.2."
    want = F.linear(F.gelu(F.linear(xp, sd[p + "0.weight"], sd[p + "0.bias"])), sd[p + "2.weight"], sd[p + "2.bias"])
    torch.testing.assert_close(proj.experts.expert_forward(2, xp), want, atol=1e-4, rtol=1e-4)
    lm = model.language_model
    assert torch.equal(lm.model.layers[3].mlp.gate_up_proj.weight, sd["model.layers.3.mlp.gate_up_proj.weight"])
    assert torch.equal(lm.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(model.vision_tower.model.embeddings.patch_embedding.weight,
                       sd["model.vision_tower.vision_model.embeddings.patch_embedding.weight"])


def test_dense_pft_checkpoint_is_upcycled_into_every_expert():
    dense_sd = libmoe_state_dict(build_model("tiny", image_pool=1), moe=False, seed=1)
    moe_model = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, moe_llm_layers=[1])
    report = load_libmoe_checkpoint(moe_model, dense_sd)
    assert report.missing and all(".router." in k for k in report.missing)  # only the fresh routers
    w = dense_sd["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"].t()
    stacked = moe_model.vision_tower.layers[0].mlp.experts.w_in
    assert all(torch.equal(stacked[j], w) for j in range(E))
    gate_up = dense_sd["model.layers.1.mlp.gate_up_proj.weight"].t()
    assert torch.equal(moe_model.language_model.model.layers[1].mlp.experts.w_in[3], gate_up)
    # the upcycled model equals the dense model loaded from the same checkpoint
    dense = build_model("tiny", image_pool=1)
    load_libmoe_checkpoint(dense, dense_sd, strict=True)
    ids = torch.randint(20, 400, (1, 80))
    ids[0, 4:68] = dense.config.image_token_id
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe_model.eval()(input_ids=ids, pixel_values=px).logits,
                                   dense.eval()(input_ids=ids, pixel_values=px).logits, atol=1e-3, rtol=1e-3)


def test_mismatches_are_clear_errors(tmp_path):
    model = build_model("tiny", image_pool=1)  # dense vision: their MoE layers have nowhere to go
    with pytest.raises(ValueError, match="dense MLP there"):
        convert_libmoe_state_dict(libmoe_state_dict(model), model)
    moe3 = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=3)
    with pytest.raises(ValueError, match="experts"):
        load_libmoe_checkpoint(moe3, libmoe_state_dict(model))
    wide = build_model("tiny", image_pool=1, vision_scales=[1, 3])  # S^2 projector is 2x wider
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*projector.0.weight: checkpoint \(128, 64\) vs model \(128, 128\)"):
        load_libmoe_checkpoint(wide, libmoe_state_dict(model, moe=False))


def test_mm_projector_bin_file(tmp_path):
    model = build_model("tiny", image_pool=1)
    sd = {k: v for k, v in libmoe_state_dict(model, moe=False).items() if "mm_projector" in k}
    torch.save(sd, tmp_path / "mm_projector.bin")
    report = load_libmoe_checkpoint(model, tmp_path / "mm_projector.bin")
    assert report.loaded == ["projector.0.bias", "projector.0.weight", "projector.2.bias", "projector.2.weight"]
    assert torch.equal(model.projector[2].weight, sd["model.mm_projector.2.weight"])


def _gate_keys(sd):
    return [k for k in sd if k.endswith("moelayer.gate.weight")]


def test_a_projected_router_checkpoint_does_not_import_its_unused_gate():
    """LibMoE's smoe_cosinegating / smoe_perturbed (v2) / xmoe route through inp_reduction and
    expert_embeddings; their gate Linear is created but never used. It was loaded as our cosine
    router's gate: routing unrelated to LibMoE's, with nothing reported."""
    model = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=E, router="cosine")
    sd = libmoe_state_dict(model)
    for gate in _gate_keys(sd):
        layer = gate[: -len(".gate.weight")]
        sd[layer + ".inp_reduction.weight"] = torch.randn(E // 2, sd[gate].shape[1])
        sd[layer + ".expert_embeddings"] = torch.randn(E, E // 2)
    before = model.vision_tower.layers[0].mlp.router.gate.weight.clone()
    with pytest.warns(UserWarning, match=r"routers of 3 MoE layer\(s\) .* keep their fresh initialisation"):
        report = load_libmoe_checkpoint(model, sd)
    assert torch.equal(model.vision_tower.layers[0].mlp.router.gate.weight, before)
    gate = "model.vision_tower.vision_model.encoder.layers.0.moelayer.gate.weight"
    assert "never used" in report.unused[gate]
    # their own router parameters are reported under their names
    assert "model.vision_tower.vision_model.encoder.layers.0.moelayer.inp_reduction.weight" in report.unused
    assert report.fresh_routers == ["projector", "vision_tower.model.encoder.layers.0.mlp",
                                    "vision_tower.model.encoder.layers.1.mlp"]
    assert "vision_tower.model.encoder.layers.0.mlp.router.gate.weight" in report.missing
    with pytest.raises(ValueError, match="not in the checkpoint"):
        load_libmoe_checkpoint(model, sd, strict=True)


@pytest.mark.parametrize(("router", "target"), [("sigmoid", "gate.bias"), ("perturbed_cosine", "selection_bias")])
def test_a_gate_bias_is_imported_where_the_router_has_one(router, target):
    # LibMoE's v1.1 smoe_sigmoidgating and early smoe_perturbed gates are Linear(d, E, bias=True)
    model = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=E, router=router)
    sd = libmoe_state_dict(model)
    for gate in _gate_keys(sd):
        sd[gate.replace(".weight", ".bias")] = torch.randn(E)
    report = load_libmoe_checkpoint(model, sd, strict=True)
    assert report.fresh_routers == []
    bias = "model.vision_tower.vision_model.encoder.layers.1.moelayer.gate.bias"
    assert torch.equal(model.vision_tower.layers[1].mlp.router.get_parameter(target), sd[bias])
    smoe = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=E)
    assert "does not have" in load_libmoe_checkpoint(smoe, sd).unused[bias]  # no bias in our smoe gate


def test_the_checkpoints_moe_settings_must_match_the_model(tmp_path):
    """A Cosine-R checkpoint loaded silently into an smoe model at another top-k before."""
    from safetensors.torch import save_file

    model = build_model("tiny", image_pool=1, moe_vision=True, moe_projector=True, num_experts=E)
    save_file(libmoe_state_dict(model), tmp_path / "model.safetensors")
    torch.save({"output_dir": "x"}, tmp_path / "training_args.bin")  # the HF Trainer's: not weights
    config = {"moe_name": "smoe_cosinegating", "num_experts": E, "num_selected": 1, "clip_smoe": True, "mlp_smoe": True}
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    with pytest.raises(ValueError, match=r"(?s)vision: checkpoint moe_name='smoe_cosinegating' \(ours: cosine\) vs "
                                         r"model router 'smoe'.*vision: checkpoint num_selected=1 vs model top_k=2"):
        load_libmoe_checkpoint(model, tmp_path)
    config.update(moe_name="smoe", num_selected=2)
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    assert load_libmoe_checkpoint(model, tmp_path, strict=True).missing == []
    dense_projector = build_model("tiny", image_pool=1, moe_vision=True, num_experts=E)
    with pytest.raises(ValueError, match="mlp_smoe=True but the model has no MoE projector"):
        load_libmoe_checkpoint(dense_projector, tmp_path)


def test_a_dense_weight_that_does_not_fit_the_experts_is_named():
    model = build_model("tiny", image_pool=1, moe_vision=True, num_experts=E)
    sd = libmoe_state_dict(build_model("tiny", image_pool=1), moe=False)
    key = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    sd[key] = torch.randn(32, 64)  # half the width
    with pytest.raises(ValueError, match=rf"shape mismatch .*{key} \(32, 64\) does not fit the experts"):
        load_libmoe_checkpoint(model, sd)
