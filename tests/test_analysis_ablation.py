"""Drop-top-1 ablation against a hand computation on small upcycled layers."""

import pytest
import torch
from torch import nn

from libmoe_core.analysis.ablation import drop_top1, drop_top1_accuracy_change
from libmoe_core.moe import build_moe


def _layer(k, router="smoe", num_experts=4):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    layer = build_moe(dense, router=router, num_experts=num_experts, top_k=k, noise=0.5, seed=3, init_std=1.0)
    return layer.eval()


@torch.no_grad()
def test_k2_output_is_the_second_expert_alone():
    layer = _layer(2)
    x = torch.randn(2, 5, 8)
    y = layer(x)
    second = layer.last_routing.experts[..., 1].reshape(-1)
    with drop_top1(layer):
        y_abl = layer(x)
        assert layer.last_routing.experts.shape == (2, 5, 1)
    flat = x.reshape(-1, 8)
    expected = torch.stack([layer.experts.expert_forward(int(e), flat[t : t + 1])[0] for t, e in enumerate(second)])
    torch.testing.assert_close(y_abl.reshape(-1, 8), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_abl, y)
    torch.testing.assert_close(layer(x), y)  # hook removed on exit


@torch.no_grad()
def test_k3_renormalises_over_the_rest():
    layer = _layer(3)
    x = torch.randn(6, 8)
    layer(x)
    r = layer.last_routing
    with drop_top1(layer):
        y_abl = layer(x)
    for t in range(6):
        e1, e2 = int(r.experts[t, 1]), int(r.experts[t, 2])
        w1, w2 = r.weights[t, 1], r.weights[t, 2]
        f1, f2 = (layer.experts.expert_forward(e, x[t : t + 1])[0] for e in (e1, e2))
        torch.testing.assert_close(y_abl[t], (w1 * f1 + w2 * f2) / (w1 + w2), rtol=1e-5, atol=1e-5)


def test_restores_on_error_and_rejects_k1():
    layer = _layer(2)
    with pytest.raises(RuntimeError), drop_top1(layer):
        raise RuntimeError("boom")
    assert not layer.router._forward_hooks
    layer_k1 = _layer(1)
    with drop_top1(layer_k1), pytest.raises(ValueError, match="top_k >= 2"):
        layer_k1(torch.randn(3, 8))
    with pytest.raises(ValueError, match="no MoELayer"), drop_top1(nn.Linear(2, 2)):
        pass


def test_accuracy_change_with_a_toy_evaluate_fn():
    model = nn.Sequential(_layer(2), nn.Identity())
    x = torch.randn(32, 8)
    reference = model(x).detach()

    def evaluate(m):  # "accuracy": share of tokens whose output is within tolerance of the unablated one
        out = m(x)
        return {"accuracy": float(((out - reference).abs().amax(-1) < 1e-5).float().mean())}

    result = drop_top1_accuracy_change(evaluate, model)
    assert result["baseline"] == 1.0
    assert result["ablated"] < 1.0
    assert result["change"] == pytest.approx(result["ablated"] - 1.0)
    assert drop_top1_accuracy_change(lambda m: 0.5, model) == {"baseline": 0.5, "ablated": 0.5, "change": 0.0}
    with pytest.raises(KeyError, match="acc"):
        drop_top1_accuracy_change(lambda m: {"acc": 1.0}, model)
