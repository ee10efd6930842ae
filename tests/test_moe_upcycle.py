"""Sparse upcycling: experts copy the dense MLP, so the MoE output equals the dense output."""

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, Phi3Config, Qwen2Config, SiglipVisionConfig
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.siglip.modeling_siglip import SiglipMLP

from libmoe_core.moe import ROUTERS, build_moe, get_router_class, read_dense_mlp

D, H = 16, 40
LM = dict(hidden_size=D, intermediate_size=H, num_attention_heads=2, num_key_value_heads=2)
MLPS = {
    "siglip": lambda: SiglipMLP(SiglipVisionConfig(hidden_size=D, intermediate_size=H, num_attention_heads=2)),
    "clip": lambda: CLIPMLP(CLIPVisionConfig(hidden_size=D, intermediate_size=H, num_attention_heads=2)),
    "phi3": lambda: Phi3MLP(Phi3Config(**LM)),
    "llama": lambda: LlamaMLP(LlamaConfig(**LM)),
    "qwen2": lambda: Qwen2MLP(Qwen2Config(**LM)),
    "projector": lambda: nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)),
}
PRESERVING = sorted(n for n in ROUTERS if get_router_class(n)(D, 4, 2).preserves_dense_output)


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module


def test_preserving_routers_are_the_expected_ones():
    assert set(PRESERVING) == {"smoe", "sigmoid", "cosine", "perturbed_cosine", "hyper", "xmoe", "shared", "shared_sigmoid", "auxfree"}


@pytest.mark.parametrize("family", sorted(MLPS))
@pytest.mark.parametrize("router", PRESERVING)
def test_upcycled_output_equals_dense(router, family):
    dense = randomise(MLPS[family]())
    layer = build_moe(dense, router, num_experts=4, top_k=2, seed=11)
    x = torch.randn(3, 6, D)
    with torch.no_grad():
        expected = dense(x)
        for mode in (layer.train, layer.eval):
            mode()
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
            ffn = layer.router.ffn_ids(layer.last_routing.experts) >= 0
            sums = (layer.last_routing.weights * ffn).sum(-1)
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", sorted(set(ROUTERS) - set(PRESERVING)))
def test_non_preserving_routers_really_change_the_output(router):
    dense = randomise(MLPS["phi3"]())
    layer = build_moe(dense, router, num_experts=4, top_k=2, seed=0)
    with torch.no_grad():  # push mass onto the non-FFN / negative slots
        for p in layer.router.parameters():
            p.normal_(0, 2.0)
        x = torch.randn(64, D)
        assert not torch.allclose(layer(x), dense(x), atol=1e-3)


def test_read_dense_mlp_layouts():
    phi3 = randomise(MLPS["phi3"]())
    spec = read_dense_mlp(phi3)
    assert spec.gated and spec.w_in.shape == (D, 2 * H) and spec.w_out.shape == (H, D)
    llama = randomise(MLPS["llama"]())
    spec = read_dense_mlp(llama)
    torch.testing.assert_close(spec.w_in[:, :H], llama.gate_proj.weight.t())
    assert not read_dense_mlp(MLPS["siglip"]()).gated
    with pytest.raises(TypeError, match="cannot upcycle Conv1d"):
        build_moe(nn.Conv1d(2, 2, 1))


class SplitGatedMLP(nn.Module):
    """A Llama-style gated MLP whose gate and up projections differ in having a bias."""

    def __init__(self, gate_bias, up_bias):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, H, bias=gate_bias), nn.Linear(D, H, bias=up_bias)
        self.down_proj, self.act_fn = nn.Linear(H, D), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("gate_bias, up_bias", [(False, True), (True, False)])
def test_split_gated_mlp_with_one_bias_upcycles_exactly(gate_bias, up_bias):
    dense = randomise(SplitGatedMLP(gate_bias, up_bias))
    x = torch.randn(6, D)
    torch.testing.assert_close(build_moe(dense, num_experts=3)(x), dense(x), atol=1e-5, rtol=1e-5)


def test_weights_partitioned_by_zero3_are_a_clear_error():
    dense = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))
    for lin in (dense[0], dense[2]):  # what deepspeed.zero.Init leaves: empty tensors with ds_shape
        lin.weight = nn.Parameter(torch.empty(0))
        lin.weight.ds_shape = (lin.out_features, lin.in_features)
    with pytest.raises(ValueError, match="partitioned by DeepSpeed ZeRO-3"):
        build_moe(dense, num_experts=2)


def test_noise_on_a_one_wide_output_stays_finite():
    dense = randomise(nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, 1)))  # a 1-element output bias
    noisy = build_moe(dense, num_experts=2, noise=0.01, seed=0)
    assert torch.isfinite(noisy.experts.b_out).all() and torch.isfinite(noisy(torch.randn(4, D))).all()


def test_noise_makes_experts_differ_and_dtype_follows_dense():
    dense = randomise(MLPS["phi3"]())
    exact = build_moe(dense, num_experts=3)
    assert all(torch.equal(exact.experts.w_in[0], exact.experts.w_in[i]) for i in range(3))
    noisy = build_moe(dense, num_experts=3, noise=0.01, seed=1)
    assert not torch.equal(noisy.experts.w_in[0], noisy.experts.w_in[1])
    rel = (noisy.experts.w_in[0] - exact.experts.w_in[0]).std() / exact.experts.w_in[0].std()
    assert 0.005 < rel.item() < 0.02
    # the noise is not the next layer's router initialisation (layer i+1's router seed is seed + 1)
    next_router = build_moe(dense, num_experts=3, seed=2).router.gate.weight.flatten()  # [E*D]
    noise = (noisy.experts.w_in - exact.experts.w_in).flatten()[: next_router.numel()]
    assert abs(torch.corrcoef(torch.stack([noise, next_router]))[0, 1].item()) < 0.5  # it was 1.0
    torch.testing.assert_close(build_moe(dense, num_experts=3, noise=0.01, seed=1).experts.w_in, noisy.experts.w_in)
    unseeded = [build_moe(dense, num_experts=3, noise=0.01).experts.w_in for _ in range(2)]
    assert not torch.equal(unseeded[0], unseeded[1])  # seed=None: torch's global RNG, not one fixed stream
    half = build_moe(randomise(MLPS["phi3"]()).to(torch.bfloat16), num_experts=2)
    # one dtype with the dense MLP, routers too (a reload gives them the checkpoint's dtype; the
    # router's math still runs in fp32)
    assert half.experts.w_in.dtype == torch.bfloat16 and half.router.gate.weight.dtype == torch.bfloat16
    assert half(torch.randn(2, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["phi3", "siglip", "projector"])
@pytest.mark.parametrize("router", PRESERVING)
def test_upcycled_bf16_output_equals_dense_exactly(router, family):
    """bf16 experts are copies, so each computes the dense output bit for bit; the combine runs in
    fp32 so weights summing to 1 give it back exactly (a bf16 combine rounded w1*y + w2*y: up to
    one bf16 step off in ~1/6 of the elements)."""
    dense = randomise(MLPS[family]()).to(torch.bfloat16)
    layer = build_moe(dense, router, num_experts=4, top_k=2, seed=11, impl="loop")
    x = torch.randn(4, 32, D).to(torch.bfloat16)
    with torch.no_grad():
        out, expected = layer(x), dense(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected), f"{int((out != expected).sum())} of {out.numel()} elements differ"


def test_bf16_layer_keeps_its_rows_in_bf16_for_backward():
    """The fp32 combine saved an fp32 copy of the [T*k, out] rows for backward (+2 bytes each)."""
    layer = build_moe(randomise(MLPS["phi3"]()).to(torch.bfloat16), "smoe", num_experts=4, top_k=2, seed=0)
    x = torch.randn(64, D, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= 64 * 2 * D]
    assert big_fp32 == [], big_fp32
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.router.gate.weight.grad is not None
