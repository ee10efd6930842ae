"""The routing-trace contract: the Parquet schema every trace follows.

A trace is one Parquet file or a directory of part files. Each row is one token at
one MoE layer of one document evaluated with one checkpoint.
"""

from __future__ import annotations

import pyarrow as pa

#: The trace schema (produced by the evaluation stage, consumed here).
TRACE_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("doc_id", pa.int64()),
        ("checkpoint", pa.string()),
        ("placement", pa.string()),  # vision | projector | llm
        ("layer", pa.int32()),
        ("image", pa.int32()),  # image index in the document (vision/projector, llm image tokens); -1 text
        ("crop", pa.int32()),  # 0 = the whole image, 1.. = its S^2 tiles (vision); 0 elsewhere
        ("position", pa.int32()),  # token index in the sequence the layer saw
        ("token_kind", pa.string()),  # image | text | generated
        ("experts", pa.list_(pa.int32())),  # k chosen experts, rank order
        ("weights", pa.list_(pa.float32())),  # k combine weights
        ("probs", pa.list_(pa.float32())),  # E: the full router distribution
        ("num_experts", pa.int32()),
    ]
)

PLACEMENTS = ("vision", "projector", "llm")
TOKEN_KINDS = ("image", "text", "generated")

#: Columns that identify one token at one layer (the join key between checkpoints).
JOIN_KEYS = ("task", "doc_id", "placement", "layer", "image", "crop", "position", "token_kind")

#: Columns that traces written before they existed lack; readers fill them in as such traces
#: meant them (one whole image per document): image 0 for image tokens, -1 for text; crop 0.
LEGACY_COLUMNS = ("image", "crop")

#: ``--by`` choices: extra grouping columns beside (checkpoint, placement, layer).
BY_CHOICES = ("task", "token_kind")

#: Columns that the metrics pass reads.
METRIC_COLUMNS = ("checkpoint", "placement", "layer", "task", "token_kind", "experts", "weights", "probs", "num_experts")

#: Columns that the checkpoint comparison reads.
COMPARE_COLUMNS = ("checkpoint", *JOIN_KEYS, "experts")


def check_by(by: str | None) -> str | None:
    """Validate a ``by`` value (None, 'task' or 'token_kind')."""
    if by is not None and by not in BY_CHOICES:
        raise ValueError(f"unknown grouping by={by!r}; valid values: {', '.join(BY_CHOICES)} (or None)")
    return by
