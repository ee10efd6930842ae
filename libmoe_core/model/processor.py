"""``LibMoEProcessor``: tokenizer + image processor + conversation template name.

Text holds one ``<image>`` per image; the processor tokenises it, expands each
placeholder to ``num_image_tokens`` copies, pads (left for generation, right for
training) and turns images into ``pixel_values``, made square by ``image_aspect``:
``pad`` (on the image processor's mean colour, LibMoE / LLaVA's expand2square), ``resize``
(stretched: the whole image, aspect ratio changed) or ``crop`` (the centre square, cut before
the resize: what LLaVA keeps without padding on CLIP, up to a sub-pixel shift where LLaVA's
resize-then-crop lands between pixels), the same for SigLIP and CLIP towers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..images import to_rgb
from ..tokens import IMAGE_PLACEHOLDER, expand_image_tokens

IMAGE_ASPECTS = ("pad", "resize", "crop")
CONFIG_NAME = "libmoe_processor.json"


def default_image_processor(vision_config: dict):
    """An HF image processor for a SigLIP/CLIP tower config (PIL backend, no download)."""
    size = vision_config["image_size"]
    if vision_config.get("model_type") == "clip_vision_model":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size})


def pad_to_square(image, fill: tuple[int, int, int]):
    """Centre ``image`` on a square canvas of colour ``fill`` (LLaVA's expand2square)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def centre_square(image):
    """The largest centred square of ``image`` (what a shortest-edge resize and a centre crop keep)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def square_side(image_processor) -> int:
    """The side of the square images ``image_processor`` outputs (its crop size when it crops)."""
    crop = getattr(image_processor, "crop_size", None)
    size = crop if getattr(image_processor, "do_center_crop", False) and crop else image_processor.size
    return int(size.get("height") or size["shortest_edge"])


class LibMoEProcessor:
    """Prepares model inputs. ``__call__(text, images, padding_side)`` -> dict of tensors."""

    def __init__(self, tokenizer, image_processor, *, template: str = "phi35", num_image_tokens: int,
                 image_aspect: str = "pad", image_token: str = IMAGE_PLACEHOLDER):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {image_token!r} into {len(ids)} tokens; add it as a special token")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.num_image_tokens = int(num_image_tokens)
        self.image_aspect = image_aspect
        self.image_token = image_token
        self.image_token_id = ids[0]

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---- images
    def preprocess_images(self, images) -> torch.Tensor:
        """list of PIL images -> pixel_values [N, 3, H, W]."""
        images = [to_rgb(im) for im in images]
        if self.image_aspect == "pad":
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            fill = tuple(int(255 * m) for m in mean)  # LLaVA's expand2square colour: truncated, not rounded
            images = [pad_to_square(im, fill) for im in images]
        elif self.image_aspect == "resize":  # square first: a CLIP processor would centre-crop the rest
            from PIL import Image

            side = square_side(self.image_processor)
            images = [im.resize((side, side), Image.Resampling.BICUBIC) for im in images]
        else:
            images = [centre_square(im) for im in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    # ---- text
    def encode(self, text: str, num_images: int | None = None) -> list[int]:
        """Token ids of ``text`` with each ``<image>`` expanded; checks the placeholder count."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        found = ids.count(self.image_token_id)
        if num_images is not None and found != num_images:
            raise ValueError(f"text has {found} {self.image_token} placeholder(s) but {num_images} image(s) were given: {text[:80]!r}")
        return expand_image_tokens(ids, None, self.image_token_id, self.num_image_tokens)[0]

    def get_template(self):
        from ..data.templates import get_template  # imported lazily: the data package is separate

        return get_template(self.template)

    def prompt(self, question: str, num_images: int = 1, history=None) -> str:
        """Generation prompt for ``question`` in this processor's template (``<image>`` lines prepended if absent)."""
        if num_images and self.image_token not in question:
            question = (self.image_token + "\n") * num_images + question
        return self.get_template().prompt(question, history)

    def render(self, conversations) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a conversation, image placeholders expanded (labels -100)."""
        ids, labels = self.get_template().render(conversations, self.tokenizer)
        ids, labels = expand_image_tokens(list(ids), list(labels), self.image_token_id, self.num_image_tokens)
        return ids, labels

    def __call__(self, text, images=None, *, padding_side: str = "left", return_tensors: str = "pt") -> dict:
        """Batch ``text`` (str or list) with ``images`` (per sample: a PIL image, a list of them, or None).

        Returns input_ids [B, L], attention_mask [B, L], image_counts [B] and, when
        there are images, pixel_values [N, 3, H, W] in sample order.
        """
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            per_sample = [[] for _ in texts]
        else:
            if len(texts) == 1 and not isinstance(images, (list, tuple)):
                images = [images]
            if len(images) != len(texts):
                raise ValueError(f"got {len(texts)} texts but images for {len(images)} samples")
            per_sample = [[] if im is None else (list(im) if isinstance(im, (list, tuple)) else [im]) for im in images]
        seqs = [self.encode(t, len(ims)) for t, ims in zip(texts, per_sample)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
            input_ids[i, cols] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, cols] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "image_counts": torch.tensor([len(ims) for ims in per_sample], dtype=torch.long)}
        flat = [im for ims in per_sample for im in ims]
        if flat:
            out["pixel_values"] = self.preprocess_images(flat)
        return out

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- persistence
    def to_dict(self) -> dict:
        return {"template": self.template, "num_image_tokens": self.num_image_tokens,
                "image_aspect": self.image_aspect, "image_token": self.image_token}

    def save_pretrained(self, save_directory) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(str(path))
        (path / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> LibMoEProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; save the processor with save_pretrained first")
        settings = json.loads((path / CONFIG_NAME).read_text())
        # the PIL backend, as LLaVA/LibMoE preprocess (transformers would pick torchvision where it imports,
        # whose antialiased bicubic resize differs by up to a few /255)
        image_processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        return cls(AutoTokenizer.from_pretrained(str(path)), image_processor, **settings)
