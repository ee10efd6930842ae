"""Independent reference implementations used only by tests."""

from __future__ import annotations

import torch

from libmoe_core.moe import MoELayer


def loop_moe_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """A plain per-token, per-slot loop: y_t = sum_j w_tj * f_{e_tj}(x_t) (+ router extras).

    Shares nothing with the layer's sort/group/scatter code: it calls each expert on
    one token at a time through ``Experts.expert_forward``.
    """
    tokens = x.reshape(-1, x.shape[-1])
    route = layer.router(tokens)
    ffn = layer.router.ffn_ids(route.experts)
    out_features = layer.experts.out_features
    rows = []
    for t in range(tokens.shape[0]):
        acc = tokens.new_zeros(out_features)
        for j in range(ffn.shape[1]):
            e = int(ffn[t, j])
            if e >= 0:
                acc = acc + route.weights[t, j].to(x.dtype) * layer.experts.expert_forward(e, tokens[t : t + 1])[0]
        rows.append(acc)
    y = torch.stack(rows)
    extra = layer.router.extra_output(tokens, route)
    if extra is not None:
        y = y + extra
    return y.view(*x.shape[:-1], out_features)


def grads_of(module: torch.nn.Module, x: torch.Tensor, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Output, parameter gradients and input gradient of sum(fn(x) * fixed random weights)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(123))
    (y * probe).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters() if p.requires_grad}
    return y.detach(), grads, x.grad.clone()
