"""The fused expert loop on parallel single-threaded CPU workers: how experts are split, when it
applies, and that it computes what the one-thread-at-a-time loop computes (outputs, gradients)."""

import itertools
import threading

import pytest
import torch
from torch import nn

from libmoe_core.moe import Experts
from libmoe_core.moe import experts as experts_module
from libmoe_core.moe.experts import _chunks, expert_workers


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_chunks_are_contiguous_runs_of_experts_with_about_equal_rows():
    for counts, n in [([64] * 64, 2), ([3, 0, 5, 1, 0, 6, 2], 3), ([0, 0, 7], 2), ([9, 1, 1, 1], 2), ([5] * 8, 8)]:
        chunks = _chunks(counts, n)
        assert 1 <= len(chunks) <= n
        assert chunks[0].experts.start == 0 and chunks[0].rows.start == 0
        for a, b in itertools.pairwise(chunks):  # consecutive experts, consecutive rows
            assert a.experts.stop == b.experts.start and a.rows.stop == b.rows.start
        assert chunks[-1].rows.stop == sum(counts)
        assert all(c.rows.stop - c.rows.start == sum(counts[c.experts]) > 0 for c in chunks)
    assert [c.rows for c in _chunks([64] * 64, 2)] == [slice(0, 2048), slice(2048, 4096)]
    assert [c.experts for c in _chunks([9, 1, 1, 1], 2)] == [slice(0, 1), slice(1, 4)]  # one big expert: its own run
    assert [c.rows for c in _chunks([600, 400, 500, 548], 2)] == [slice(0, 1000), slice(1000, 2048)]  # nearest cut
    assert [c.rows for c in _chunks([1] * 9, 3)] == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert _chunks([0, 0, 0], 2) == [] and len(_chunks([0, 0, 7], 2)) == 1


def test_parallel_workers_only_for_many_small_experts_on_cpu(two_threads, monkeypatch):
    x = torch.randn(8, 4)
    assert expert_workers(x, [10, 10, 0, 10, 10]) == 2  # 4 busy experts: 2 per thread
    assert expert_workers(x, [10, 10, 0, 10, 0]) == 1  # 3 busy experts: fewer than 2 per thread
    monkeypatch.setattr(experts_module, "_PARALLEL_MAX_MEAN_ROWS", 9)
    assert expert_workers(x, [10, 10, 10, 10]) == 1  # experts too large: multi-threaded GEMMs
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert expert_workers(x, [10] * 4) == 1  # autocast state is per thread
    torch.set_num_threads(1)
    assert expert_workers(x, [10] * 4) == 1


class ThreadRecordingSiLU(nn.SiLU):
    """SiLU that records which thread ran it and how many intra-op threads that thread had."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x):
        self.seen.add((threading.current_thread().name, torch.get_num_threads()))
        return super().forward(x)


@pytest.mark.parametrize("gated", [True, False])
def test_parallel_experts_equal_the_sequential_loop(gated, two_threads, monkeypatch):
    """Same outputs and gradients (x, weights, biases) with the experts on two single-threaded
    workers as one after another, with an idle expert and uneven loads; inference too."""
    torch.manual_seed(0)
    act = ThreadRecordingSiLU()
    experts = Experts(6, 16, 24, 16, gated=gated, activation=act, bias=True, impl="loop")
    with torch.no_grad():
        for p in (experts.b_in, experts.b_out):
            p.normal_()
    counts = torch.tensor([5, 0, 9, 3, 7, 4])
    x = torch.randn(int(counts.sum()), 16)
    probe = torch.randn(x.shape[0], 16)

    def run(workers):
        monkeypatch.setattr(experts_module, "_PARALLEL_MAX_MEAN_ROWS", 10**6 if workers > 1 else 0)
        assert expert_workers(x, counts.tolist()) == workers
        act.seen.clear()
        xin = x.clone().requires_grad_(True)
        y = experts(xin, counts)
        grads = torch.autograd.grad((y * probe).sum(), [xin, *experts.parameters()])
        with torch.no_grad():
            y_inference = experts(x, counts)
        with torch.inference_mode():  # thread-local too: the workers must write inference tensors
            y_inference_mode = experts(x, counts)
        torch.testing.assert_close(y_inference_mode, y_inference, rtol=0, atol=0)
        return y, grads, y_inference, set(act.seen)

    y1, grads1, inf1, seen1 = run(1)
    y2, grads2, inf2, seen2 = run(2)
    assert seen1 == {(threading.current_thread().name, 2)}  # one thread, multi-threaded GEMMs
    assert len({name for name, _ in seen2}) == 2 and {n for _, n in seen2} == {1}  # two workers, 1 thread each
    assert torch.get_num_threads() == 2  # restored
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(inf2, inf1)
    torch.testing.assert_close(inf1, y1)
    for g2, g1 in zip(grads2, grads1, strict=True):
        torch.testing.assert_close(g2, g1)
    assert torch.count_nonzero(grads2[1][1]) == 0  # w_in of the idle expert


def test_a_failing_worker_raises_and_the_thread_count_is_restored(two_threads, monkeypatch):
    monkeypatch.setattr(experts_module, "_PARALLEL_MAX_MEAN_ROWS", 10**6)

    class FailsOnSevenRows(nn.SiLU):
        def forward(self, x):
            if x.shape[0] == 7:
                raise RuntimeError("expert with 7 rows failed")
            return super().forward(x)

    experts = Experts(4, 8, 8, 8, gated=False, activation=FailsOnSevenRows(), impl="loop")
    assert [c.experts for c in _chunks([2, 3, 4, 7], 2)] == [slice(0, 3), slice(3, 4)]
    assert [c.experts for c in _chunks([7, 2, 3, 4], 2)] == [slice(0, 2), slice(2, 4)]
    for counts in ([2, 3, 4, 7], [7, 2, 3, 4]):  # the failing expert in the pool's chunk, then in the caller's
        with pytest.raises(RuntimeError, match="7 rows failed"):
            experts(torch.randn(16, 8), torch.tensor(counts))
        assert torch.get_num_threads() == 2


def test_worker_pool_is_remade_after_a_fork(monkeypatch):
    pool = experts_module._worker_pool(2)
    assert experts_module._worker_pool(2) is pool
    resized = experts_module._worker_pool(3)
    assert resized is not pool
    with pytest.raises(RuntimeError, match="after shutdown"):  # the old pool is shut down, not leaked
        pool.submit(int)
    pool = experts_module._worker_pool(2)
    monkeypatch.setattr(experts_module.os, "getpid", lambda: -1)  # as in a forked child
    assert experts_module._worker_pool(2) is not pool
