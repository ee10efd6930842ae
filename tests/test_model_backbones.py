"""Phi-3, Llama and Qwen2 language models with SigLIP and CLIP towers at tiny size."""

import pytest
import torch

from libmoe_core.model import LibMoEVLMForCausalLM
from libmoe_core.model.presets import build_model

TOWERS = {"siglip": {}, "clip": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu"}}
LLMS = {
    "phi3": {},
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
}


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("llm", sorted(LLMS))
def test_backbone_forward_backward_and_round_trip(tmp_path, tower, llm):
    model = build_model("tiny", vision_config=TOWERS[tower], text_config=LLMS[llm], moe_vision=[1],
                        moe_projector=True, moe_llm_layers=[0, 2])
    assert model.language_model.config.model_type == (LLMS[llm].get("model_type") or "phi3")
    tok = model.config.image_token_id
    ids = torch.randint(20, 400, (2, 30))
    ids[0, 2:18] = tok
    labels = ids.masked_fill(ids == tok, -100)
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=labels)
    assert {"vision/balance", "projector/balance", "llm/balance"} <= set(out.aux_losses)
    out.loss.backward()
    assert model.language_model.model.layers[0].mlp.router.gate.weight.grad is not None
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=torch.ones(1, 3, 64, 64)).logits
        b = loaded(input_ids=ids, pixel_values=torch.ones(1, 3, 64, 64)).logits
    assert torch.equal(a, b)
    if LLMS[llm].get("tie_word_embeddings"):
        lm = loaded.language_model
        assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
