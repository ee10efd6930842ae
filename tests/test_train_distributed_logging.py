"""MoETrainer under two real ranks (plain DDP, gloo, CPU): logged loss components are means over
every rank, and a resume inside epoch 1 keeps epoch 1's modality-grouped order.

One launch of two processes serves both tests (the module is also the workers' script): a toy
model whose losses depend only on the rank, two epochs with a checkpoint inside epoch 1, then a
resume from that checkpoint. The oracles are hand-computed means and plain counts of sample ids.
"""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from ranks import run_ranks

N, BATCH, RANKS = 48, 4, 2  # 48 samples, 4 per rank and step, 2 ranks: 6 steps per epoch
STEPS_PER_EPOCH = N // (BATCH * RANKS)
SAVE_AT = STEPS_PER_EPOCH + 3  # killed 3 steps into epoch 1
LENGTHS = [(1 if i % 3 else -1) * (i + 1) for i in range(N)]  # image (> 0) and text-only (< 0) samples
# rank r's micro-batches: lm_loss r + 1 and a rank-specific aux loss (rank 1 has no llm routing, rank 0
# no vision routing), so rank 0's numbers alone differ from the all-rank means
LM = {0: 1.0, 1: 2.0}
AUX = {0: {"llm/balance": 0.1}, 1: {"vision/balance": 0.2}}
TERMS = {0: {"llm/balance": 1.5}, 1: {"vision/balance": 0.8}}  # unweighted router terms, as aux_terms


def _worker(out: Path) -> None:
    from dataclasses import dataclass

    import torch
    import torch.distributed as dist
    from torch import nn
    from transformers import TrainingArguments
    from transformers.utils import ModelOutput

    from libmoe_core.train.trainer import MoETrainer

    @dataclass
    class Output(ModelOutput):
        loss: torch.Tensor | None = None
        lm_loss: torch.Tensor | None = None
        aux_losses: dict | None = None
        aux_terms: dict | None = None

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, attention_mask):
            rank, zero = dist.get_rank(), 0 * (self.w * x.mean()).sum()
            lm = torch.tensor(LM[rank]) + zero
            aux = {k: torch.tensor(v) + zero for k, v in AUX[rank].items()}
            terms = {k: torch.tensor(v) + zero for k, v in TERMS[rank].items()}
            return Output(loss=lm + sum(aux.values()), lm_loss=lm, aux_losses=aux, aux_terms=terms)

    class Recording(MoETrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.seen.append([self.state.global_step + 1, inputs["ids"].tolist()])
            return super().compute_loss(model, inputs, *args, **kwargs)

    def collate(ids):
        return {"ids": torch.tensor(ids), "x": torch.tensor(ids, dtype=torch.float32),
                "attention_mask": torch.ones(len(ids), 3, dtype=torch.long)}

    def run(folder, resume=None):
        args = TrainingArguments(
            output_dir=str(out / folder), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
            num_train_epochs=2, learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=SAVE_AT,
            seed=42, data_seed=42, report_to="none", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0,
        )
        trainer = Recording(model=Toy(), args=args, train_dataset=list(range(N)), data_collator=collate,
                            modality_lengths=LENGTHS)
        trainer.seen = []
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    resumed = run("resumed", resume=str(out / "straight" / f"checkpoint-{SAVE_AT}"))
    rank = dist.get_rank()
    logs = [row for row in straight.state.log_history if "loss" in row]
    (out / f"rank{rank}.json").write_text(json.dumps({"straight": straight.seen, "resumed": resumed.seen, "logs": logs}))
    dist.barrier()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for code, text in run_ranks([sys.executable, __file__, str(out)], RANKS, out):
        assert code == 0, text[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)]


@pytest.mark.slow
def test_logged_loss_components_are_means_over_every_rank(two_rank_run):
    # each rank runs one micro-batch per step: the mean of a term is (rank 0's + rank 1's) / 2, 0 where absent
    expected = {"lm_loss": (1.0 + 2.0) / 2, "aux/llm/balance": (0.1 + 0.0) / 2, "aux/vision/balance": (0.0 + 0.2) / 2,
                # unweighted router terms: the mean over the micro-batches that routed through the placement
                # (a balance halved by the other rank's text-only batches would read as better than even)
                "router/llm/balance": 1.5, "router/vision/balance": 0.8}
    for rank, result in enumerate(two_rank_run):
        logs = result["logs"]
        assert [row["step"] for row in logs] == list(range(1, 2 * STEPS_PER_EPOCH + 1)), rank
        for row in logs:
            for key, value in expected.items():
                assert row.get(key) == pytest.approx(value, abs=1e-6), (rank, row)
            # transformers' loss (its own all-rank mean) is the sum of the logged components
            parts = row["lm_loss"] + sum(v for k, v in row.items() if k.startswith("aux/"))
            assert row["loss"] == pytest.approx(parts, abs=1e-5), (rank, row)
            assert row["tokens_per_s"] > 0


def _steps(seen, first, last):
    return [ids for step, ids in seen if first <= step <= last]


@pytest.mark.slow
def test_a_resume_inside_epoch_1_keeps_epoch_1s_order(two_rank_run):
    e0, e1 = (1, STEPS_PER_EPOCH), (STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH)
    for first, last in (e0, e1):  # the uninterrupted run: each epoch sees every sample once
        counts = Counter(i for r in two_rank_run for ids in _steps(r["straight"], first, last) for i in ids)
        assert counts == Counter(range(N))
    assert _steps(two_rank_run[0]["straight"], *e0) != _steps(two_rank_run[0]["straight"], *e1)  # reshuffled
    for rank, result in enumerate(two_rank_run):
        assert [step for step, _ in result["resumed"]] == list(range(SAVE_AT + 1, 2 * STEPS_PER_EPOCH + 1))
        # the resumed tail of epoch 1 is the uninterrupted run's, batch by batch
        assert _steps(result["resumed"], SAVE_AT + 1, e1[1]) == _steps(result["straight"], SAVE_AT + 1, e1[1]), rank
    # epoch 1 of the interrupted run (before the checkpoint, then resumed): every sample exactly once
    counts = Counter(i for r in two_rank_run
                     for ids in _steps(r["straight"], e1[0], SAVE_AT) + _steps(r["resumed"], SAVE_AT + 1, e1[1]) for i in ids)
    assert counts == Counter(range(N))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
