"""Length-aware collator: template rendering, image-token expansion, padding, image stacking."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..tokens import IGNORE_INDEX, expand_image_tokens
from .templates import get_template


class VLMCollator:
    """Turns dataset samples into a padded batch.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``[B, L]``, padded to the
    longest sample), ``pixel_values`` (``[N, 3, H, W]`` for all N images of the batch in
    sample order, or ``None`` when the batch has no image), ``image_counts`` (``[B]``)
    and ``ids``. Nothing is truncated: a sample over ``max_length`` raises.
    """

    def __init__(self, tokenizer, template: str, image_transform: Callable, image_token_id: int,
                 num_image_tokens: int, max_length: int | None = None, padding_side: str = "right",
                 pad_token_id: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_transform = image_transform
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.padding_side = padding_side
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_token_id")
        self.pad_token_id = pad_token_id

    def encode(self, sample: dict) -> tuple[list[int], list[int]]:
        """Rendered and expanded ``(input_ids, labels)`` of one sample."""
        sid = sample.get("id")
        try:
            ids, labels = self.template.render(sample["conversations"], self.tokenizer)
        except ValueError as e:
            raise ValueError(f"record {sid!r}: {e}") from e
        n_tok, n_img = ids.count(self.image_token_id), len(sample.get("images") or [])
        if n_tok != n_img:
            raise ValueError(f"record {sid!r}: {n_tok} image tokens (id {self.image_token_id}) in the rendered text "
                             f"but {n_img} images; is <image> a special token of the tokenizer?")
        ids, labels = expand_image_tokens(ids, labels, self.image_token_id, self.num_image_tokens)
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"record {sid!r}: {len(ids)} tokens after image expansion > max_length {self.max_length}")
        return ids, labels

    def __call__(self, samples: list[dict]) -> dict:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        batch = len(samples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for b, (ids, lab) in enumerate(encoded):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
            labels[b, sl] = torch.tensor(lab, dtype=torch.long)
            attention[b, sl] = 1
        images = [self.image_transform(im) for s in samples for im in (s.get("images") or [])]
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "pixel_values": torch.stack(images) if images else None,
            "image_counts": torch.tensor([len(s.get("images") or []) for s in samples], dtype=torch.long),
            "ids": [s.get("id") for s in samples],
        }
