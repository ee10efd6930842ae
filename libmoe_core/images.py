"""Image mode handling shared by the data pipeline, the processor and evaluation."""

from __future__ import annotations


def to_rgb(image):
    """An RGB copy of a PIL image. 16-bit grayscale is scaled to 8 bits first (PIL's convert
    clips it: a 0..65535 ramp would turn almost all white); transparency is dropped as in LLaVA."""
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return image.convert("RGB")
