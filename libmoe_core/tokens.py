"""Image placeholder conventions shared by the data pipeline, the processor and the model.

Text holds one ``<image>`` placeholder per image. Tokenised, the placeholder is one
special token (``image_token_id``); before the model sees it, each one is expanded to
``num_image_tokens`` copies (one per vision patch), whose labels are -100. The model
then writes the projected image features into exactly those positions.
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


def expand_image_tokens(
    input_ids: list[int], labels: list[int] | None, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int] | None]:
    """Repeat every ``image_token_id`` ``num_image_tokens`` times; image labels become -100."""
    ids: list[int] = []
    out_labels: list[int] | None = None if labels is None else []
    for i, tok in enumerate(input_ids):
        if tok == image_token_id:
            ids.extend([image_token_id] * num_image_tokens)
            if out_labels is not None:
                out_labels.extend([IGNORE_INDEX] * num_image_tokens)
        else:
            ids.append(tok)
            if out_labels is not None:
                out_labels.append(labels[i])
    return ids, out_labels


def expanded_length(num_text_tokens: int, num_images: int, num_image_tokens: int) -> int:
    """Sequence length after expansion, when the ``num_images`` placeholders count as text tokens."""
    return num_text_tokens + num_images * (num_image_tokens - 1)
