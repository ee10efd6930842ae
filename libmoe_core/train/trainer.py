"""HF Trainer, extended through its hooks: loss components, tokens/s, router schedule,
modality-grouped sampling and atomic checkpoints."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..data.sampler import ModalityLengthGroupedSampler
from ..moe import moe_layers, routers_step_end, set_router_step
from . import checkpoints

MODEL_INPUT_SKIP = ("ids",)  # collator keys that are bookkeeping, not model inputs
PROGRESS_PREFIX = "[libmoe-progress] "  # machine-readable progress lines for notebooks


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class MoETrainer(Trainer):
    """Adds to each training log, as means over the window's micro-batches on every rank:
    ``lm_loss``, every auxiliary loss the model reports (``aux/<placement>/<term>``, weighted as
    in the loss and averaged over all micro-batches, so ``loss = lm_loss + sum(aux/*)``),
    ``router/<placement>/<term>`` (unweighted and averaged over the micro-batches that routed
    through the placement: a vision balance of 1 means even, whatever share of batches had
    images), ``tokens_per_s`` and the hyper router's ``hyper_k``."""

    def __init__(self, *args, modality_lengths: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
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
            reported = {}
            if getattr(outputs, "lm_loss", None) is not None:
                reported["lm_loss"] = float(outputs.lm_loss)
            for name, value in (getattr(outputs, "aux_losses", None) or {}).items():
                reported[f"aux/{name}"] = float(value)  # coefficient-weighted, as in the loss
            for name, value in (getattr(outputs, "aux_terms", None) or {}).items():
                reported[f"router/{name}"] = float(value)  # unweighted (balance = 1 when even)
            for name, value in reported.items():
                self._sums[name] += value
                self._counts[name] += 1
            self._micro_steps += 1
            self._tokens += int(inputs["attention_mask"].sum())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if getattr(self, "_nothing_trained", False) and "train_runtime" in logs:
            return
        # every rank logs the training loss at the same steps (transformers gathers it from all of them
        # first), so the collectives in _window_totals line up; "loss" is never in evaluate()'s logs
        sums, counts, micro_steps, tokens = self._window_totals() if "loss" in logs else ({}, {}, 0, 0.0)
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


class RouterScheduleCallback(TrainerCallback):
    """Drives router state from the trainer: the hyper router's k(t), auxfree's bias updates."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            set_router_step(model, state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            routers_step_end(model)


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
