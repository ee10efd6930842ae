"""``libmoe``: the lmms-eval model class for libmoe-kit checkpoints.

    python -m lmms_eval --model libmoe --model_args pretrained=PATH[,conv_template=phi35][,...] ...

Model arguments: ``pretrained`` (a saved LibMoEVLMForCausalLM + processor folder),
``conv_template`` (override the processor's), ``max_new_tokens`` (an optional cap on every
task's own limit, logged when it cuts one; a task without a limit gets lmms-eval's 1024),
``device``/``dtype``/``attn_implementation``, and for routing traces
``return_id_experts=true``, ``trace_dir=DIR``, ``layers_expert_selection=1;2;3`` (default:
all layers), ``placements=vision;llm`` (default: all), ``checkpoint=NAME`` (the trace's
``checkpoint`` column; default the model path). ``drop_top1=true`` runs the drop-top-1
ablation (each token loses its first-choice expert, the rest renormalised).

Batched greedy generation with left padding; the answers do not depend on the batch
size (requests are sorted by length for speed and returned in request order), unless the
checkpoint's MoE layers set a ``capacity_factor``: its capacity is shared by the batch's tokens.
A row stops at its end token or once its answer is settled at one of its stop strings (the task's
``until``, the template's end; :class:`StopAtStrings`), the batch when every row has (beam search:
at its own end only).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from ..images import to_rgb
from .model_args import check_trace_selection, parse_batch_size, parse_bool, parse_int_list, parse_placements
from .traces import TraceWriter

__all__ = ["LibMoE"]


def _images(visuals) -> list:
    """lmms-eval visuals (None, one image or a list) -> flat list of PIL images."""
    from PIL import Image

    if visuals is None:
        return []
    items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    flat = []
    for item in items:
        if isinstance(item, (list, tuple)):
            flat.extend(_images(item))
        elif isinstance(item, Image.Image):
            flat.append(to_rgb(item))
        else:
            raise TypeError(f"libmoe handles images only; got a visual of type {type(item).__name__}")
    return flat


def _cut(text: str, stops: list[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


#: The stop string lmms-eval adds when a task sets no ``until`` (its few-shot delimiter). It is not
#: applied: it cut multi-paragraph answers (MathVista's reasoning before its final answer) where
#: lmms-eval's llava does not cut at all and its qwen2_5_vl drops this one for the same reason.
LMMS_EVAL_DEFAULT_UNTIL = "\n\n"

def request_stops(until, template_stops: list[str]) -> list[str]:
    """Where a request's answer is cut: its ``until`` strings but lmms-eval's default, then the chat
    template's end strings."""
    until = [until] if isinstance(until, str) else list(until or [])
    return [u for u in until if u != LMMS_EVAL_DEFAULT_UNTIL] + list(template_stops)


class StopAtStrings(StoppingCriteria):
    """Ends each row of a batch once its answer is settled: its new text holds one of that row's stop
    strings (where :func:`_cut` cuts: the earliest one) and no stop could still complete starting
    before it (``["x.Q:", "Q"]`` after "ans x.Q" waits for a ":"), so a batch stops when every row
    is done and no answer changes. A step decodes only each open row's last tokens, as many as the
    longest stop has bytes and one more (a token is at least a byte); a hit there is checked on the
    row's whole new text, every step until settled. ``ends[b]``: the number of new tokens when row
    ``b`` settled, None while it goes on."""

    def __init__(self, decode, stops: list[list[str]], prompt_width: int) -> None:
        self.decode = decode  # lists of token ids -> texts, decoded as the answers are
        self.stops = [[s for s in row if s] for row in stops]  # _cut skips empty stops too
        self.start = prompt_width
        self.window = max((len(s.encode()) for row in self.stops for s in row), default=0) + 1
        self.ends: list[int | None] = [None] * len(stops)
        self.pending = [False] * len(stops)  # a stop seen, the answer not settled yet

    def _hit(self, b: int, text: str) -> bool:
        return any(s in text for s in self.stops[b])

    def _settled(self, b: int, text: str) -> bool:
        """Whether ``text`` holds a stop and no longer text can be cut earlier: no stop's beginning
        runs to the end of ``text`` from before the earliest stop found."""
        found = [i for i in (text.find(s) for s in self.stops[b]) if i >= 0]
        if not found:
            return False
        first = min(found)
        return not any(s.startswith(text[q:]) for s in self.stops[b] for q in range(max(0, len(text) - len(s) + 1), first))

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids.shape[1] - self.start  # input_ids: [B, prompt_width + new]
        rows = [b for b, end in enumerate(self.ends) if end is None and self.stops[b]]
        if rows:
            tails = input_ids[rows, -min(new, self.window):].tolist()  # [open rows, window]
            for b, tail_text in zip(rows, self.decode(tails)):
                if not (self.pending[b] or self._hit(b, tail_text)):
                    continue
                self.pending[b] = True
                if self._settled(b, self.decode([input_ids[b, self.start:].tolist()])[0]):
                    self.ends[b] = new
        return torch.tensor([end is not None for end in self.ends], device=input_ids.device)  # [B]


#: generation limit of a task whose generation_kwargs set none (what lmms-eval's own llava uses)
TASK_DEFAULT_MAX_NEW_TOKENS = 1024


class LibMoE(lmms):
    """lmms-eval model wrapping :class:`libmoe_core.model.LibMoEVLMForCausalLM`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        conv_template: str | None = None,
        return_id_experts=False,
        layers_expert_selection=None,
        placements=None,
        trace_dir: str | None = None,
        checkpoint: str | None = None,
        max_new_tokens: int | None = None,
        batch_size=1,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        max_batch_size: int | None = None,
        drop_top1=False,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"libmoe: unknown model arguments {sorted(kwargs)}")
        from ..model import LibMoEVLMForCausalLM
        from ..model.processor import LibMoEProcessor

        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device_name.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, str(dtype))
        self.model = LibMoEVLMForCausalLM.from_pretrained(
            pretrained, dtype=torch_dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {})
        ).to(self.device_name).eval()
        self.processor = LibMoEProcessor.from_pretrained(pretrained)
        if conv_template:
            self.processor.template = str(conv_template)
            self.processor.get_template()  # unknown names fail here, listing the known ones
        self.stops = list(self.processor.get_template().stop_strings)
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self.max_new_tokens = None if str(max_new_tokens).lower() in ("none", "") else int(max_new_tokens)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"libmoe: max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self._capped_tasks: set[str] = set()
        self.checkpoint = str(checkpoint or pretrained)
        self.drop_top1 = parse_bool(drop_top1)  # ablation: every token loses its top-1 expert
        if self.drop_top1 and not self.model.config.moe:
            raise ValueError(f"libmoe: drop_top1=true but {pretrained} has no MoE layers")
        self.record = parse_bool(return_id_experts)
        self.layers = parse_int_list(layers_expert_selection)
        self.placements = parse_placements(placements)
        self.writer = None
        if self.record:
            if not trace_dir:
                raise ValueError("libmoe: return_id_experts=true needs trace_dir=<dir> (libmoe eval sets it)")
            if not self.model.config.moe:
                raise ValueError(f"libmoe: return_id_experts=true but {pretrained} has no MoE layers")
            check_trace_selection(self.model, placements, self.placements, self.layers, pretrained)
            self.writer = TraceWriter(trace_dir, overwrite=True, prefix=f"part-r{self.rank}")

    # ------------------------------------------------------------------ helpers
    def _routing_mode(self):
        """The drop-top-1 ablation context when asked for, else nothing."""
        if not self.drop_top1:
            return contextlib.nullcontext()
        from ..analysis.ablation import drop_top1

        return drop_top1(self.model)

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        return _images(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual else []

    def _inputs(self, prompts: list[str], images: list[list]) -> dict:
        batch = self.processor(prompts, [ims or None for ims in images], padding_side="left")
        return {k: v.to(self.device_name) for k, v in batch.items()}

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)  # same generation settings batch together
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="libmoe generate", disable=self.rank != 0)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                for i, text in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                    answers[i] = text
                bar.update(len(chunk))
        bar.close()
        return answers

    def _max_new_tokens(self, gen_kwargs: dict, task: str) -> int:
        """The task's own generation limit (lmms-eval's 1024 when it sets none), cut to the
        ``max_new_tokens`` model argument when one is given; a cut is logged once per task."""
        asked = gen_kwargs.get("max_new_tokens")
        asked = TASK_DEFAULT_MAX_NEW_TOKENS if asked is None else int(asked)
        if self.max_new_tokens is None or self.max_new_tokens >= asked:
            return asked
        if task not in self._capped_tasks:
            self._capped_tasks.add(task)
            eval_logger.warning(f"libmoe: {task} asks for up to {asked} new tokens; the max_new_tokens model "
                                f"argument cuts it to {self.max_new_tokens} (scores then differ from the task's)")
        return self.max_new_tokens

    @torch.no_grad()
    def _generate_batch(self, requests: list[Instance]) -> list[str]:
        contexts, images, stops = [], [], []
        gen_kwargs = dict(requests[0].args[1] or {})
        for request in requests:
            context, kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            contexts.append(self.processor.prompt(context, num_images=len(visuals)))
            images.append(visuals)
            stops.append(request_stops((kwargs or {}).get("until"), self.stops))
        inputs = self._inputs(contexts, images)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        settings = dict(
            max_new_tokens=self._max_new_tokens(gen_kwargs, requests[0].args[4]),
            do_sample=temperature > 0, num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
        )
        if temperature > 0:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
        if self.writer is not None and settings["num_beams"] > 1:  # rows are beams, reordered every step
            raise ValueError(f"libmoe: routing traces (return_id_experts=true) need num_beams=1; "
                             f"{requests[0].args[4]} generates with num_beams={settings['num_beams']}")
        prompt_width = inputs["input_ids"].shape[1]
        stop_at = None
        if settings["num_beams"] == 1:  # beam search ranks rows that stop: early stops would change answers
            stop_at = StopAtStrings(self.processor.batch_decode, stops, prompt_width)
            settings["stopping_criteria"] = StoppingCriteriaList([stop_at])
        with self._routing_mode():
            if self.writer is None:
                output = self.model.generate(**inputs, **settings)
            else:
                from ..model.routing import capture_routing

                with capture_routing(self.model, self.placements, self.layers) as recorder:
                    output = self.model.generate(**inputs, **settings)
        new_tokens = output[:, prompt_width:]  # [B, new]: rows that ended are padded (or go on) after it
        texts = [_cut(t, s) for t, s in zip(self.processor.batch_decode(new_tokens), stops)]
        if self.writer is not None:
            lengths = self._generated_lengths(new_tokens, stop_at.ends)
            self._write_traces(recorder, requests, inputs["attention_mask"], lengths)
        return texts

    def _generated_lengths(self, new_tokens: torch.Tensor, stop_ends: list[int | None]) -> list[int]:
        """Tokens each sample really generated: up to and including its first end token, or up to
        where its answer settled at a stop string (``stop_ends``) when that came first."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        lengths = []
        for row, stop_end in zip(new_tokens.tolist(), stop_ends):
            n = next((j + 1 for j, tok in enumerate(row) if tok in eos), len(row))
            lengths.append(n if stop_end is None else min(n, stop_end))
        return lengths

    def _write_traces(self, recorder, requests, attention_mask, lengths: list[int]) -> None:
        """One block per (layer, document). A generated token is routed when it is fed back, so a
        sample's last one (its end token, the one completing a stop string, or the max_new_tokens-th)
        is routed only while a longer sample of the batch goes on: it is dropped always, so traces do
        not depend on the batch. ``lengths``: the tokens each sample generated (_generated_lengths)."""
        prompt_len = attention_mask.sum(-1).cpu()  # [B] real prompt tokens
        fed_back = (torch.tensor(lengths) - 1).clamp(min=0)  # [B]
        limit = prompt_len + fed_back  # [B] exclusive
        by_layer = defaultdict(list)
        for record in recorder.records:
            by_layer[(record.placement, record.layer)].append(record)
        for (placement, layer), records in by_layer.items():
            sample = torch.cat([r.sample for r in records])
            position = torch.cat([r.position for r in records])
            image = torch.cat([r.image for r in records])
            crop = torch.cat([r.crop for r in records])
            kind = torch.cat([r.kind for r in records])
            experts = torch.cat([r.experts for r in records])
            weights = torch.cat([r.weights for r in records])
            probs = torch.cat([r.probs for r in records])
            keep = (sample >= 0) & ((kind != 2) | (position < limit[sample.clamp(min=0)]))
            for b, request in enumerate(requests):
                rows = keep & (sample == b)
                if rows.any():
                    _, _, _, doc_id, task, _ = request.args
                    self.writer.add_block(task, doc_id, self.checkpoint, placement, layer, position[rows],
                                          kind[rows], experts[rows], weights[rows], probs[rows],
                                          images=image[rows], crops=crop[rows])

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="libmoe loglikelihood", disable=self.rank != 0):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # output_type loglikelihood passes doc_to_target
                continuation = continuation(self._doc(task, split, doc_id))
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            prompt = self.processor.prompt(context, num_images=len(visuals))
            # prompt and continuation tokenised together, as training tokenises an answer after its
            # prompt (a SentencePiece tokenizer gives a lone "Yes" a leading "▁" it has not there); the
            # target is what follows the prompt's own tokens (lm-eval's _encode_pair)
            inputs = self._inputs([prompt + str(continuation)], [visuals])
            n = inputs["input_ids"].shape[1] - len(self.processor.encode(prompt, num_images=len(visuals)))
            if n <= 0:
                raise ValueError(f"libmoe: continuation {continuation!r} of {task} doc {doc_id} adds no token")
            target_ids = inputs["input_ids"][0, -n:]  # [n]
            with self._routing_mode():
                logits = self.model(**inputs).logits
            pred = logits[0, -n - 1 : -1].float().log_softmax(-1)  # [n, V] predicting the target
            logprob = pred.gather(-1, target_ids.unsqueeze(-1)).sum().item()
            if not math.isfinite(logprob):  # lmms-eval's argmax over choices would pick a NaN silently
                raise ValueError(f"libmoe: the log-likelihood of {task} doc {doc_id}'s continuation {continuation!r} "
                                 f"is {logprob} (non-finite logits: check the checkpoint's weights and dtype)")
            greedy = bool((pred.argmax(-1) == target_ids).all())
            results.append((logprob, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("libmoe does not implement multi-round generation (no LibMoE benchmark needs it)")

    def clean(self):
        if self.writer is not None:
            self.writer.close()
        super().clean()
