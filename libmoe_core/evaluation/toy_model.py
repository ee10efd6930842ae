"""``libmoe_toy``: a rule-based lmms-eval model to test the evaluation plumbing without a network.

It answers from the question text alone (yes/no questions -> ``yes``, colour questions ->
``red``, anything else -> ``circle``), but it goes through the same motions as the real
libmoe model class: it reads the model arguments of :mod:`.model_args`, loads each
document's images through ``doc_to_visual``, and with ``return_id_experts=True`` writes
made-up routing decisions (deterministic per document) through :class:`.traces.TraceWriter`
into ``trace_dir``. The writer is closed in :meth:`clean`, which lmms-eval calls once all
requests ran.

Importing this module imports lmms-eval (the base class).
"""

from __future__ import annotations

import zlib

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .model_args import parse_bool, parse_int_list, parse_placements
from .traces import TraceWriter

__all__ = ["ToyLibMoE", "toy_answer"]

IMAGE_TOKENS_PER_IMAGE = 4


def toy_answer(context: str) -> str:
    """The fixed rule: ``yes`` / ``red`` / ``circle``."""
    from .tasks.easyvqa.utils import question_type

    question = context.strip().splitlines()[0] if context.strip() else ""
    return {"yesno": "yes", "colour": "red", "shape": "circle"}[question_type(question)]


class ToyLibMoE(lmms):
    """Rule-based stand-in for the libmoe model (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "toy",
        conv_template: str | None = None,
        return_id_experts=False,
        layers_expert_selection=None,
        placements=None,
        trace_dir: str | None = None,
        num_experts: int = 4,
        top_k: int = 2,
        batch_size=1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"libmoe_toy: unknown model arguments {sorted(kwargs)}")
        self.pretrained = str(pretrained)
        self.conv_template = conv_template
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.record = parse_bool(return_id_experts)
        self.layers = parse_int_list(layers_expert_selection) or [0, 1]
        self.placements = parse_placements(placements)
        self.writer = None
        if self.record:
            if not trace_dir:
                raise ValueError("libmoe_toy: return_id_experts=True needs trace_dir=<dir>")
            self.writer = TraceWriter(trace_dir, rows_per_part=64, overwrite=True)

    # ------------------------------------------------------------------ helpers
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _record(self, task: str, doc_id: int, n_images: int, n_text: int) -> None:
        kinds = np.array([0] * (n_images * IMAGE_TOKENS_PER_IMAGE) + [1] * n_text + [2], dtype=np.int8)
        n = kinds.shape[0]
        for placement in self.placements:
            for layer in self.layers:
                seed = zlib.crc32(f"{task}/{doc_id}/{placement}/{layer}".encode())
                logits = np.random.default_rng(seed).normal(size=(n, self.num_experts)).astype(np.float32)
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                experts = np.argsort(-probs, axis=-1)[:, : self.top_k]
                weights = np.take_along_axis(probs, experts, axis=-1)
                self.writer.add_block(
                    task, doc_id, self.pretrained, placement, layer,
                    np.arange(n), kinds, experts, weights / weights.sum(-1, keepdims=True), probs,
                )

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else []
            if self.writer is not None:
                self._record(task, doc_id, len(visuals or []), len(context.split()))
            answers.append(toy_answer(context))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for request in requests:
            context, continuation, _doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # output_type loglikelihood passes doc_to_target
                continuation = continuation(self._doc(task, split, doc_id))
            target = str(continuation).strip().lower()
            out.append((0.0 if target == toy_answer(context) else -1.0, target == toy_answer(context)))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("libmoe_toy does not do multi-round generation")

    def clean(self):
        if self.writer is not None:
            self.writer.close()
        super().clean()
