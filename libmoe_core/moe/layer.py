"""The MoE layer: route, dispatch to experts with one grouped product, combine.

``MoELayer`` is a drop-in replacement for a dense MLP inside any HF model.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .experts import Experts
from .router_base import Router, _check_number


@dataclass
class Routing:
    """The last forward's routing, shaped like the layer input's leading dims (...)."""

    experts: torch.Tensor  # [..., k] chosen slot ids, rank order (-1: a padded token)
    weights: torch.Tensor  # [..., k] combine weights (fp32)
    probs: torch.Tensor  # [..., S] full router distribution (fp32)
    aux_loss: torch.Tensor  # scalar: sum of coef * term
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted terms
    dropped: int = 0  # slots dropped by the capacity limit

    def view(self, lead: torch.Size) -> Routing:
        """The per-token fields reshaped from [T, ...] to [*lead, ...]."""
        return replace(self, experts=self.experts.view(*lead, self.experts.shape[-1]),
                       weights=self.weights.view(*lead, self.weights.shape[-1]),
                       probs=self.probs.view(*lead, self.probs.shape[-1]))

    def spread(self, rows: torch.Tensor, total: int) -> Routing:
        """Routing of ``total`` tokens from that of the tokens at ``rows`` [T']; the other
        (padded) tokens get expert -1, weight 0 and an all-zero distribution."""

        def fill(t: torch.Tensor, value) -> torch.Tensor:
            return t.new_full((total, t.shape[-1]), value).index_copy(0, rows, t)

        return replace(self, experts=fill(self.experts, -1), weights=fill(self.weights, 0.0),
                       probs=fill(self.probs, 0.0))


def capacity_mask(ffn_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """ffn_ids [T, k] with slots past each expert's capacity set to -1.

    Priority: every token's first choice before any second choice, then token order.
    """
    t, k = ffn_ids.shape
    rank_major = ffn_ids.t().reshape(-1)  # [k*T]: all rank-0 slots first
    key = torch.where(rank_major >= 0, rank_major, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.bincount(sorted_key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts  # [E+1]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_key]
    kept = torch.where(position < capacity, rank_major, torch.full_like(rank_major, -1))
    return kept.view(k, t).t()


class _PermuteRows(torch.autograd.Function):
    """``rows[index]`` for a permutation ``index``; backward gathers with the inverse permutation
    (autograd's own backward of an index is a scatter-add, several times slower on CPU)."""

    @staticmethod
    def forward(ctx, rows, index, inverse):  # rows [N, d], index / inverse [N]
        ctx.save_for_backward(inverse)
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def combine_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the combine weights and sums rows of ``dtype`` in: fp32, or fp64 for fp64 rows."""
    return torch.promote_types(dtype, torch.float32)


class _WeightRows(torch.autograd.Function):
    """``rows * weights`` in :func:`combine_dtype`, saving ``rows`` in its own dtype for backward
    (autograd would keep the fp32 copy: +2 bytes per element of a bf16 layer's [T*k, out] rows)."""

    @staticmethod
    def forward(ctx, rows, weights):  # rows [N, out] any float dtype, weights [N, 1] fp32
        ctx.save_for_backward(rows, weights)
        return rows.to(combine_dtype(rows.dtype)) * weights

    @staticmethod
    def backward(ctx, grad):  # grad [N, out] in the combine dtype
        rows, weights = ctx.saved_tensors
        grad_rows = (grad * weights).to(rows.dtype) if ctx.needs_input_grad[0] else None
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = (grad * rows.to(grad.dtype)).sum(-1, keepdim=True).to(weights.dtype)
        return grad_rows, grad_weights


class _GatherTokenSlots(torch.autograd.Function):
    """``x[order // k]``: the token of every slot, slots in expert order, all T·k slots present.
    Backward puts the slot gradients back in token order and sums each token's k slots."""

    @staticmethod
    def forward(ctx, x, order, inverse, k: int):  # x [T, d], order / inverse [T*k]
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):  # grad [T*k, d] in expert order
        (inverse,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse)  # [T*k, d] token-major
        return per_slot.view(-1, ctx.k, per_slot.shape[-1]).sum(dim=1), None, None, None


def dispatch(
    x: torch.Tensor,  # [T, in]
    ffn_ids: torch.Tensor,  # [T, k] expert ids, -1 = no feed-forward expert
    weights: torch.Tensor,  # [T, k]
    experts: Experts,
    may_drop: bool = True,  # False: the caller knows every id is >= 0
) -> torch.Tensor:  # [T, out]
    """Sort token-slots by expert, run the experts as one grouped product, combine weighted.

    The combine (weighting and the sum over the k slots) runs in fp32 (fp64 for fp64 experts)
    whatever the experts' dtype, so right after upcycling a bf16 layer whose weights sum to 1
    equals the dense MLP."""
    t, k = ffn_ids.shape
    e = experts.num_experts
    flat = ffn_ids.reshape(-1)  # [T*k]
    key = torch.where(flat >= 0, flat, e)  # no-expert slots sort last
    order = torch.sort(key, stable=True).indices  # stable: deterministic, batch-invariant
    counts = torch.zeros(e + 1, dtype=torch.long, device=key.device).scatter_add_(0, key, torch.ones_like(key))  # [E+1]
    # every slot has an expert unless some can be dropped (capacity) or expert-less: no wait for the GPU then
    n_active = t * k - int(counts[e]) if may_drop else t * k
    if n_active == t * k:  # every slot has an expert: permutations both ways, no scatter-add
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slot_weights = _PermuteRows.apply(weights.reshape(-1, 1), order, inverse)  # [T*k, 1] expert order
        rows = experts(_GatherTokenSlots.apply(x, order, inverse, k), counts[:e])  # [T*k, out]
        rows = _WeightRows.apply(rows, slot_weights.float())  # fp32 weighting and sum: bf16 would round w1 + w2 off 1
        per_slot = _PermuteRows.apply(rows, inverse, order)  # [T*k, out] back in token order
    else:  # dropped or expert-less slots contribute zero
        order = order[:n_active]
        rows = experts(x[order // k], counts[:e])  # [S', out]
        rows = _WeightRows.apply(rows, weights.reshape(-1)[order].unsqueeze(-1).float())
        per_slot = rows.new_zeros(t * k, rows.shape[-1]).index_copy(0, order, rows)
    return per_slot.view(t, k, -1).sum(dim=1)  # combine dtype; the layer casts to the input's dtype once


_last_mask_rows: tuple | None = None  # (weakref to a token mask, (its version, device, inference mode), its rows)


def _rows_of(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Indices [T'] of the True entries of ``mask`` (None: all True). Reading them waits for the
    device twice, so the rows of the last mask are kept: the MoE layers of one forward share the
    model's mask and find it once (an in-place change of the mask makes them anew)."""
    global _last_mask_rows
    # an inference tensor has no version counter (an in-place change could not be seen): not kept
    key = None if mask.is_inference() else (mask._version, device, torch.is_inference_mode_enabled())
    memo = _last_mask_rows
    if key is not None and memo is not None and memo[0]() is mask and memo[1] == key:
        return memo[2]
    flat = mask.reshape(-1).to(device=device, dtype=torch.bool)  # [T]
    rows = None if bool(flat.all()) else flat.nonzero().squeeze(1)
    if key is not None:
        _last_mask_rows = (weakref.ref(mask), key, rows)
    return rows


class MoELayer(nn.Module):
    """Router + experts. ``forward(x)`` returns what the replaced dense MLP would: [..., out].

    After each call ``last_routing`` holds the routing (:class:`Routing`) and its
    auxiliary loss, which the model collects into its training loss.
    """

    def __init__(self, router: Router, experts: Experts, *, capacity_factor: float | None = None):
        super().__init__()
        if router.num_ffn_experts != experts.num_experts:
            raise ValueError(f"router '{router.name}' needs {router.num_ffn_experts} experts, got {experts.num_experts}")
        if router.hidden_size != experts.in_features:
            raise ValueError(f"router hidden_size {router.hidden_size} != experts in_features {experts.in_features}")
        if router.requires_square and experts.in_features != experts.out_features:
            raise ValueError(
                f"router '{router.name}' has constant/copy experts that output x itself, so it needs "
                f"in_features == out_features; got {experts.in_features} -> {experts.out_features}"
            )
        if capacity_factor is not None:
            capacity_factor = _check_number("capacity_factor (None: no capacity limit)", capacity_factor, positive=True)
        self.router = router
        self.experts = experts
        self.capacity_factor = capacity_factor
        self.last_routing: Routing | None = None
        #: [..., ] bool (the input's token dims), True = a real token; None = all real. Padded tokens
        #: are neither routed nor run, so they count in no aux loss, load or capacity. The VLM sets
        #: it on its LLM layers from ``attention_mask`` at every forward and leaves it there, so a
        #: gradient-checkpoint recomputation sees the same mask.
        self.token_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def __getstate__(self):
        """Copies and pickles leave out ``last_routing``: the last call's routing is transient, and
        its tensors are in that call's autograd graph, which ``copy.deepcopy`` refuses (an EMA or
        SWA copy of a training model)."""
        state = super().__getstate__()
        return {**state, "last_routing": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.experts.in_features:
            raise ValueError(f"MoELayer expects inputs [..., {self.experts.in_features}], got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])  # [T, in]
        kept = self._kept_rows(lead, tokens.device)  # [T'] rows of real tokens, None = all
        if kept is None:
            y, routing = self._route_and_run(tokens)
        elif kept.numel() == 0:  # no tokens, or every token is padding: nothing to route, no aux loss
            y = self._zeros_in_graph(tokens)
            routing = self._empty_routing(tokens.shape[0], tokens.device)
        else:  # padding: route and run the real tokens only; padded rows output 0
            y_kept, routing = self._route_and_run(tokens.index_select(0, kept))  # [T', out]
            y = y_kept.new_zeros(tokens.shape[0], y_kept.shape[-1]).index_copy(0, kept, y_kept)  # [T, out]
            routing = routing.spread(kept, tokens.shape[0])
        self.last_routing = routing.view(lead)
        return y.view(*lead, y.shape[-1]).to(x.dtype)

    def _kept_rows(self, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
        """Indices of the tokens ``token_mask`` keeps, or None when it keeps every token (an
        input without tokens keeps none)."""
        if math.prod(lead) == 0:
            return torch.zeros(0, dtype=torch.long, device=device)
        mask = self.token_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(
                f"MoELayer.token_mask has shape {tuple(mask.shape)} but the input's token dims are {tuple(lead)}; "
                "set it to a [batch, length] bool mask of this call's tokens, or None"
            )
        return _rows_of(mask, device)

    def _zeros_in_graph(self, tokens: torch.Tensor) -> torch.Tensor:
        """Zeros [T, out] for tokens that are all padding (or none), in the autograd graph of the
        input and of every parameter with zero gradients, as a dense MLP's output would be (a
        backward through it works, and no parameter is left without a gradient)."""
        anchor = tokens[:0].sum()  # 0 from an empty slice: no NaN from the values it skips
        for param in self.parameters():
            if param.requires_grad:
                anchor = anchor + param.reshape(-1)[:0].sum()
        return tokens.new_zeros(tokens.shape[0], self.experts.out_features) + anchor.to(tokens.dtype)

    def _empty_routing(self, total: int, device: torch.device) -> Routing:
        """The routing of ``total`` tokens that are all padding."""
        k, slots = self.router.current_k(), self.router.num_slots
        return Routing(experts=torch.full((total, k), -1, dtype=torch.long, device=device),
                       weights=torch.zeros(total, k, device=device), probs=torch.zeros(total, slots, device=device),
                       aux_loss=torch.zeros((), device=device))

    def _route_and_run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """tokens [T, in] -> (output [T, out], routing of the T tokens)."""
        route = self.router(tokens)
        ffn_ids = self.router.ffn_ids(route.experts)  # [T, k]
        dropped = 0
        if self.capacity_factor is not None:
            kept = self._within_capacity(ffn_ids)
            dropped = int(((kept < 0) & (ffn_ids >= 0)).sum())
            ffn_ids = kept
        may_drop = self.capacity_factor is not None or getattr(self.router, "slot_to_ffn", None) is not None
        y = dispatch(tokens, ffn_ids, route.weights, self.experts, may_drop)
        extra = self.router.extra_output(tokens, route)
        if extra is not None:
            y = y + extra
        routing = Routing(experts=route.experts, weights=route.weights, probs=route.probs,
                          aux_loss=route.aux_loss, aux_terms=route.aux_terms, dropped=dropped)
        return y, routing

    def _within_capacity(self, ffn_ids: torch.Tensor) -> torch.Tensor:
        """ffn_ids [T, k] with the slots past capacity set to -1. The capacity is
        ``capacity_factor`` x the even share of the routed slots; always-on experts (a shared
        expert, once per token) are neither capped nor counted in it."""
        always_on = self.router.always_on_experts
        if not always_on:
            capacity = math.ceil(self.capacity_factor * ffn_ids.numel() / self.num_experts)
            return capacity_mask(ffn_ids, self.num_experts, capacity)
        exempt = torch.isin(ffn_ids, torch.tensor(always_on, device=ffn_ids.device))  # [T, k]
        routed_slots = ffn_ids.numel() - ffn_ids.shape[0] * len(always_on)
        capacity = math.ceil(self.capacity_factor * routed_slots / max(self.num_experts - len(always_on), 1))
        kept = capacity_mask(torch.where(exempt, -1, ffn_ids), self.num_experts, capacity)
        return torch.where(exempt, ffn_ids, kept)

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}"


# --------------------------------------------------------------------------- model-level helpers


def moe_layers(model: nn.Module):
    """(qualified name, MoELayer) for every MoE layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of every MoE layer's last forward (None if there are none).

    Under reentrant gradient checkpointing the layers run without grad and these carry no
    gradient (the kit's VLM refuses that); use ``use_reentrant=False``."""
    losses = [m.last_routing.aux_loss for _, m in moe_layers(model) if m.last_routing is not None]
    return torch.stack(losses).sum() if losses else None


def set_router_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Tell every router the training step (drives the hyper router's k schedule)."""
    for _, m in moe_layers(model):
        m.router.set_step(step, total_steps)


def routers_step_end(model: nn.Module, *, step_applied: bool = True) -> None:
    """Call after each optimiser step (updates auxfree's balancing bias); ``step_applied=False``
    after a step the optimiser skipped (non-finite gradients): the routers discard what it counted."""
    for _, m in moe_layers(model):
        if step_applied:
            m.router.on_step_end()
        else:
            m.router.discard_step()
