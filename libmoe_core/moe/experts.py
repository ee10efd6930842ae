"""Stacked expert weights and the grouped matrix product they run with.

Weights are stored input-major, ``[E, in, out]``, so expert e computes ``x @ W[e]``.
Rows handed to :class:`Experts` are sorted by expert; ``counts[e]`` rows belong to e.
"""

from __future__ import annotations

import torch
from torch import nn

GROUPED_IMPLS = ("auto", "loop", "grouped_mm")


class _SegmentedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W[e] (+ b[e]), one matmul per non-empty expert.

    The split happens once; products are written straight into one output (and, in
    backward, into one stacked weight gradient), so no per-expert full-size gradient
    is ever materialised (LibMoE's ``W[e]`` indexing inside autograd does that).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts: list[int]):
        out = x.new_empty(x.shape[0], weight.shape[-1])  # [S, out]
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                if bias is None:
                    torch.mm(x[rows], weight[e], out=out[rows])
                else:
                    torch.addmm(bias[e], x[rows], weight[e], out=out[rows])
                start += n
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = weight.new_empty(weight.shape[0], weight.shape[-1]) if (need_b and ctx.has_bias) else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            g = grad_out[rows]
            if n == 0:
                if gw is not None:
                    gw[e].zero_()
                if gb is not None:
                    gb[e].zero_()
                continue
            if gx is not None:
                torch.mm(g, weight[e].t(), out=gx[rows])
            if gw is not None:
                torch.mm(x[rows].t(), g, out=gw[e])
            if gb is not None:
                torch.sum(g, dim=0, out=gb[e])
            start += n
        return gx, gw, gb, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned rows and pointers."""
    size = x.element_size()
    return all(n * size % 16 == 0 for n in (x.shape[-1], weight.shape[-1], weight.shape[-2])) and all(
        t.data_ptr() % 16 == 0 for t in (x, weight)
    )


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``auto`` picks ``torch._grouped_mm`` on CUDA for bf16 (where it is fast) when aligned."""
    return hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_aligned(x, weight)


def grouped_linear(
    x: torch.Tensor,  # [S, in], rows sorted by expert
    weight: torch.Tensor,  # [E, in, out]
    counts: torch.Tensor,  # [E] int64 rows per expert
    bias: torch.Tensor | None = None,  # [E, out]
    impl: str = "auto",
) -> torch.Tensor:  # [S, out]
    """One grouped matrix product: each expert's rows times its own weight."""
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x, weight) else "loop"
    if impl == "grouped_mm":
        x = x.contiguous()
        if not grouped_mm_aligned(x, weight):
            raise ValueError(
                f"impl='grouped_mm' needs feature sizes whose rows are multiples of 16 bytes; got in={x.shape[-1]}, "
                f"out={weight.shape[-1]} in {x.dtype}. Use impl='auto' or 'loop'."
            )
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = torch._grouped_mm(x, weight, offs=offsets)
        out = _ContiguousGrad.apply(out)
        if bias is not None:
            out = out + torch.repeat_interleave(bias, counts, dim=0, output_size=x.shape[0])
        return out
    if impl == "loop":
        return _SegmentedLinear.apply(x.contiguous(), weight, bias, counts.tolist())
    raise ValueError(f"unknown grouped matmul implementation {impl!r}; choose one of {GROUPED_IMPLS}")


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``gated=False`` (SigLIP, CLIP, LLaVA projector): fc2(act(fc1(x))).
    ``gated=True`` (Phi-3, Llama, Qwen2, Mistral): down(act(gate(x)) * up(x)); ``w_in``
    holds [gate | up] side by side, ``[E, in, 2h]``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        gated: bool,
        activation: nn.Module,
        bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in GROUPED_IMPLS:
            raise ValueError(f"unknown grouped matmul implementation {impl!r}; choose one of {GROUPED_IMPLS}")
        self.num_experts, self.in_features = num_experts, in_features
        self.hidden_features, self.out_features = hidden_features, out_features
        self.gated, self.impl = gated, impl
        self.act = activation
        width = 2 * hidden_features if gated else hidden_features
        self.w_in = nn.Parameter(torch.empty(num_experts, in_features, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_features, out_features))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        for w in (self.w_in, self.w_out):
            nn.init.normal_(w, std=in_features**-0.5)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [S, in] sorted by expert, counts: [E] -> [S, out]."""
        h = grouped_linear(x, self.w_in, counts, self.b_in, self.impl)  # [S, h or 2h]
        return grouped_linear(self.activate(h), self.w_out, counts, self.b_out, self.impl)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x [N, in] -> [N, out] (for oracles and inspection)."""
        h = x @ self.w_in[e] + (0 if self.b_in is None else self.b_in[e])
        y = self.activate(h) @ self.w_out[e]
        return y + (0 if self.b_out is None else self.b_out[e])

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        return f"{kind}, num_experts={self.num_experts}, {self.in_features}->{self.hidden_features}->{self.out_features}, impl={self.impl}"
