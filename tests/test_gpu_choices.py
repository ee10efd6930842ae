"""What a GPU pays for in the training hot path: host syncs per micro-batch (MoETrainer.compute_loss) and per step (auxfree)."""

import math

import pytest
import torch
from host_reads import host_reads
from transformers import TrainingArguments

from libmoe_core.model.presets import build_model
from libmoe_core.train.trainer import MoETrainer


class Replay(torch.nn.Module):
    """Returns outputs computed beforehand: compute_loss's own work is all that runs."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **inputs):
        return self.outputs


@pytest.fixture(scope="module")
def model_and_outputs():
    model = build_model("tiny", moe_llm_layers=[0, 1], moe_projector=True).train()
    ids = torch.randint(20, 400, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]), "labels": ids,
              "ids": torch.tensor([0, 1])}
    with torch.no_grad():
        outputs = model(**{k: v for k, v in inputs.items() if k != "ids"})
    return model, inputs, outputs


def trainer_for(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    return MoETrainer(model=model, args=args)


def test_compute_loss_waits_for_the_device_once_per_micro_batch(tmp_path, monkeypatch, model_and_outputs):
    """A float() of lm_loss and of every aux loss and router term, an isfinite check and a token count:
    ~15 host syncs per micro-batch on a GPU (each waits for all the work queued so far)."""
    model, inputs, outputs = model_and_outputs
    assert len(outputs.aux_losses) + len(outputs.aux_terms) >= 4  # a realistic set of terms
    trainer = trainer_for(model, tmp_path)
    replay = Replay(outputs).train()
    ops = host_reads(lambda: trainer.compute_loss(replay, inputs), monkeypatch)
    assert ops == ["tolist"]
    # the values logged are float() of each, as they were, and the real tokens are counted
    expected = {"lm_loss": float(outputs.lm_loss), **{f"aux/{k}": float(v) for k, v in outputs.aux_losses.items()},
                **{f"router/{k}": float(v) for k, v in outputs.aux_terms.items()}}
    assert dict(trainer._sums) == expected and set(trainer._counts.values()) == {1}
    assert trainer._micro_steps == 1 and trainer._tokens == 13 and trainer.nonfinite._terms == set()
    trainer.compute_loss(replay, inputs)
    assert dict(trainer._sums) == {k: 2 * v for k, v in expected.items()} and trainer._tokens == 26


def test_compute_loss_still_names_the_non_finite_terms(tmp_path, model_and_outputs):
    model, inputs, outputs = model_and_outputs
    name = next(iter(outputs.aux_losses))
    cases = [  # (lm_loss, aux value, router term value, loss) -> terms noted
        ((float("nan"), None, None, None), {"lm_loss"}),
        ((None, float("inf"), None, None), {f"aux/{name}"}),
        ((None, None, float("nan"), None), set()),  # router terms are diagnostics, not the loss
        ((None, None, None, float("nan")), {"loss"}),  # only the total is bad
        ((float("nan"), None, None, float("nan")), {"lm_loss"}),  # the term, not "loss" too
    ]
    for (lm, aux, term, loss), noted in cases:
        bad = type(outputs)(**{k: v for k, v in outputs.items()})
        bad.aux_losses, bad.aux_terms = dict(outputs.aux_losses), dict(outputs.aux_terms)
        if lm is not None:
            bad.lm_loss = torch.tensor(lm)
        if aux is not None:
            bad.aux_losses[name] = torch.tensor(aux)
        if term is not None:
            bad.aux_terms[next(iter(outputs.aux_terms))] = torch.tensor(term)
        if loss is not None:
            bad.loss = torch.tensor(loss)
        trainer = trainer_for(model, tmp_path)
        trainer.compute_loss(Replay(bad).train(), inputs)
        assert trainer.nonfinite._terms == noted, (lm, aux, term, loss)
        if lm is not None:
            assert math.isnan(trainer._sums["lm_loss"])


def test_auxfree_step_end_waits_for_no_device_and_leaves_the_bias_as_it_is_without_load(monkeypatch):
    """`if load.sum() > 0` made the host wait for the GPU in every auxfree layer at every step; with no
    load at all the update must leave the bias exactly as it is (-0.0 included)."""
    from libmoe_core.moe import get_router_class

    router = get_router_class("auxfree")(16, 6, 1, bias_update_rate=1e-3)
    bias = torch.tensor([-0.0, 0.0, 0.6, -1e-3, 3.5e-7, -123.25])
    with torch.no_grad():
        router.selection_bias.copy_(bias)
    assert host_reads(router.on_step_end, monkeypatch) == []
    assert torch.equal(router.selection_bias.view(torch.int32), bias.view(torch.int32))  # bit for bit
    # with load: the update it always made, bit for bit (ties at the mean included)
    for load in ([5, 0, 3, 1, 7, 2], [3, 3, 3, 1, 5, 3], [4, 4, 4, 4, 4, 4]):
        before = router.selection_bias.clone()
        router.load_counts.copy_(torch.tensor(load))
        router.on_step_end()
        loads = torch.tensor(load, dtype=torch.float64)
        expected = before + 1e-3 * torch.sign(loads.mean() - loads).float()
        assert torch.equal(router.selection_bias, expected), load
        assert router.load_counts.sum() == 0
