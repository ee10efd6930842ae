"""Greedy generation: batch size and left padding do not change answers; routing capture."""

import numpy as np
import pytest
import torch
from PIL import Image

from libmoe_core.model.placement import placed_moe_layers
from libmoe_core.model.presets import build_model, build_processor
from libmoe_core.model.routing import capture_routing

QUESTIONS = ["what color is the circle?", "is there a red shape in the image?", "what shape is it?",
             "does the image not contain a blue triangle?"]


def samples():
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 48 + 8 * i, 3), dtype=np.uint8)) for i in range(4)]
    prompts = [f"<|user|>\n<image>\n{q}<|end|>\n<|assistant|>\n" for q in QUESTIONS]
    prompts[2] = "<|user|>\nwhat is two plus two, in words?<|end|>\n<|assistant|>\n"  # text-only sample
    prompts[3] = prompts[3].replace("<image>", "<image><image>")  # two images
    return prompts, [[images[0]], [images[1]], None, [images[2], images[3]]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers="every_other").eval()
    with torch.no_grad():  # sharpen the random LM head so greedy answers are not near-ties
        m.language_model.lm_head.weight.mul_(8)
    m.generation_config.eos_token_id = None  # always generate max_new_tokens
    return m


def test_batch_size_does_not_change_greedy_answers(model):
    processor = build_processor("tiny")
    prompts, images = samples()
    batch = processor(prompts, images, padding_side="left")
    assert (batch["attention_mask"] == 0).any()  # some samples are left padded
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, -6:]
    for i in range(4):
        one = processor([prompts[i]], [images[i]])
        alone = model.generate(**one, max_new_tokens=6, do_sample=False)[:, -6:]
        assert torch.equal(alone[0], together[i]), f"sample {i}: {alone[0].tolist()} vs {together[i].tolist()}"


@pytest.mark.parametrize("expand", [{"num_beams": 2, "num_return_sequences": 2}, {"num_beams": 3}])
def test_beam_search_gives_every_copy_of_a_sample_its_own_images(model, expand):
    # Beams copy each sample; the copies of the two-image sample must see images (2, 3), not
    # (2, 2) and (3, 3). Oracle: each sample generated alone with the same beams.
    processor = build_processor("tiny")
    prompts, images = samples()
    order = [3, 2, 0]  # two images, none, one
    batch = processor([prompts[i] for i in order], [images[i] for i in order], padding_side="left")
    seen = []
    hook = model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        together = model.generate(**batch, max_new_tokens=5, do_sample=False, **expand)[:, -5:]
    finally:
        hook.remove()
    beams, copies = expand["num_beams"], expand.get("num_return_sequences", 1)
    first = batch["pixel_values"]  # [3 images: sample 3's two, sample 0's one]
    expected = [0, 1] * beams + [2] * beams
    fed = [int(torch.stack([(x - img).abs().sum() for img in first]).argmin()) for x in seen[0]]
    assert fed == expected
    for row, i in enumerate(order):
        one = processor([prompts[i]], [images[i]])
        alone = model.generate(**one, max_new_tokens=5, do_sample=False, **expand)[:, -5:]
        assert torch.equal(alone, together[row * copies:(row + 1) * copies]), f"sample {i}"


def test_routing_capture_records_tokens_and_kinds(model):
    processor = build_processor("tiny")
    prompts, images = samples()
    batch = processor(prompts[:2], images[:2])
    before = sum(len(l._forward_hooks) for _, _, l in placed_moe_layers(model)) + len(model._forward_pre_hooks)
    with capture_routing(model, placements=("vision", "llm"), layers={"llm": [3]}) as rec:
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    after = sum(len(l._forward_hooks) for _, _, l in placed_moe_layers(model)) + len(model._forward_pre_hooks)
    assert before == after == 0  # no hooks outside the block
    assert {(r.placement, r.layer) for r in rec.records} == {("vision", 0), ("vision", 1), ("llm", 3)}
    assert rec.calls == 3  # prefill + 2 decode steps feed tokens back
    table = rec.to_table()
    n_real = int(batch["attention_mask"].sum())
    llm = [i for i, p in enumerate(table["placement"]) if p == "llm"]
    kinds = [table["token_kind"][i] for i in llm]
    assert kinds.count("image") == 2 * 16 and kinds.count("generated") == 2 * 2
    assert kinds.count("text") == n_real - 32
    vision_rows = [i for i, p in enumerate(table["placement"]) if p == "vision"]
    assert len(vision_rows) == 2 * 2 * 64  # 2 layers x 2 images x 64 patches
    assert {table["token_kind"][i] for i in vision_rows} == {"image"}
    assert {table["sample"][i] for i in vision_rows} == {0, 1}
    prefill = rec.select("llm", 3)[0]
    assert prefill.experts.shape[1] == 2 and prefill.probs.shape[1] == 4
    torch.testing.assert_close(prefill.probs.sum(-1), torch.ones(len(prefill)))
    # positions count real tokens only, so left padding does not shift them
    assert prefill.position[prefill.sample == 0].tolist() == list(range(int(batch["attention_mask"][0].sum())))
    with pytest.raises(ValueError, match="unknown placement"), capture_routing(model, placements=("decoder",)):
        pass


def test_routing_capture_of_a_forward_given_inputs_embeds(model):
    # no input_ids: LLM tokens are still text (generated on a KV cache), in their sample, pads skipped
    processor = build_processor("tiny")
    batch = processor(["<|user|>\nwhat is two plus two?<|end|>\n<|assistant|>\n", "<|user|>\nhi<|end|>\n<|assistant|>\n"],
                      padding_side="left")
    mask = batch["attention_mask"]
    assert (mask == 0).any()
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    tables = {}
    for how, given in (("ids", {"input_ids": batch["input_ids"]}), ("embeds", {"inputs_embeds": embeds})):
        with torch.no_grad(), capture_routing(model, placements=("llm",)) as rec:
            out = model(attention_mask=mask, use_cache=True, **given)
        tables[how] = rec.to_table()
    ids, emb = tables["ids"], tables["embeds"]
    assert len(emb["placement"]) == 2 * int(mask.sum())  # two MoE layers, real tokens only
    assert set(emb["token_kind"]) == {"text"} and all(e[0] >= 0 for e in emb["experts"])
    for column in ("layer", "sample", "image", "position", "token_kind", "experts"):
        assert emb[column] == ids[column], column
    # one more token as an embedding on the filled cache: generated
    step = model.get_input_embeddings()(torch.tensor([[65], [66]])).detach()
    with torch.no_grad(), capture_routing(model, placements=("llm",)) as rec:
        model(inputs_embeds=step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
              cache=out.cache, use_cache=True)
    table = rec.to_table()
    assert set(table["token_kind"]) == {"generated"} and sorted(set(table["sample"])) == [0, 1]
    assert table["position"][:2] == [int(mask[0].sum()), int(mask[1].sum())]
