"""Training batches without images: the vision tower and projector still run, on one dummy image.

In multi-process training every rank must run the same modules and give the same parameters a
gradient (DDP / ZeRO-2 gradient reductions, ZeRO-3 parameter gathers); a rank whose micro-batch
was text-only used to skip the vision tower and projector (gloo aborted, NCCL hung). The dummy
image adds exactly 0 and counts nowhere: no aux loss or term, no ``last_routing``, no auxfree load.
"""

import contextlib
import copy
import os
from datetime import timedelta

import pytest
import torch
from test_model_forward import batch

from libmoe_core.model.placement import placed_moe_layers
from libmoe_core.model.presets import build_model
from libmoe_core.train.stages import set_trainable


def make_batch(model, images_per_sample=(0, 0), seed=0):
    """A padded batch (rows of different lengths); pixel_values only when some sample has an image."""
    return batch(model, images_per_sample, length=20, seed=seed, shrink=3)


def image_side(name: str) -> bool:
    return name.startswith(("vision_tower.", "projector."))


def moe_of(model, llm: bool):
    return [(p, i, layer) for p, i, layer in placed_moe_layers(model) if (p == "llm") == llm]


def count_calls(modules):
    """A list whose length grows by one per forward call of any of ``modules``."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def model_and_reference(router="smoe", checkpointing=False, **kwargs):
    """(model, reference): the reference is a copy whose vision tower and projector are frozen, so
    it never runs them on a text-only batch (the model before the fix did the same)."""
    model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers=[0], router=router, **kwargs)
    reference = copy.deepcopy(model)
    reference.vision_tower.requires_grad_(False)
    reference.projector.requires_grad_(False)
    for m in (model, reference):
        m.train()
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, reference


def load_counts(model):
    return {f"{p}{i}": layer.router.load_counts.clone() for p, i, layer in placed_moe_layers(model)
            if hasattr(layer.router, "load_counts")}


def routing_fields(routing):
    return None if routing is None else (routing.experts, routing.weights, routing.probs)


def assert_same_routing(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    for x, y in zip(routing_fields(a), routing_fields(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("router", ["smoe", "auxfree"])
def test_text_only_batch_gives_every_vision_and_projector_parameter_a_zero_gradient(router, checkpointing):
    model, reference = model_and_reference(router, checkpointing)
    text = make_batch(model)
    calls = count_calls([layer for _, _, layer in moe_of(model, llm=False)])
    out, ref = model(**text), reference(**text)
    assert len(calls) == 3  # the dummy image went through both vision MoE layers and the projector MoE
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.lm_loss, ref.lm_loss)
    assert torch.equal(out.logits, ref.logits)
    out.loss.backward()
    ref.loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if image_side(n) and p.requires_grad]
    assert any(".router." in n for n, _ in trainable) and any(".experts." in n for n, _ in trainable)
    for name, param in trainable:
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) == 0, name  # exactly zero (and so no NaN)
    ref_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if not image_side(name):  # the language model's gradients are those without the dummy image
            assert torch.equal(param.grad, ref_grads[name].grad), name


def recompute(whole: bool):
    """Checkpointed segments' recompute as torch does it by default (stopped right after the last
    tensor backward needs, which can be before an MoE layer stores its routing), or ``whole``."""
    return torch.utils.checkpoint.set_checkpoint_early_stop(False) if whole else contextlib.nullcontext()


@pytest.mark.parametrize("checkpointing", [False, "early-stop", "whole"])
@pytest.mark.parametrize("router", ["smoe", "auxfree"])
def test_the_dummy_image_counts_in_no_aux_loss_routing_or_load(router, checkpointing):
    with recompute(checkpointing == "whole"):
        check_the_dummy_image_counts_nowhere(router, bool(checkpointing))


def check_the_dummy_image_counts_nowhere(router, checkpointing):
    model, reference = model_and_reference(router, checkpointing)
    text = make_batch(model)
    before = load_counts(model)
    calls = count_calls([layer for _, _, layer in moe_of(model, llm=False)])
    out, ref = model(**text), reference(**text)
    assert calls  # the vision and projector MoE layers ran
    assert set(out.aux_losses) == set(ref.aux_losses) == {k for k in ref.aux_losses if k.startswith("llm/")}
    for key in ref.aux_losses:
        assert torch.equal(out.aux_losses[key], ref.aux_losses[key]), key
        assert torch.equal(out.aux_terms[key], ref.aux_terms[key]), key
    assert torch.equal(out.aux_loss, ref.aux_loss)

    def check_routing():
        for (_, _, layer), (_, _, ref_layer) in zip(placed_moe_layers(model), placed_moe_layers(reference)):
            assert_same_routing(layer.last_routing, ref_layer.last_routing)
        for _, _, layer in moe_of(model, llm=False):
            assert layer.last_routing is None
        _, weighted, terms = model.aux_losses()
        assert set(weighted) == set(ref.aux_losses) and set(terms) == set(ref.aux_terms)
        counts, ref_counts = load_counts(model), load_counts(reference)
        assert counts.keys() == ref_counts.keys()
        for key, value in counts.items():
            assert torch.equal(value, ref_counts[key]), key
            if not key.startswith("llm"):
                assert torch.equal(value, before[key]), key  # the dummy's tokens are not counted

    check_routing()
    out.loss.backward()  # a checkpointed segment's recompute routes the dummy again: still nothing left over
    ref.loss.backward()
    check_routing()
    if router == "auxfree":
        assert int(sum(v.sum() for k, v in load_counts(model).items() if k.startswith("llm"))) > 0


@pytest.mark.parametrize("whole", [False, True], ids=["early-stop", "whole"])
def test_image_batches_are_unchanged_and_a_text_batch_after_one_leaves_no_vision_routing(whole):
    with recompute(whole):
        check_an_image_batch_then_a_text_batch()


def check_an_image_batch_then_a_text_batch():
    model, reference = model_and_reference(checkpointing=True)
    images = make_batch(model, (1, 0, 2))
    out, ref = model(**images), reference(**images)
    assert torch.equal(out.loss, ref.loss)
    assert {k.split("/")[0] for k in out.aux_losses} == {"vision", "projector", "llm"}
    vision_routing = moe_of(model, llm=False)[0][2].last_routing
    assert vision_routing is not None
    text = make_batch(model)
    out2 = model(**text)
    assert set(out2.aux_losses) == {"llm/balance", "llm/z"}
    out2.loss.backward()
    out.loss.backward()  # recomputes the image batch's segments: the routing left is still the text batch's
    assert all(layer.last_routing is None for _, _, layer in moe_of(model, llm=False))
    for name, param in model.named_parameters():
        if image_side(name):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_the_dummy_image_runs_only_when_a_training_forward_is_differentiated():
    model = build_model("tiny", moe_vision=True, vision_scales=[1, 2])
    text = make_batch(model)
    calls = count_calls([model.vision_tower])

    def runs(**kwargs) -> int:
        before = len(calls)
        model(**text, **kwargs)
        return len(calls) - before

    model.train()
    assert runs() == 1
    with torch.no_grad():
        assert runs() == 0  # evaluation in training mode
    model.eval()
    assert runs() == 0
    before = len(calls)
    with torch.no_grad():
        generated = model.generate(input_ids=text["input_ids"][:1, :5], max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == 7 and len(calls) == before
    model.train()
    model.vision_tower.requires_grad_(False)
    model.projector.requires_grad_(False)
    assert runs() == 0  # nothing on the image side trains
    for p in model.vision_tower.parameters():
        p.ds_id = 0  # as DeepSpeed ZeRO-3 marks the parameters it partitions: gathered in forward, frozen or not
    assert runs() == 1


def test_pretrain_stage_text_only_batch_trains_the_projector_with_a_zero_gradient():
    model = build_model("tiny").train()
    set_trainable(model, "pretrain")  # projector only: the vision tower and LLM are frozen
    out = model(**make_batch(model))
    assert out.loss.requires_grad  # (it had no gradient at all: backward raised)
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("projector."):
            assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name
        else:
            assert param.grad is None, name


# ---- two processes: DDP over gloo, rank 0 with images and rank 1 text-only

def _ddp_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers=[0]).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: every grad must come
        batch = make_batch(model, (1, 2) if rank == 0 else (0, 0), seed=rank)
        ddp(**batch).loss.backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(folder, f"grads{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_one_text_only_reduce_the_same_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0], "a rank failed or hung (collective mismatch)"
    grads = [torch.load(tmp_path / f"grads{rank}.pt") for rank in range(2)]
    # single-process reference: the mean of the two ranks' gradients
    torch.manual_seed(0)
    model = build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers=[0]).train()
    single = []
    for rank in range(2):
        model.zero_grad(set_to_none=True)
        model(**make_batch(model, (1, 2) if rank == 0 else (0, 0), seed=rank)).loss.backward()
        single.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, _ in model.named_parameters():
        expected = (single[0][name] + single[1][name]) / 2
        assert torch.equal(grads[0][name], grads[1][name]), name
        torch.testing.assert_close(grads[0][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        if image_side(name):
            assert torch.count_nonzero(single[1][name]) == 0, name  # the text-only rank gives zeros
