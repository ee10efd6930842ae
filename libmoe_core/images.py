"""Image mode handling shared by the data pipeline, the processor and evaluation."""

from __future__ import annotations


class ImageModeError(ValueError):
    """An image whose pixel values cannot be mapped to 8-bit RGB without guessing their range."""


def to_rgb(image):
    """An RGB copy of a PIL image; transparency is dropped as in LLaVA.

    Wide grayscale is scaled to 8 bits first (PIL's convert clips it: a 0..65535 ramp would turn
    almost all white): 16-bit modes (``I;16*``) and 32-bit integer ``I`` holding 0..65535 (16-bit
    PGM/PNG) by 1/257, floats ``F`` holding 0..1 by 255. Other ``I``/``F`` ranges are an
    :class:`ImageModeError` naming the mode and range."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        scale = 1 / 257
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        if image.mode == "I" and 0 <= low and high <= 65535:  # what PIL decodes 16-bit PGM/PNG/TIFF files to
            scale = 1 / 257
        elif image.mode == "F" and 0.0 <= low and high <= 1.0:
            scale = 255.0
        else:
            expected = "0..65535" if image.mode == "I" else "0..1"
            raise ImageModeError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} image (PIL mode "
                                 f"{image.mode}) with values {low}..{high}: outside {expected}, so its range is "
                                 "unknown; convert it to 8-bit RGB")
    else:
        return image.convert("RGB")
    return image.point(lambda v: v * scale).convert("L").convert("RGB")
