"""Padded tokens are neither routed nor run: no aux loss, load, capacity or compute of theirs.

Oracles: the same layer run on the real tokens alone, transformers' masked
``load_balancing_loss_func``, and the unpadded model.
"""

import pytest
import torch
from test_moe_dispatch import distinct_layer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from libmoe_core.model.placement import placed_moe_layers
from libmoe_core.model.presets import build_model

MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # [B, L]


@pytest.mark.parametrize("router", ["smoe", "sigmoid", "tcmoe", "moepp", "shared", "hyper"])
def test_masked_layer_equals_the_layer_on_the_real_tokens_alone(router):
    layer = distinct_layer(router)
    x = torch.randn(*MASK.shape, 16)
    real = x[MASK]  # [T', d]

    x_masked = x.clone().requires_grad_(True)
    layer.token_mask = MASK
    y = layer(x_masked)
    masked = layer.last_routing
    probe = torch.randn(y.shape)
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)

    x_real = real.clone().requires_grad_(True)
    layer.token_mask = None
    y_ref = layer(x_real)
    ref = layer.last_routing
    (y_ref * probe[MASK]).sum().backward()

    torch.testing.assert_close(y[MASK], y_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(y[~MASK], torch.zeros_like(y[~MASK]))
    torch.testing.assert_close(x_masked.grad[MASK], x_real.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(x_masked.grad[~MASK], torch.zeros_like(x_masked.grad[~MASK]))
    for name, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert masked.aux_terms.keys() == ref.aux_terms.keys()
    for term in ref.aux_terms:
        torch.testing.assert_close(masked.aux_terms[term], ref.aux_terms[term], msg=term)
    torch.testing.assert_close(masked.aux_loss, ref.aux_loss)
    assert torch.equal(masked.experts[MASK], ref.experts)
    assert (masked.experts[~MASK] == -1).all() and (masked.weights[~MASK] == 0).all()
    assert (masked.probs[~MASK] == 0).all()


def test_masked_balance_loss_matches_transformers():
    """Ours counts f over T*k slots, HF's over T tokens, so HF's value is k times ours."""
    k = 2
    layer = distinct_layer("smoe", k=k)
    x = torch.randn(*MASK.shape, 16)
    layer.token_mask = MASK
    layer(x)
    logits = layer.router.scores(x.reshape(-1, 16))  # [B*L, E]
    hf = load_balancing_loss_func((logits,), num_experts=4, top_k=k, attention_mask=MASK.long())
    torch.testing.assert_close(layer.last_routing.aux_terms["balance"] * k, hf)
    unmasked = load_balancing_loss_func((logits,), num_experts=4, top_k=k)
    assert not torch.allclose(hf, unmasked)  # the padding would have changed it


def test_capacity_and_auxfree_load_count_real_tokens_only():
    layer = distinct_layer("auxfree").train()
    layer.router.load_counts.zero_()
    layer.token_mask = MASK
    layer(torch.randn(*MASK.shape, 16))
    assert layer.router.load_counts.sum().item() == MASK.sum().item() * 2

    capped = distinct_layer("smoe", capacity_factor=0.5)
    x = torch.randn(*MASK.shape, 16)
    capped.token_mask = MASK
    y = capped(x)
    dropped = capped.last_routing.dropped
    capped.token_mask = None
    y_ref = capped(x[MASK])  # capacity from the real tokens' slots, not the padded batch's
    assert dropped == capped.last_routing.dropped > 0
    torch.testing.assert_close(y[MASK], y_ref)


def test_token_mask_errors_and_all_padding():
    layer = distinct_layer("smoe")
    layer.token_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"token_mask has shape \(2, 5\).*\(3, 6\)"):
        layer(torch.randn(3, 6, 16))
    layer.token_mask = torch.zeros(3, 6, dtype=torch.bool)
    y = layer(torch.randn(3, 6, 16))
    assert torch.equal(y, torch.zeros(3, 6, 16))
    assert layer.last_routing.aux_loss.item() == 0 and (layer.last_routing.experts == -1).all()


# --------------------------------------------------------------------------- in the model


def text_batch(lengths, width, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), 1)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(20, 400, (n,), generator=g)
        mask[i, cols] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


def llm_inputs(model, inputs):
    """The hidden states each LLM MoE layer received on the last forward, by layer index."""
    seen, hooks = {}, []
    for placement, index, layer in placed_moe_layers(model):
        if placement == "llm":
            hooks.append(layer.register_forward_pre_hook(lambda m, args, i=index: seen.__setitem__(i, args[0].detach())))
    out = model(**inputs)
    for h in hooks:
        h.remove()
    return out, seen


@pytest.mark.parametrize("side", ["right", "left"])
def test_model_llm_aux_losses_ignore_padding(side):
    torch.manual_seed(0)
    model = build_model("tiny", moe_llm_layers="all", noise=0.5).eval()
    ids, mask, pos = text_batch([7, 12], 12, side)
    out, seen = llm_inputs(model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    layers = {i: layer for p, i, layer in placed_moe_layers(model) if p == "llm"}
    assert seen.keys() == layers.keys()
    for i, layer in layers.items():
        logits = layer.router.scores(seen[i].reshape(-1, seen[i].shape[-1]))
        hf = load_balancing_loss_func((logits,), num_experts=4, top_k=2, attention_mask=mask)
        torch.testing.assert_close(layer.last_routing.aux_terms["balance"] * 2, hf, msg=f"llm layer {i}")
        assert (layer.last_routing.experts[~mask.bool()] == -1).all()

    # The short sample alone, unpadded: the same logits at its real positions.
    short = mask[0].bool()
    alone = model(input_ids=ids[:1, short], position_ids=pos[:1, short])
    torch.testing.assert_close(out.logits[0, short], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    ids, mask, _ = text_batch([5, 9], 9, "right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", moe_llm_layers="all", noise=0.5).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None and ".router." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("second_lengths", [[9, 5], [3, 4]], ids=["same-shape", "shorter"])
@pytest.mark.parametrize("enable", ["activation", "gradient", "user_context_fn"])
def test_two_forwards_before_one_backward_recompute_each_with_its_own_mask(second_lengths, enable):
    # Two forwards, one backward (summed micro-batch losses, chosen/rejected pairs): the first
    # forward's checkpointed layers are recomputed after the second forward replaced the masks.
    first = text_batch([5, 9], 9, "right")
    second = text_batch(second_lengths, max(second_lengths), "right")
    entered = []

    def user_context_fn():  # a context_fn of the user's own still runs
        from contextlib import contextmanager

        @contextmanager
        def mark():
            entered.append(1)
            yield

        return mark(), mark()

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", moe_llm_layers="all", noise=0.5).train()
        if checkpointing and enable == "activation":
            model.activation_checkpointing_enable()
        elif checkpointing and enable == "gradient":  # transformers' deprecated alias
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"context_fn": user_context_fn})
        loss = 0
        for ids, mask, _ in (first, second):
            loss = loss + model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".router." in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    assert enable != "user_context_fn" or len(entered) > 0


def test_auxfree_counts_each_token_once_under_gradient_checkpointing():
    """The checkpoint's recompute in backward routes the same tokens again; the load counts them once."""
    ids, mask, _ = text_batch([5, 9], 9, "right")
    labels = ids.masked_fill(mask == 0, -100)
    counts = []
    for checkpointing in (False, True):
        model = build_model("tiny", moe_llm_layers="all", router="auxfree", top_k=2).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        counts.append([layer.router.load_counts.sum().item() for _, _, layer in placed_moe_layers(model)])
    assert counts[0] == counts[1] == [14 * 2] * len(counts[0])  # 5 + 9 real tokens, k = 2


@pytest.mark.parametrize("projector", [False, True])
def test_reentrant_checkpointing_is_an_error_not_a_silent_loss_of_the_aux_gradient(projector):
    """Also with a projector MoE, which is never checkpointed: its aux loss kept the total's
    gradient, and the LLM routers' aux losses lost theirs silently."""
    ids, mask, _ = text_batch([5, 9], 9, "right")
    model = build_model("tiny", moe_llm_layers="all", moe_projector=projector).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    pixels = torch.randn(2, 3, 64, 64)
    image = model.config.image_token_id
    ids = torch.cat([torch.full((2, model.num_image_tokens), image), ids], 1)  # one image per sample
    mask = torch.cat([torch.ones(2, model.num_image_tokens, dtype=mask.dtype), mask], 1)
    with pytest.raises(RuntimeError, match="the aux loss of the llm MoE layer 0 carries no gradient.*use_reentrant"):
        model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids)
    with torch.no_grad():  # no gradient wanted: fine
        assert model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=ids).aux_loss is not None


def test_layers_sharing_a_token_mask_read_its_rows_once(monkeypatch):
    """Finding a mask's real rows waits for the device twice (all(), nonzero()); the LLM's MoE layers
    share the model's mask, so each did it again. Now the first does it, the others reuse the rows,
    and a mask changed in place (or another mask) is read anew."""
    from host_reads import host_reads

    torch.manual_seed(0)
    layers = [distinct_layer("smoe", impl="grouped_mm") for _ in range(3)]
    mask = MASK.clone()
    x = torch.randn(*MASK.shape, 16)
    for layer in layers:
        layer.token_mask = mask
    outputs = []
    reads = host_reads(lambda: outputs.extend(layer(x) for layer in layers), monkeypatch)
    assert len(reads) == 2, reads  # one all(), one nonzero(): not per layer
    for layer, y in zip(layers, outputs):
        layer.token_mask = None
        torch.testing.assert_close(y[MASK], layer(x[MASK]))  # the real tokens, routed alone
        layer.token_mask = mask
    mask[0, 0] = False  # in place: the rows are found again
    assert len(host_reads(lambda: layers[0](x), monkeypatch)) == 2
    assert layers[0](x)[0, 0].abs().sum() == 0
    with torch.inference_mode():  # a mask made there has no version counter: found each time, no error
        inference_mask = MASK.clone()
        for layer in layers:
            layer.token_mask = inference_mask
        for layer, y in zip(layers, outputs):
            torch.testing.assert_close(layer(x), y)
