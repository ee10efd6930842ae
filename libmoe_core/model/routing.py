"""Routing capture: record per-token expert choices of chosen placements and layers.

    with capture_routing(model, placements=("vision", "llm"), layers={"llm": [1, 3]}) as rec:
        model.generate(**inputs, max_new_tokens=8)
    table = rec.to_table()  # dict of equal-length columns, ready for pyarrow / pandas

Off by default and free when off: hooks exist only inside the ``with`` block.

Token coordinates per record:
  * llm: ``sample`` (batch row), ``position`` (index among the sample's non-pad
    tokens; pad tokens are not recorded), ``token_kind`` image | text, or generated
    for tokens fed on top of a non-empty KV cache (the decode steps of generate()).
    A forward given ``inputs_embeds`` instead of ``input_ids`` has no token ids: its
    tokens are text (generated on a non-empty cache).
  * vision: ``sample``, ``image`` (index of the image in its sample), ``crop`` (0 =
    the image, 1.. = its S^2 tiles), ``position`` = patch index (CLIP's CLS = -1), kind image.
  * projector: ``sample``, ``image``, ``position`` = image-token index, kind image.
``call`` counts the model's forward calls inside the block (one per generate step).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import PLACEMENTS
from .placement import placed_moe_layers

TOKEN_KINDS = ("image", "text", "generated")
IMAGE, TEXT, GENERATED = 0, 1, 2


@dataclass
class RoutingRecord:
    """One MoE layer's routing in one forward call; per-token tensors on CPU, length T."""

    placement: str
    layer: int
    call: int
    sample: torch.Tensor  # [T] batch row (-1 unknown)
    image: torch.Tensor  # [T] image index within the sample (-1 for text)
    crop: torch.Tensor  # [T] 0 = whole image, 1.. = S^2 tile (vision only)
    position: torch.Tensor  # [T]
    kind: torch.Tensor  # [T] int8: 0 image, 1 text, 2 generated
    experts: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    probs: torch.Tensor | None  # [T, S]
    num_experts: int

    def __len__(self) -> int:
        return int(self.position.shape[0])


class RoutingRecorder:
    """Collects :class:`RoutingRecord` s; see the module docstring for the coordinates."""

    def __init__(self, model, store_probs: bool = True):
        self.model = model
        self.store_probs = store_probs
        self.records: list[RoutingRecord] = []
        self.calls = 0
        self._ctx: dict = {}

    # ---- per-call context, from the model's forward inputs
    def _begin_call(self, input_ids, attention_mask, cache, image_counts, inputs_embeds=None) -> None:
        cfg = self.model.config
        ctx = {"call": self.calls, "llm": None, "image_sample": None, "image_index": None}
        self.calls += 1
        tokens = input_ids if input_ids is not None else inputs_embeds  # [B, L] ids or [B, L, d] embeddings
        if tokens is not None:
            b, length = tokens.shape[:2]
            past = cache.get_seq_length() if cache is not None else 0
            mask = attention_mask if attention_mask is not None else torch.ones(b, past + length, dtype=torch.long)
            mask = mask.to("cpu").long()
            position = (mask.cumsum(-1) - 1)[:, -length:]  # [B, L] among real tokens
            valid = mask[:, -length:].bool()
            if input_ids is not None and cfg.image_token_id is not None:
                is_image = input_ids.to("cpu") == cfg.image_token_id
            else:  # embeddings carry no token ids (and forward takes no images with them)
                is_image = torch.zeros(b, length, dtype=torch.bool)
            if past > 0:
                kind = torch.full((b, length), GENERATED)
            else:
                kind = torch.where(is_image, IMAGE, TEXT)
            ctx["llm"] = (valid, position, kind, is_image)
            if image_counts is None:
                image_counts = is_image.sum(-1) // cfg.num_image_tokens
            counts = torch.as_tensor(image_counts).to("cpu").reshape(-1)
            ctx["image_sample"] = torch.repeat_interleave(torch.arange(len(counts)), counts)
            ctx["image_index"] = torch.cat([torch.arange(int(c)) for c in counts]) if len(counts) else torch.zeros(0)
        self._ctx = ctx

    def _record(self, placement: str, layer: int, routing, shape) -> None:
        lead = routing.experts.shape[:-1]  # [rows, P] or [B, L]
        experts = routing.experts.detach().to("cpu")
        weights = routing.weights.detach().float().to("cpu")
        probs = routing.probs.detach().float().to("cpu") if self.store_probs else None
        rows, width = lead[0], lead[1]
        ctx = self._ctx
        if placement == "llm" and ctx.get("llm") is not None:
            valid, position, kind, is_image = ctx["llm"]
            sample = torch.arange(rows).unsqueeze(1).expand(rows, width)
            image_ordinal = (is_image.long().cumsum(-1) - 1) // self.model.config.num_image_tokens
            image = torch.where(is_image, image_ordinal, torch.full_like(image_ordinal, -1))
            crop = torch.zeros_like(position)
            sel = valid
        else:
            n_images = ctx["image_sample"].numel() if ctx.get("image_sample") is not None else rows
            row = torch.arange(rows).unsqueeze(1).expand(rows, width)
            img = row % max(n_images, 1)
            if ctx.get("image_sample") is not None and n_images:
                sample, image = ctx["image_sample"][img], ctx["image_index"][img]
            else:
                sample, image = torch.full_like(row, -1), img
            crop = row // max(n_images, 1)
            position = torch.arange(width).unsqueeze(0).expand(rows, width)
            if placement == "vision":
                position = position - self.model.vision_tower.num_prefix_tokens
            kind = torch.full_like(row, IMAGE)
            sel = torch.ones(rows, width, dtype=torch.bool)
        self.records.append(RoutingRecord(
            placement=placement, layer=layer, call=ctx.get("call", -1),
            sample=sample[sel], image=image[sel], crop=crop[sel], position=position[sel],
            kind=kind[sel].to(torch.int8), experts=experts[sel], weights=weights[sel],
            probs=None if probs is None else probs[sel], num_experts=int(probs.shape[-1]) if probs is not None else -1,
        ))

    # ---- outputs
    def to_table(self) -> dict[str, list]:
        """Columns: placement, layer, call, sample, image, crop, position, token_kind, experts,
        weights, probs, num_experts (one row per token per layer)."""
        cols: dict[str, list] = {k: [] for k in (
            "placement", "layer", "call", "sample", "image", "crop", "position", "token_kind",
            "experts", "weights", "probs", "num_experts")}
        for r in self.records:
            n = len(r)
            cols["placement"] += [r.placement] * n
            cols["layer"] += [r.layer] * n
            cols["call"] += [r.call] * n
            cols["num_experts"] += [r.num_experts] * n
            for name in ("sample", "image", "crop", "position"):
                cols[name] += getattr(r, name).tolist()
            cols["token_kind"] += [TOKEN_KINDS[k] for k in r.kind.tolist()]
            cols["experts"] += r.experts.tolist()
            cols["weights"] += r.weights.tolist()
            cols["probs"] += r.probs.tolist() if r.probs is not None else [None] * n
        return cols

    def select(self, placement: str | None = None, layer: int | None = None) -> list[RoutingRecord]:
        return [r for r in self.records if (placement is None or r.placement == placement)
                and (layer is None or r.layer == layer)]


def _selected(placement: str, layer: int, placements, layers) -> bool:
    if placement not in placements:
        return False
    if layers is None:
        return True
    chosen = layers.get(placement) if isinstance(layers, dict) else layers
    return chosen is None or layer in chosen


@contextmanager
def capture_routing(model, placements=PLACEMENTS, layers=None, *, store_probs: bool = True):
    """Record routing of ``placements`` (and ``layers``: list, or dict placement -> list) in the block.

    Yields a :class:`RoutingRecorder`; hooks are removed on exit.
    """
    unknown = sorted(set(placements) - set(PLACEMENTS))
    if unknown:
        raise ValueError(f"unknown placement(s) {unknown}; choose from {PLACEMENTS}")
    rec = RoutingRecorder(model, store_probs)
    handles = []

    def pre_hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        rec._begin_call(input_ids, kwargs.get("attention_mask"), kwargs.get("cache"), kwargs.get("image_counts"),
                        kwargs.get("inputs_embeds"))

    handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    for placement, layer_idx, layer in placed_moe_layers(model):
        if _selected(placement, layer_idx, placements, layers):
            def hook(module, args, output, placement=placement, layer_idx=layer_idx):
                rec._record(placement, layer_idx, module.last_routing, args[0].shape)
            handles.append(layer.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
