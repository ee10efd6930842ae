"""Parity with transformers' own MoE blocks: same weights -> same outputs and gradients."""

import pytest
import torch
from torch import nn
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from libmoe_core.moe import Experts, MoELayer, get_router_class

D, H = 16, 32


def our_experts_from_hf(hf_experts, impl) -> Experts:
    """HF stores gate_up_proj [E, 2h, d] and down_proj [E, d, h]; we store input-major."""
    e = hf_experts.gate_up_proj.shape[0]
    experts = Experts(e, D, H, D, gated=True, activation=nn.SiLU(), impl=impl)
    with torch.no_grad():
        experts.w_in.copy_(hf_experts.gate_up_proj.transpose(1, 2))
        experts.w_out.copy_(hf_experts.down_proj.transpose(1, 2))
    return experts


def hf_grads(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * probe).sum().backward()
    return y.detach(), x.grad


def init_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize("num_experts,top_k", [(4, 2), (8, 1), (8, 3)])
def test_smoe_matches_mixtral_sparse_block(num_experts, top_k, impl):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=H, num_local_experts=num_experts, num_experts_per_tok=top_k,
                        num_attention_heads=2, num_key_value_heads=2)
    block = MixtralSparseMoeBlock(cfg)
    init_(block)
    router = get_router_class("smoe")(D, num_experts, top_k)
    with torch.no_grad():
        router.gate.weight.copy_(block.gate.weight)
    ours = MoELayer(router, our_experts_from_hf(block.experts, impl))

    x = torch.randn(2, 7, D)
    y_hf, gx_hf = hf_grads(block, x)
    y, gx = hf_grads(ours, x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(router.gate.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.experts.w_in.grad, block.experts.gate_up_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.experts.w_out.grad, block.experts.down_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_shared_router_matches_qwen2_moe_block(norm_topk_prob):
    """Our `shared` router in Qwen2-MoE form: sigmoid-gated shared expert + routed experts."""
    routed, top_k = 4, 2
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=H, shared_expert_intermediate_size=H, num_experts=routed,
                         num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob, num_attention_heads=2, num_key_value_heads=2)
    block = Qwen2MoeSparseMoeBlock(cfg)
    init_(block)
    router = get_router_class("shared")(D, routed + 1, top_k + 1, shared_gate="sigmoid", normalize=norm_topk_prob)
    experts = Experts(routed + 1, D, H, D, gated=True, activation=nn.SiLU())
    with torch.no_grad():
        router.gate.weight.copy_(block.gate.weight)
        router.shared_gate.weight.copy_(block.shared_expert_gate.weight)
        experts.w_in[:routed].copy_(block.experts.gate_up_proj.transpose(1, 2))
        experts.w_out[:routed].copy_(block.experts.down_proj.transpose(1, 2))
        shared = block.shared_expert
        experts.w_in[routed].copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight], 0).t())
        experts.w_out[routed].copy_(shared.down_proj.weight.t())
    ours = MoELayer(router, experts)
    assert not router.preserves_dense_output

    x = torch.randn(3, 5, D)
    y_hf, gx_hf = hf_grads(block, x)
    y, gx = hf_grads(ours, x)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(router.gate.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(router.shared_gate.weight.grad, block.shared_expert_gate.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(experts.w_out.grad[routed], shared.down_proj.weight.grad.t(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(experts.w_in.grad[routed], torch.cat([shared.gate_proj.weight.grad, shared.up_proj.weight.grad], 0).t(),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(experts.w_in.grad[:routed], block.experts.gate_up_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(experts.w_out.grad[:routed], block.experts.down_proj.grad.transpose(1, 2), atol=1e-5, rtol=1e-4)
