"""HF Trainer, extended through its hooks: loss components, tokens/s, router schedule,
non-finite step accounting, modality-grouped sampling and atomic checkpoints."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ExportableState

from ..data.sampler import ModalityLengthGroupedSampler
from ..moe import moe_layers, routers_step_end, set_router_step
from . import checkpoints

MODEL_INPUT_SKIP = ("ids",)  # collator keys that are bookkeeping, not model inputs
PROGRESS_PREFIX = "[libmoe-progress] "  # machine-readable progress lines for notebooks
NONFINITE_LIMIT_KEY = "max_consecutive_nonfinite_steps"  # the training config key that sets the limit
log = logging.getLogger(__name__)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool, device) -> bool:
    """``flag`` or-ed over all ranks: every rank gets the same answer."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    packed = torch.tensor([float(flag)], device=device)  # nccl reduces device tensors only
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return bool(packed.item())


def _update_skipped(optimizer) -> bool:
    """Whether the optimizer skipped its last update: DeepSpeed does on non-finite gradients (a global
    norm or overflow flag, so the same on every rank); a plain optimizer never does."""
    return bool(getattr(optimizer, "step_was_skipped", False))


def _nonfinite_terms(reported: dict[str, float], loss_finite: bool) -> set[str]:
    """The loss terms of one micro-batch that are NaN or inf (``loss`` itself when no term is and
    the loss is not finite)."""
    bad = {name for name, value in reported.items() if not name.startswith("router/") and not math.isfinite(value)}
    if not bad and not loss_finite:
        bad.add("loss")
    return bad


class MoETrainer(Trainer):
    """Adds to each training log, as means over the window's micro-batches on every rank:
    ``lm_loss``, every auxiliary loss the model reports (``aux/<placement>/<term>``, weighted as
    in the loss and averaged over all micro-batches, so ``loss = lm_loss + sum(aux/*)``),
    ``router/<placement>/<term>`` (unweighted and averaged over the micro-batches that routed
    through the placement: a vision balance of 1 means even, whatever share of batches had
    images), ``tokens_per_s``, the hyper router's ``hyper_k`` and ``nonfinite_steps`` (see
    :class:`NonfiniteStepCallback`; ``max_consecutive_nonfinite_steps`` of them in a row stop training)."""

    def __init__(self, *args, modality_lengths: list[int] | None = None, max_consecutive_nonfinite_steps: int = 10,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.nonfinite = NonfiniteStepCallback(max_consecutive_nonfinite_steps)
        self.add_callback(self.nonfinite)
        # compute_loss returns each micro-batch's mean loss; HF must divide it by the
        # accumulation steps (it would not if it believed the model normalised by token count).
        self.loss_is_scaled_for_ga = False
        self.modality_lengths = modality_lengths
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)  # micro-batches that reported each key
        self._micro_steps = 0
        self._tokens = 0
        self._window_start: float | None = None
        self._grouped_sampler: ModalityLengthGroupedSampler | None = None

    def _run_epoch(self, *args, **kwargs):
        # A resume from a checkpoint at or past max_steps (killed after its last checkpoint, before
        # the final model; or max_steps lowered) has nothing to train: transformers 5.24 would run one
        # more step before it checks. Its weights are loaded already; train() returns them as they are.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            self._nothing_trained = True  # no train summary row (a train_loss of 0.0 over no steps)
            return None
        # The grouped sampler's order depends on the epoch. A resume inside an epoch >= 1 wraps the
        # loader in skip_first_batches, and with several processes the chain SkipBatchSampler ->
        # BatchSamplerShard -> BatchSampler -> sampler is deeper than the set_epoch of transformers and
        # accelerate reaches: the resumed epoch would replay epoch 0's order. Set it here, before the
        # epoch's iterator is made (transformers 5.24 passes its arguments as keywords).
        epoch = kwargs["epoch"] if "epoch" in kwargs else args[1] if len(args) > 1 else None
        if self._grouped_sampler is not None and epoch is not None:
            self._grouped_sampler.set_epoch(int(epoch))
        return super()._run_epoch(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        # Called last after accelerate prepared the optimizer; transformers passes callbacks the optimizer the
        # trainer was built with (None), so they could not see DeepSpeed's step_was_skipped.
        self.callback_handler.optimizer = self.optimizer
        return scheduler

    def _get_train_sampler(self, train_dataset=None):
        if self.modality_lengths is None:
            return super()._get_train_sampler(train_dataset)
        # LLaVA's grouping: a mega-batch feeds every rank for every accumulation step.
        self._grouped_sampler = ModalityLengthGroupedSampler(
            self.modality_lengths, self.args.per_device_train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps, seed=self.args.seed,
        )
        return self._grouped_sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k not in MODEL_INPUT_SKIP}
        if self._window_start is None:  # the first window opens at the first micro-step
            self._window_start = time.perf_counter()
        outputs = model(**inputs)
        if not model.training:  # evaluate() calls this too: its batches are not training metrics
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        with torch.no_grad():
            terms = {}
            if getattr(outputs, "lm_loss", None) is not None:
                terms["lm_loss"] = outputs.lm_loss
            for name, value in (getattr(outputs, "aux_losses", None) or {}).items():
                terms[f"aux/{name}"] = value  # coefficient-weighted, as in the loss
            for name, value in (getattr(outputs, "aux_terms", None) or {}).items():
                terms[f"router/{name}"] = value  # unweighted (balance = 1 when even)
            # one device->host copy per micro-batch (a float() of each value waited for the GPU ~15 times);
            # float64 holds every fp32/bf16/fp16 value, and any token count, exactly, as float() did
            loss = outputs.loss.detach()
            packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=loss.device).reshape(())
                                  for v in (*terms.values(), torch.isfinite(loss).all(), inputs["attention_mask"].sum())])
            *values, loss_finite, tokens = packed.tolist()
            reported = dict(zip(terms, values))
            for name, value in reported.items():
                self._sums[name] += value
                self._counts[name] += 1
            self.nonfinite.note(_nonfinite_terms(reported, bool(loss_finite)))
            self._micro_steps += 1
            self._tokens += int(tokens)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if getattr(self, "_nothing_trained", False) and "train_runtime" in logs:
            return
        # every rank logs the training loss at the same steps (transformers gathers it from all of them
        # first), so the collectives in _window_totals line up; "loss" is never in evaluate()'s logs
        sums, counts, micro_steps, tokens = self._window_totals() if "loss" in logs else ({}, {}, 0, 0.0)
        if "loss" in logs:
            logs["nonfinite_steps"] = self.nonfinite.nonfinite_steps
            # transformers resets its loss accumulator by `tr_loss -= tr_loss`, which leaves a NaN in place:
            # without the nan/inf filter every later window would log NaN too
            if getattr(self, "_tr_loss", None) is not None:
                self._tr_loss.zero_()
        if micro_steps:
            for name, total in sums.items():  # router terms: over the micro-batches that routed them
                logs[name] = total / (counts[name] if name.startswith("router/") else micro_steps)
            start = self._window_start if self._window_start is not None else time.perf_counter()
            logs["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
            ks = [m.router.current_k() for _, m in moe_layers(self.model) if hasattr(m.router, "k_min")]
            if ks:
                logs["hyper_k"] = ks[0]
            self._sums.clear()
            self._counts.clear()
            self._micro_steps = self._tokens = 0
            self._window_start = time.perf_counter()  # the next window includes data loading
        super().log(logs, start_time)

    def _window_totals(self) -> tuple[dict[str, float], dict[str, int], int, float]:
        """The logging window's metric sums, per-key counts, micro-steps and tokens, summed over all ranks.

        ``loss`` is transformers' mean over all ranks, so ``lm_loss``, ``aux/*`` and ``router/*`` are
        too: one all-reduce of the sums and counts, under the union of the ranks' keys (a rank can lack
        one in a window, e.g. no image, so no vision routing, in its micro-batches; it adds 0 there)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return dict(self._sums), dict(self._counts), self._micro_steps, float(self._tokens)
        key_lists = [None] * dist.get_world_size()
        dist.all_gather_object(key_lists, sorted(self._sums))
        keys = sorted(set().union(*key_lists))
        values = [self._sums.get(k, 0.0) for k in keys] + [self._counts.get(k, 0) for k in keys]
        packed = torch.tensor(values + [self._micro_steps, self._tokens],
                              dtype=torch.float64, device=self.args.device)  # nccl reduces device tensors only
        dist.all_reduce(packed)
        *totals, micro_steps, tokens = packed.tolist()
        sums, counts = totals[: len(keys)], totals[len(keys):]
        return dict(zip(keys, sums)), {k: round(c) for k, c in zip(keys, counts)}, round(micro_steps), tokens


class NonfiniteTrainingError(RuntimeError):
    """Too many training steps in a row had a non-finite loss or gradients."""


class NonfiniteStepCallback(TrainerCallback, ExportableState):
    """Counts non-finite training steps: a NaN/inf loss term on any rank, or an update DeepSpeed skipped
    for non-finite gradients. Warns on each; ``max_consecutive`` in a row (0: never) stop training with
    :class:`NonfiniteTrainingError` after the step's log row, before any checkpoint of it or a final model.

    The decision is all-reduced, so every rank stops at the same step. The counts are saved with each
    checkpoint (trainer state) and continue on resume."""

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.nonfinite_steps = 0  # over the whole stage
        self.in_a_row = 0
        self._terms: set[str] = set()  # this rank's non-finite terms in the current step
        self._error: str | None = None

    def note(self, terms: set[str]) -> None:
        """Record a micro-batch's non-finite loss terms (called by the trainer's compute_loss)."""
        self._terms |= terms

    def state(self) -> dict:
        return {"args": {"max_consecutive": self.max_consecutive},
                "attributes": {"nonfinite_steps": self.nonfinite_steps, "in_a_row": self.in_a_row}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__)  # TrainerState makes it a dict
        attributes = saved.get("attributes", {}) if isinstance(saved, dict) else {}
        self.nonfinite_steps = attributes.get("nonfinite_steps", 0)
        self.in_a_row = attributes.get("in_a_row", 0)
        self._terms, self._error = set(), None
        # a checkpoint written before this callback existed has no entry: transformers' checkpoint save
        # looks the callback up there (a KeyError at the resumed run's first save)
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        skipped = _update_skipped(optimizer)
        terms, self._terms = self._terms, set()
        if not _any_rank(skipped or bool(terms), args.device):
            self.in_a_row = 0
            return
        self.nonfinite_steps += 1
        self.in_a_row += 1
        self._warn(state.global_step, terms, skipped)
        if 0 < self.max_consecutive <= self.in_a_row:
            self._error = (
                f"training stopped at step {state.global_step}: {self.in_a_row} steps in a row had a non-finite "
                f"loss or gradients ({NONFINITE_LIMIT_KEY}={self.max_consecutive}; {self.nonfinite_steps} in all). "
                f"No final model was written; the complete checkpoints are kept. Find the cause (data, learning rate, "
                f"precision), then resume, raising {NONFINITE_LIMIT_KEY} (0: never stop) to train through it")
            control.should_log = True  # the step's row is written; on_log then stops training
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._error is not None and logs and "loss" in logs:
            raise NonfiniteTrainingError(self._error)

    def _warn(self, step: int, terms: set[str], skipped: bool) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if not terms and rank != 0:
            return  # a global skip: rank 0 reports it
        what = f"non-finite {', '.join(sorted(terms))} on rank {rank}" if terms else "non-finite gradients"
        update = "the optimizer skipped the update" if skipped else "the update was applied"
        log.warning("step %d: %s; %s (%d non-finite steps so far, %d in a row)", step, what, update,
                    self.nonfinite_steps, self.in_a_row)


class RouterScheduleCallback(TrainerCallback):
    """Drives router state from the trainer: the hyper router's k(t), auxfree's bias updates
    (none on a step whose update the optimizer skipped; its load counts are dropped)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_router_step(model, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:
            routers_step_end(model, step_applied=not _update_skipped(optimizer))


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class MetricsFileCallback(TrainerCallback):
    """Appends every log (one JSON object per line) to ``metrics.jsonl`` on the main process.

    A resumed run first drops the rows logged after its checkpoint (the killed attempt trained
    those steps again from the checkpoint), so each step has one row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (row := _json_or_none(line)) is not None and row.get("step", 0) <= state.global_step]
        if len(kept) != len(lines):  # also drops a line torn by the kill
            checkpoints.write_atomic(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "time": round(time.time(), 3), **logs}) + "\n")


class AtomicCheckpointCallback(TrainerCallback):
    """Marks a checkpoint complete only after every rank wrote it, then rotates old ones."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and _is_main():
            checkpoints.unmark(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        if _is_main():
            checkpoints.mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
            checkpoints.rotate(args.output_dir, self.keep)
        _barrier()


class ProgressLineCallback(TrainerCallback):
    """Prints one ``[libmoe-progress] {json}`` line per log, parsed by notebooks for their progress bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            record = {"step": state.global_step, "max_steps": state.max_steps, "loss": logs.get("loss"),
                      "lm_loss": logs.get("lm_loss"), "tokens_per_s": logs.get("tokens_per_s")}
            print(PROGRESS_PREFIX + json.dumps(record), flush=True)


class ResumableTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard logging; a resumed run hides the events logged after its
    checkpoint (``purge_step``), so each step has one point."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.purge_step = state.global_step + 1 if state.global_step else None
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args):
        if self._SummaryWriter is not None:
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=getattr(self, "purge_step", None))
