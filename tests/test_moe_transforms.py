"""The MoE layer under what researchers do to modules: autocast, fp64, copies, meta-device builds."""

import copy

import pytest
import torch
from oracles import grads_of, loop_moe_forward
from test_moe_dispatch import distinct_layer, gated_mlp, plain_mlp

from libmoe_core.moe import ROUTERS, build_moe

IMPLS = ["loop", "grouped_mm"]
BUFFERED = ["tcmoe", "moepp", "auxfree"]  # routers with non-persistent buffers


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", ["gated", "plain"])
def test_under_autocast_experts_run_like_the_dense_mlp_does(family, impl):
    """Autocast does not reach ``out=`` products or ``torch._grouped_mm``: the experts ran in fp32
    and the upcycled layer differed from the dense MLP under the same autocast by ~1e-2."""
    torch.manual_seed(0)
    dense = gated_mlp() if family == "gated" else plain_mlp()
    layer = build_moe(dense, "smoe", 4, 2, impl=impl, seed=0)
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = dense(x).float()
        out = layer(x)
    # combine weights sum to 1 over two bf16-identical expert rows: the dense bf16 result, in fp32;
    # exactly so but for grouped_mm with biases, which adds the bias after rounding the product
    exact = impl == "loop" or family == "gated"
    tol = 1e-6 if exact else 1e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    assert (out - dense(x)).abs().max() > 1e-4  # the fp32 dense differs: the experts really ran in bf16
    out.square().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32 and layer.experts.w_in.grad.abs().sum() > 0


def test_autocast_keeps_fp64_inputs_in_fp64():
    layer = distinct_layer("smoe").double()
    x = torch.randn(12, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    torch.testing.assert_close(out, loop_moe_forward(layer, x).detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("router", ["smoe", "shared", "moepp", "tcmoe"])
def test_fp64_layer_matches_the_fp64_loop_to_fp64_precision(router):
    """The combine rounded fp64 rows through fp32 (7e-8 off the oracle, gradients too)."""
    layer = distinct_layer(router, e=4, k=2).double()
    x = torch.randn(24, 16, dtype=torch.float64)
    y, grads, gx = grads_of(layer, x, layer)
    y_ref, grads_ref, gx_ref = grads_of(layer, x, lambda t: loop_moe_forward(layer, t))
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=1e-12)
    for name in grads:
        if "router" not in name:  # router math is fp32 by design; the experts' gradients are fp64
            torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_deepcopy_after_a_training_step(router):
    """``last_routing`` holds tensors of the last call's graph, which deepcopy refuses (an EMA or
    SWA copy of a model in training raised)."""
    layer = distinct_layer(router)
    x = torch.randn(10, 16)
    layer(x).sum().backward()
    twin = copy.deepcopy(layer)
    assert twin.last_routing is None and layer.last_routing is not None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)


def test_deepcopy_of_the_vlm_after_a_training_forward():
    from libmoe_core.model.presets import build_model

    model = build_model("tiny", moe_llm_layers=[1])
    model.train()
    ids = torch.randint(5, 100, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    twin = copy.deepcopy(model)
    twin.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("router", BUFFERED)
def test_meta_device_build_then_load_restores_computed_buffers(router):
    """Buffers outside the state dict (slot tables, load counters) were left as uninitialised
    memory by ``to_empty`` + ``load_state_dict`` (tcmoe crashed, moepp silently mis-routed)."""
    layer = distinct_layer(router)
    with torch.device("meta"):
        twin = build_moe(gated_mlp(), router, 4, 2, impl="loop", seed=3)
    twin = twin.to_empty(device="cpu")
    for buf in twin.router.computed_buffers():
        getattr(twin.router, buf).fill_(7)  # what uninitialised memory may hold
    twin.load_state_dict(layer.state_dict(), strict=True)
    for name, value in layer.router.computed_buffers().items():
        assert torch.equal(getattr(twin.router, name), value), name
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)


def test_computed_buffers_are_the_built_ones_and_keep_their_dtype_under_casts():
    for router in BUFFERED:
        r = distinct_layer(router).router
        fresh = r.computed_buffers()
        assert set(fresh) == set(r._non_persistent_buffers_set)
        for name, value in fresh.items():
            assert torch.equal(getattr(r, name), value), (router, name)
    tc = distinct_layer("tcmoe").to(torch.bfloat16).router
    tc.load_state_dict(tc.state_dict())
    assert tc.slot_sign.dtype == torch.float32 and tc.slot_to_ffn.dtype == torch.long


@pytest.mark.parametrize("router", BUFFERED)
def test_load_with_assign_puts_computed_buffers_beside_the_parameters(router):
    """``load_state_dict(assign=True)`` into a meta-built layer left the recomputed buffers on meta."""
    layer = distinct_layer(router)
    with torch.device("meta"):
        twin = build_moe(gated_mlp(), router, 4, 2, impl="loop", seed=3)
    twin.load_state_dict(layer.state_dict(), strict=True, assign=True)
    assert {b.device.type for b in twin.router.buffers()} == {"cpu"}
    x = torch.randn(10, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)


def test_a_load_refreshes_computed_buffers_in_place():
    """A wrapper holding the buffer objects (DDP broadcasts them) must see the fresh values."""
    layer = distinct_layer("tcmoe")
    table = layer.router.slot_to_ffn
    table.fill_(0)
    layer.load_state_dict(layer.state_dict())
    assert layer.router.slot_to_ffn is table and torch.equal(table, layer.router.computed_buffers()["slot_to_ffn"])


def test_a_plugin_routers_own_non_persistent_buffer_survives_from_pretrained(tmp_path, monkeypatch):
    """A router of your own may register a non-persistent buffer the ordinary way, without listing it
    in computed_buffers(): from_pretrained (whose loader never calls load_state_dict) rebuilds it from a
    fresh twin of the router, as before computed buffers existed (it was left uninitialised)."""
    from libmoe_core.model import LibMoEVLMForCausalLM
    from libmoe_core.model.placement import placed_moe_layers
    from libmoe_core.model.presets import build_model
    from libmoe_core.moe import ROUTERS
    from libmoe_core.moe.routers import SMoERouter

    class ReversedIds(SMoERouter):
        def __init__(self, hidden_size, num_experts, top_k, **kw):
            super().__init__(hidden_size, num_experts, top_k, **kw)
            self.register_buffer("perm", torch.arange(num_experts).flip(0), persistent=False)

        def select(self, logits):
            idx, w, p = super().select(logits)
            return self.perm[idx], w, p

    ReversedIds.name = "test_reversed_ids"
    monkeypatch.setitem(ROUTERS, "test_reversed_ids", ReversedIds)
    model = build_model("tiny", router="test_reversed_ids", moe_llm_layers=[0])
    model.save_pretrained(tmp_path)
    loaded = LibMoEVLMForCausalLM.from_pretrained(tmp_path)
    ((_, _, layer),) = placed_moe_layers(loaded)
    assert layer.router.perm.tolist() == [3, 2, 1, 0]
    ids = torch.randint(5, 100, (1, 9))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)
