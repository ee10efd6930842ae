"""Grouped dispatch equals the per-token loop oracle (outputs and gradients), with edge cases."""

import pytest
import torch
from host_reads import host_reads
from oracles import grads_of, loop_moe_forward
from torch import nn

from libmoe_core.moe import ROUTERS, build_moe, grouped_linear
from libmoe_core.moe.experts import probe_grouped_mm
from libmoe_core.moe.layer import capacity_mask

IMPLS = ["loop", "grouped_mm"]


def gated_mlp(d=16, h=24):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(
        LlamaConfig(hidden_size=d, intermediate_size=h, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2)
    )


def plain_mlp(d=16, h=24, out=None):
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, out or d))


def distinct_layer(router, e=4, k=2, impl="loop", mlp=None, **kw):
    """An upcycled layer with noise, so every expert computes something different."""
    layer = build_moe(mlp or gated_mlp(), router, e, k, noise=0.5, impl=impl, seed=3, **kw)
    with torch.no_grad():  # larger router weights: routing decisions spread over experts
        for p in layer.router.parameters():
            if p.requires_grad and p.dim() == 2:
                p.mul_(50)
    return layer


def assert_matches_oracle(layer, x, atol=1e-5):
    y, grads, gx = grads_of(layer, x, layer)
    y_ref, grads_ref, gx_ref = grads_of(layer, x, lambda t: loop_moe_forward(layer, t))
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=atol, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_dispatch_matches_loop_oracle(router, impl):
    layer = distinct_layer(router, impl=impl)
    x = torch.randn(3, 5, 16)
    assert_matches_oracle(layer, x)
    assert len(set(layer.last_routing.experts.flatten().tolist())) > 1


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_experts_with_bias_and_projector_shape(impl):
    layer = distinct_layer("smoe", mlp=plain_mlp(16, 24, out=8), impl=impl)
    x = torch.randn(2, 6, 16)
    assert layer(x).shape == (2, 6, 8)
    assert_matches_oracle(layer, x)


@pytest.mark.parametrize("impl", IMPLS)
def test_an_expert_receiving_no_tokens(impl):
    layer = distinct_layer("smoe", e=4, k=2, impl=impl)
    with torch.no_grad():
        layer.router.gate.weight[3].fill_(0)
        layer.router.gate.weight[3, 0] = -1e4  # expert 3 never wins
    x = torch.randn(10, 16)
    x[:, 0] = x[:, 0].abs() + 0.1
    assert_matches_oracle(layer, x)
    assert 3 not in layer.last_routing.experts
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.experts.w_in.grad[3]) == 0
    assert torch.count_nonzero(layer.experts.w_in.grad[:3]) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_on_one_expert(impl):
    layer = distinct_layer("smoe", e=4, k=1, impl=impl)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[2, 0] = 1e3
    x = torch.randn(9, 16)
    x[:, 0] = x[:, 0].abs() + 0.1
    assert_matches_oracle(layer, x)
    assert (layer.last_routing.experts == 2).all()
    expected = layer.experts.expert_forward(2, x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_equals_e(impl):
    layer = distinct_layer("smoe", e=4, k=4, impl=impl)
    assert_matches_oracle(layer, torch.randn(6, 16))
    assert (layer.last_routing.experts.sort(-1).values == torch.arange(4)).all()


def test_k_greater_than_e_is_an_error():
    with pytest.raises(ValueError, match="top_k=5"):
        build_moe(gated_mlp(), "smoe", num_experts=4, top_k=5)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_token_and_non_contiguous_input(impl):
    layer = distinct_layer("sigmoid", impl=impl)
    assert_matches_oracle(layer, torch.randn(1, 16))
    assert layer(torch.randn(16)).shape == (16,)
    wide = torch.randn(16, 6, 2)
    x = wide.permute(2, 1, 0)  # [2, 6, 16], not contiguous
    assert not x.is_contiguous()
    assert_matches_oracle(layer, x)
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_layer_routing_record_shapes():
    layer = distinct_layer("smoe", e=4, k=2)
    layer(torch.randn(2, 3, 16))
    r = layer.last_routing
    assert r.experts.shape == (2, 3, 2) and r.weights.shape == (2, 3, 2) and r.probs.shape == (2, 3, 4)
    assert r.aux_loss.requires_grad and set(r.aux_terms) == {"balance", "z"}


def test_capacity_factor_drops_and_counts():
    layer = distinct_layer("smoe", e=4, k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[1, 0] = 1e3
    x = torch.randn(8, 16)
    x[:, 0] = x[:, 0].abs() + 0.1
    y = layer(x)
    capacity = 1  # ceil(0.5 * 8 / 4)
    assert layer.last_routing.dropped == 8 - capacity
    kept = layer.experts.expert_forward(1, x[:1])
    torch.testing.assert_close(y[:1], kept, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1:], torch.zeros_like(y[1:]))
    layer.capacity_factor = 1.3  # a fractional capacity rounds up: ceil(1.3 * 8 / 4) = 3
    y = layer(x)
    assert layer.last_routing.dropped == 8 - 3
    torch.testing.assert_close(y[:3], layer.experts.expert_forward(1, x[:3]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[3:], torch.zeros_like(y[3:]))


@pytest.mark.parametrize("router", ["shared", "shared_sigmoid"])
def test_capacity_never_drops_the_always_on_shared_expert(router):
    """The capacity caps the routed experts at capacity_factor x their even share of the routed
    slots; the shared expert (every token, last slot) is neither capped nor counted."""
    layer = distinct_layer(router, e=4, k=3, capacity_factor=1.0)
    x = torch.randn(60, 16)
    y = layer(x)
    ids = layer.last_routing.experts  # [T, k]; slot k-1 is the shared expert 3
    assert (ids[:, -1] == 3).all()
    routed = ids[:, :-1]
    capacity = 40  # ceil(1.0 * 60 tokens * 2 routed slots / 3 routed experts)
    kept = capacity_mask(routed, 4, capacity)
    assert layer.last_routing.dropped == int((kept < 0).sum()) > 0  # the routed experts do overflow here
    weights = layer.last_routing.weights * torch.cat([kept >= 0, torch.ones_like(kept[:, :1], dtype=torch.bool)], -1)
    expected = sum(
        weights[:, slot : slot + 1] * torch.stack([layer.experts.expert_forward(int(e), x[t : t + 1])[0]
                                                  for t, e in enumerate(ids[:, slot])])
        for slot in range(3)
    )  # a plain per-token loop over the kept slots
    if layer.router.extra_output(x, layer.router(x)) is not None:
        expected = expected + layer.router.extra_output(x, layer.router(x))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_an_input_without_tokens_gives_an_empty_output_in_the_graph():
    """Like the dense MLP: [..., 0 tokens, d] -> [..., 0, out], and backward gives zero gradients."""
    layer = distinct_layer("smoe")
    dense = gated_mlp()
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        assert y.shape == dense(x).shape == (*shape[:-1], 16)
        layer.zero_grad(set_to_none=True)
        y.sum().backward()
        assert x.grad.shape == x.shape
        grads = [p.grad for p in layer.parameters() if p.requires_grad]
        assert grads and all(g is not None and not g.any() for g in grads)  # zero, not missing (as for the dense MLP)
        assert layer.last_routing.experts.shape == (*shape[:-1], 2) and layer.last_routing.aux_loss.item() == 0


def test_capacity_mask_prefers_first_choices():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    # capacity 2: expert 0 gets rank-0 slots of tokens 0, 1 then token 2's second choice is dropped
    kept = capacity_mask(ids, 2, 2)
    assert kept.tolist() == [[0, 1], [0, -1], [1, -1]]
    # no drops without capacity pressure
    assert torch.equal(capacity_mask(ids, 2, 3), ids)


def test_grouped_linear_impls_agree_with_plain_matmul():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 8, requires_grad=True)
    b = torch.randn(3, 8, requires_grad=True)
    counts = torch.tensor([2, 0, 4])
    x = torch.randn(6, 4, requires_grad=True)
    expected = torch.cat([x[:2] @ w[0] + b[0], x[2:] @ w[2] + b[2]])
    ex, ew, eb = torch.autograd.grad(expected.sum(), (x, w, b))
    for impl in IMPLS:
        out = grouped_linear(x, w, counts, b, impl)
        torch.testing.assert_close(out, expected)
        gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
        torch.testing.assert_close(gx, ex)
        torch.testing.assert_close(gw, ew)
        torch.testing.assert_close(gb, eb)
    with pytest.raises(ValueError, match="unknown grouped"):
        grouped_linear(x, w, counts, b, "magic")
    with pytest.raises(ValueError, match="multiples of 16 bytes"):
        grouped_linear(torch.randn(6, 5), torch.randn(3, 5, 7), counts, None, "grouped_mm")
    assert grouped_linear(torch.randn(6, 5), torch.randn(3, 5, 7), counts, None, "auto").shape == (6, 7)


def test_dispatch_is_batch_invariant():
    layer = distinct_layer("smoe")
    x = torch.randn(4, 5, 16)
    full = layer(x)
    for i in range(4):
        torch.testing.assert_close(layer(x[i : i + 1]), full[i : i + 1], atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_grouped_mm_on_cuda_bf16_matches_loop():
    assert probe_grouped_mm("cuda", torch.bfloat16), "this GPU/torch runs torch._grouped_mm wrongly: auto uses the loop"
    layer = distinct_layer("smoe", e=8, k=2, impl="grouped_mm").cuda().to(torch.bfloat16)
    x = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    layer.experts.impl = "loop"
    torch.testing.assert_close(y, layer(x), atol=2e-2, rtol=2e-2)


def bias_gradient_rows(device):
    """A bf16 expert bias over rows sorted by expert (4096 rows, one expert idle), and its fp64 gradient."""
    torch.manual_seed(0)
    counts = torch.tensor([3000, 0, 1000, 96], device=device)
    grad = torch.randn(4096, 64, dtype=torch.bfloat16, device=device)
    exact = torch.stack([g.double().sum(0) for g in torch.split(grad, counts.tolist())])  # [E, out]
    return counts, grad, exact


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_grouped_mm_bias_gradient_sums_each_expert_in_fp32(device, monkeypatch):
    """autograd's backward of the repeated bias added rows into the bf16 gradient one by one (on CUDA
    by atomics: 8 bits kept of every partial sum, ~15 % off at 4096 rows, order-dependent). Oracle: the
    fp64 sum of each expert's rows, rounded once to bf16; the sum is taken in fp32."""
    counts, grad, exact = bias_gradient_rows(device)
    if not probe_grouped_mm(device, torch.bfloat16):
        pytest.skip(f"torch._grouped_mm does not run correctly on {device} in bf16 here")
    seen = []
    real = torch.segment_reduce
    monkeypatch.setattr(torch, "segment_reduce", lambda data, *a, **kw: seen.append(data.dtype) or real(data, *a, **kw))
    x = torch.randn(4096, 16, device=device, dtype=torch.bfloat16)
    w = torch.zeros(4, 16, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    grouped_linear(x, w, counts, b, "grouped_mm").backward(grad)
    assert seen == [torch.float32]  # each expert's rows summed in fp32
    torch.testing.assert_close(b.grad, exact.to(torch.bfloat16), rtol=0, atol=0)


def test_the_grouped_mm_probe_refuses_builds_that_raise_or_miscompute(monkeypatch):
    """torch 2.8 raises on GPUs other than compute capability 9.0 and has no CPU kernel; one GPU
    generation gave an idle expert a non-zero weight gradient. auto must then take the loop."""
    from libmoe_core.moe import Experts
    from libmoe_core.moe import experts as experts_module

    assert probe_grouped_mm("cpu", torch.float32)  # this torch runs it on CPU
    real = torch._grouped_mm

    def refuses(*args, **kwargs):
        raise RuntimeError("torch._grouped_mm is only supported on CUDA devices with compute capability = 9.0")

    def leaks_into_empty_groups(x, w, offs):  # the product right, an empty group's weight gradient not
        return real(x, w, offs=offs) + (w[1].sum() - w[1].sum().detach())  # + 0, gradient 1 per output

    for fake in (refuses, leaks_into_empty_groups):
        monkeypatch.setattr(torch, "_grouped_mm", fake)
        assert not probe_grouped_mm("cpu", torch.float32), fake.__name__
    monkeypatch.setattr(torch, "_grouped_mm", real)
    experts = Experts(4, 8, 12, 8, gated=True, activation=nn.SiLU())
    x = torch.randn(10, 8)
    assert experts.auto_impl(x) == "grouped_mm"  # small aligned fp32 batch on CPU
    monkeypatch.setattr(experts_module, "grouped_mm_works", lambda device, dtype: False)
    assert experts.auto_impl(x) == "loop"


@pytest.mark.parametrize("block_elements", [1, 60, 1 << 21])  # backward blocks: 1 expert, 2 (gated), all
@pytest.mark.parametrize("gated", [True, False])
def test_fused_expert_mlp_matches_two_grouped_products(gated, block_elements, monkeypatch):
    """The loop impl runs each expert's whole MLP at once (custom backward in blocks of experts);
    it must equal the composition of two grouped products (autograd's backward) for any subset of
    inputs that need gradients, with an expert that gets no rows, and without grad."""
    from libmoe_core.moe import Experts
    from libmoe_core.moe import experts as experts_module

    monkeypatch.setattr(experts_module, "_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    experts = Experts(4, 8, 6, 5, gated=gated, activation=nn.GELU(approximate="tanh"), bias=True, impl="loop")
    with torch.no_grad():
        for p in (experts.b_in, experts.b_out):
            p.normal_()
    counts = torch.tensor([4, 0, 3, 2])
    x = torch.randn(9, 8)
    probe = torch.randn(9, 5)

    def reference(x):
        h = grouped_linear(x, experts.w_in, counts, experts.b_in, "loop")
        return grouped_linear(experts.activate(h), experts.w_out, counts, experts.b_out, "loop")

    params = dict(experts.named_parameters())
    for trainable in (set(params) | {"x"}, {"x"}, {"w_out"}, {"w_in", "b_out"}):
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        xin = x.clone().requires_grad_("x" in trainable)
        wrt = [xin] * ("x" in trainable) + [p for name, p in params.items() if name in trainable]
        got = experts(xin, counts)
        expected = reference(xin)
        torch.testing.assert_close(got, expected)
        for g, e in zip(
            torch.autograd.grad((got * probe).sum(), wrt), torch.autograd.grad((expected * probe).sum(), wrt)
        ):
            torch.testing.assert_close(g, e)
        if "w_in" in trainable:
            assert torch.count_nonzero(torch.autograd.grad(experts(xin, counts).sum(), experts.w_in)[0][1]) == 0
    with torch.no_grad():
        torch.testing.assert_close(experts(x, counts), reference(x))


def test_backward_blocks_cover_every_expert_once():
    from libmoe_core.moe.experts import _blocks

    counts = [3, 0, 5, 1, 0, 6]
    for width in (1, 2, 4, 1 << 22):
        blocks = list(_blocks(counts, width))
        rows = [(e, block.start + r.start, block.start + r.stop) for block, members in blocks for e, r in members]
        assert rows == [(0, 0, 3), (2, 3, 8), (3, 8, 9), (5, 9, 15)]
        assert [b.start for b, _ in blocks] == [0] + [b.stop for b, _ in blocks[:-1]] and blocks[-1][0].stop == 15


def test_auto_picks_grouped_mm_for_small_aligned_cpu_batches_and_the_fused_loop_otherwise(monkeypatch):
    from libmoe_core.moe import Experts
    from libmoe_core.moe import experts as experts_module

    experts = Experts(4, 8, 12, 8, gated=True, activation=nn.SiLU())
    x = torch.randn(10, 8)
    assert experts.auto_impl(x) == "grouped_mm"  # 10 rows * 24 values: small, widths multiples of 4 floats
    assert experts.auto_impl(x[:0]) == "loop"  # no rows
    assert experts.auto_impl(x.double()) == "loop"  # not fp32
    monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM_MAX_ELEMENTS", 10 * 24 - 1)
    assert experts.auto_impl(x) == "loop"  # intermediate above the threshold
    odd = Experts(4, 8, 6, 8, gated=True, activation=nn.SiLU())  # hidden 6 floats: not 16-byte rows
    assert odd.auto_impl(x) == "loop"
    monkeypatch.setattr(experts_module, "grouped_mm_supported", lambda x, weight: True)  # as on CUDA bf16
    assert experts.auto_impl(x) == "grouped_mm"
    assert odd.auto_impl(x) == "loop"  # the first projection is aligned, the second is not
    assert Experts(4, 8, 12, 6, gated=True, activation=nn.SiLU()).auto_impl(x) == "loop"  # output width 6
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert experts.auto_impl(x, torch.tensor([3, 0, 4, 3])) == "grouped_mm"  # 3 busy experts: no parallel workers
    assert experts.auto_impl(x, torch.tensor([3, 1, 3, 3])) == "loop"  # 4 small experts on 2 threads: parallel workers
    monkeypatch.setattr(experts_module, "_CPU_GROUPED_MM_MAX_ELEMENTS", 10 * 24 - 1)
    counts = torch.tensor([3, 0, 4, 3])
    for impl in ("auto", "loop", "grouped_mm"):
        experts.impl = impl
        if impl == "auto":
            reference = experts(x, counts)  # threshold patched: the fused loop
        torch.testing.assert_close(experts(x, counts), reference, atol=1e-6, rtol=1e-6)


def test_grouped_dispatch_never_waits_for_the_device(monkeypatch):
    """On the grouped_mm path (CUDA bf16) a forward and backward need no value on the host: bincount,
    ``int(counts[...])`` and boolean indexing each waited for the GPU, once or twice per layer and call."""
    for name in ("smoe", "sigmoid", "cosine"):
        layer = distinct_layer(name, e=4, k=2, impl="grouped_mm")
        x = torch.randn(2, 8, 16, requires_grad=True)

        def step(layer=layer, x=x):
            y = layer(x)
            (y.sum() + layer.last_routing.aux_loss).backward()

        assert host_reads(step, monkeypatch) == [], name
