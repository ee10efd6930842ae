"""Sparse upcycling: turn a dense MLP into an MoE layer whose experts copy it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import Experts
from .layer import MoELayer
from .router_base import _check_number, check_router_options, get_router_class


@dataclass
class DenseMLPWeights:
    """A dense MLP read into the input-major layout of :class:`Experts`."""

    w_in: torch.Tensor  # [in, h] or [in, 2h] ([gate | up]) for gated MLPs
    w_out: torch.Tensor  # [h, out]
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    gated: bool
    activation: nn.Module

    @property
    def in_features(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden_features(self) -> int:
        return self.w_out.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_out.shape[1]


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach()


def _concat_biases(gate: nn.Linear, up: nn.Linear) -> torch.Tensor | None:
    """[gate bias; up bias] of split gate/up projections, zeros for the one without (None: neither)."""
    if gate.bias is None and up.bias is None:
        return None
    parts = [lin.weight.new_zeros(lin.out_features) if lin.bias is None else lin.bias.detach() for lin in (gate, up)]
    return torch.cat(parts)


def read_dense_mlp(mlp: nn.Module) -> DenseMLPWeights:
    """Recognise the MLP families found in VLMs and read their weights.

    Supported: fused gated (Phi-3 ``gate_up_proj``/``down_proj``), split gated (Llama,
    Qwen2, Mistral ``gate_proj``/``up_proj``/``down_proj``), plain (SigLIP, CLIP
    ``fc1``/``fc2``), and ``nn.Sequential(Linear, activation, Linear)`` (LLaVA projector).
    """
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):  # Phi-3: [gate; up] fused
        act = getattr(mlp, "activation_fn", None) or mlp.act_fn
        return DenseMLPWeights(mlp.gate_up_proj.weight.detach().t(), mlp.down_proj.weight.detach().t(),
                               _bias(mlp.gate_up_proj), _bias(mlp.down_proj), True, act)
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):  # Llama family
        w_in = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()], 0).t()
        b_in = _concat_biases(mlp.gate_proj, mlp.up_proj)
        act = getattr(mlp, "act_fn", None) or mlp.activation_fn
        return DenseMLPWeights(w_in, mlp.down_proj.weight.detach().t(), b_in, _bias(mlp.down_proj), True, act)
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):  # SigLIP / CLIP
        act = getattr(mlp, "activation_fn", None) or mlp.act
        return DenseMLPWeights(mlp.fc1.weight.detach().t(), mlp.fc2.weight.detach().t(),
                               _bias(mlp.fc1), _bias(mlp.fc2), False, act)
    if isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear) and isinstance(mlp[2], nn.Linear):
        return DenseMLPWeights(mlp[0].weight.detach().t(), mlp[2].weight.detach().t(),
                               _bias(mlp[0]), _bias(mlp[2]), False, mlp[1])
    raise TypeError(
        f"cannot upcycle {type(mlp).__name__}: expected a gated MLP (gate_up_proj/down_proj or "
        "gate_proj/up_proj/down_proj), a plain MLP (fc1/fc2) or nn.Sequential(Linear, act, Linear)"
    )


def expert_noise_seed(seed: int) -> int:
    """The seed of the upcycling noise of the layer whose router has ``seed``.

    A 64-bit mix, so it never equals another layer's router seed (consecutive small ints).
    """
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


def build_moe(
    dense_mlp: nn.Module,
    router: str = "smoe",
    num_experts: int = 4,
    top_k: int = 2,
    *,
    noise: float = 0.0,
    capacity_factor: float | None = None,
    impl: str = "auto",
    seed: int | None = None,
    **router_options,
) -> MoELayer:
    """Upcycle ``dense_mlp`` into an :class:`MoELayer` whose experts are exact copies of it.

    ``noise`` adds N(0, noise * std(W)) to each copy (0: exact copies). ``seed`` seeds
    the router's initialisation and, through :func:`expert_noise_seed`, the noise (pass a
    different one per layer; None: torch's global RNG); other keyword
    arguments go to the router (``balance_coef``, ``z_coef``, ``k_min``, ...).
    """
    if any(hasattr(p, "ds_shape") and p.numel() == 0 for p in dense_mlp.parameters()):
        raise ValueError(
            f"cannot upcycle {type(dense_mlp).__name__}: its weights are partitioned by DeepSpeed ZeRO-3 "
            "(zero.Init, active once TrainingArguments with a ZeRO-3 config exist); build or load the model "
            "before creating them, as runners/train.py does"
        )
    noise = _check_number("noise", noise)
    dense = read_dense_mlp(dense_mlp)
    router_cls = get_router_class(router)
    check_router_options(router, router_options)
    gate = router_cls(dense.in_features, num_experts, top_k, seed=seed, **router_options)
    ref = dense.w_in
    experts = Experts(
        gate.num_ffn_experts, dense.in_features, dense.hidden_features, dense.out_features,
        gated=dense.gated, activation=dense.activation, bias=dense.b_in is not None or dense.b_out is not None,
        impl=impl,
    ).to(device=ref.device, dtype=ref.dtype)
    gen = None if seed is None else torch.Generator().manual_seed(expert_noise_seed(seed))  # None: torch's global RNG
    with torch.no_grad():
        for stacked, single in ((experts.w_in, dense.w_in), (experts.w_out, dense.w_out), (experts.b_in, dense.b_in), (experts.b_out, dense.b_out)):
            if stacked is None:
                continue
            if single is None:
                stacked.zero_()
                continue
            stacked.copy_(single.unsqueeze(0).expand_as(stacked))
            if noise > 0:
                scale = noise * single.float().std(correction=0).item()  # (a 1-element bias: 0, not NaN)
                stacked.add_(torch.randn(stacked.shape, generator=gen).to(stacked) * scale)
    gate.to(device=ref.device, dtype=ref.dtype)  # one dtype with the experts, as a reloaded model has (fp32_buffers stay fp32)
    return MoELayer(gate, experts, capacity_factor=capacity_factor)
