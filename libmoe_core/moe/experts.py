"""Stacked expert weights and the grouped matrix product they run with.

Weights are stored input-major, ``[E, in, out]``, so expert e computes ``x @ W[e]``.
Rows handed to :class:`Experts` are sorted by expert; ``counts[e]`` rows belong to e.
``impl="grouped_mm"`` runs each projection as one ``torch._grouped_mm``; ``impl="loop"`` runs
each expert's rows through its whole MLP at once (:class:`_SegmentedMLP`), on CPU with many
small experts as parallel single-threaded workers (:func:`expert_workers`); ``auto`` picks
(:meth:`Experts.auto_impl`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import torch
from torch import nn

GROUPED_IMPLS = ("auto", "loop", "grouped_mm")


def _segments(counts: list[int]):
    """(expert, row slice) of every non-empty expert, for rows sorted by expert."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class _Chunk(NamedTuple):
    """A run of consecutive experts and their rows (contiguous, as rows are sorted by expert)."""

    experts: slice  # expert ids
    rows: slice


def _chunks(counts: list[int], n_chunks: int) -> list[_Chunk]:
    """Split the experts into at most ``n_chunks`` runs of consecutive experts with about equal
    rows: the i-th cut goes at the expert boundary nearest to i/n of the rows. Runs without rows
    are left out."""
    total = sum(counts)
    chunks, first, row0, done = [], 0, 0, 0

    def cut(stop_expert):
        nonlocal first, row0
        chunks.append(_Chunk(slice(first, stop_expert), slice(row0, done)))
        first, row0 = stop_expert, done

    def target():  # rows before the next cut, ideally; None once no cut is left
        return total * (len(chunks) + 1) / n_chunks if len(chunks) < n_chunks - 1 else None

    for e, n in enumerate(counts):
        t = target()
        if t is not None and done + n >= t and t - done < done + n - t and done > row0:
            cut(e)  # the boundary before expert e is the nearer one
        done += n
        t = target()
        if t is not None and done >= t and done > row0:
            cut(e + 1)
    if done > row0:
        cut(len(counts))
    return chunks


#: CPU: the experts run as parallel single-threaded workers (one per intra-op thread), instead of
#: one after another with every GEMM split over the threads, when each worker gets at least
#: _PARALLEL_MIN_EXPERTS_PER_WORKER non-empty experts averaging at most _PARALLEL_MAX_MEAN_ROWS
#: rows. Small GEMMs split over threads scale poorly (on a 2-core VM, [64, 512] @ [512, 2048]
#: ran 1.2x faster on two threads than on one), while experts are independent. Measured there
#: (d=512, h=1024, fwd+bwd of evenly loaded experts): 10-32% faster than grouped_mm at 16-128
#: rows per expert, 3% slower to 15% faster at 256, mixed at 512, no gain from 1024 rows on.
_PARALLEL_MIN_EXPERTS_PER_WORKER = 2
_PARALLEL_MAX_MEAN_ROWS = 256


def expert_workers(x: torch.Tensor, counts: list[int]) -> int:
    """How many single-threaded workers the fused loop runs the experts on (1: the calling thread
    alone, every GEMM multi-threaded). More than 1 only on CPU, outside autocast (which is
    thread-local), with enough small experts per thread."""
    threads = torch.get_num_threads()
    if threads < 2 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return 1
    busy = [n for n in counts if n]
    if len(busy) < threads * _PARALLEL_MIN_EXPERTS_PER_WORKER or sum(busy) > _PARALLEL_MAX_MEAN_ROWS * len(busy):
        return 1
    return threads


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer on x in (None: autocast off, or x not one it casts)."""
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if x.is_floating_point() and x.dtype != torch.float64 else None  # autocast leaves fp64 alone


_pool: tuple[int, int, concurrent.futures.ThreadPoolExecutor] | None = None  # (pid, workers, pool)


def _worker_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool of ``workers`` - 1 threads (the caller is the last worker), made again after
    a fork (a child does not inherit the threads) or when the size changes (the old one shut down)."""
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), workers):
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        _pool = (os.getpid(), workers, concurrent.futures.ThreadPoolExecutor(workers - 1, "libmoe-experts"))
    return _pool[2]


def _run_chunks(work, counts: list[int], workers: int) -> None:
    """``work(chunk)`` for the experts split into ``workers`` chunks: in the calling thread if one,
    else in parallel, each worker single-threaded (torch's thread count is 1 meanwhile, then
    restored, so this is for one calling thread at a time). Workers run without grad mode
    (thread-local; what a custom Function's forward and backward see) and in the caller's inference
    mode; an error in any of them is raised here once all have stopped."""
    chunks = _chunks(counts, workers)
    if len(chunks) < 2:
        for chunk in chunks:
            work(chunk)
        return

    inference = torch.is_inference_mode_enabled()  # thread-local, like grad mode: carried over

    def run(chunk):
        with torch.inference_mode(inference), torch.no_grad():
            work(chunk)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = _worker_pool(workers)
        futures = [pool.submit(run, chunk) for chunk in chunks[1:]]
        try:
            run(chunks[0])
        finally:
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(threads)


_BLOCK_ELEMENTS = 1 << 21  # backward block size: 8 MiB of fp32 pre-activations


def _blocks(counts: list[int], width: int):
    """Group consecutive non-empty experts into row blocks of >= _BLOCK_ELEMENTS / width rows.

    Yields (block row slice, [(expert, row slice within the block), ...])."""
    min_rows = max(1, _BLOCK_ELEMENTS // max(width, 1))
    members, block_start, n_block = [], 0, 0
    for e, rows in _segments(counts):
        members.append((e, slice(rows.start - block_start, rows.stop - block_start)))
        n_block = rows.stop - block_start
        if n_block >= min_rows:
            yield slice(block_start, rows.stop), members
            members, block_start, n_block = [], rows.stop, 0
    if members:
        yield slice(block_start, block_start + n_block), members


def _linear_into(x, weight, bias, out):
    """out = x @ weight (+ bias), written in place."""
    if bias is None:
        torch.mm(x, weight, out=out)
    else:
        torch.addmm(bias, x, weight, out=out)


class _SegmentedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W[e] (+ b[e]), one matmul per non-empty expert.

    The split happens once; products are written straight into one output (and, in
    backward, into one stacked weight gradient), so no per-expert full-size gradient
    is ever materialised (LibMoE's ``W[e]`` indexing inside autograd does that).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts: list[int]):
        out = x.new_empty(x.shape[0], weight.shape[-1])  # [S, out]
        for e, rows in _segments(counts):
            _linear_into(x[rows], weight[e], None if bias is None else bias[e], out[rows])
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        gb = weight.new_empty(weight.shape[0], weight.shape[-1]) if (need_b and ctx.has_bias) else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            g = grad_out[rows]
            if n == 0:
                if gw is not None:
                    gw[e].zero_()
                if gb is not None:
                    gb[e].zero_()
                continue
            if gx is not None:
                torch.mm(g, weight[e].t(), out=gx[rows])
            if gw is not None:
                torch.mm(x[rows].t(), g, out=gw[e])
            if gb is not None:
                torch.sum(g, dim=0, out=gb[e])
            start += n
        return gx, gw, gb, None


class _SegmentedMLP(torch.autograd.Function):
    """The whole expert MLP, one expert at a time:
    y[rows of e] = act_fn(x[rows of e] @ W_in[e] + b_in[e]) @ W_out[e] + b_out[e].

    Running both projections and the activation per expert keeps every intermediate one
    expert's rows wide ([n_e, 2h]) while it is hot in cache; two grouped products with the
    activation in between stream all S rows of [S, 2h] through memory three more times
    (on CPU that made the forward up to ~25% slower). Saves x and the pre-activation h.
    Backward works in blocks of consecutive experts (contiguous rows, at least
    ``_BLOCK_ELEMENTS`` pre-activation values unless fewer exist): it recomputes the block's
    activation and differentiates it with one autograd call (so any activation module works),
    small enough to stay in cache, large enough that the call's overhead is noise.
    With ``workers`` > 1 (:func:`expert_workers`) runs of consecutive experts go to parallel
    single-threaded workers, forward and backward; each expert's arithmetic is unchanged.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, counts: list[int], activate, keep: bool, workers: int):
        out = x.new_empty(x.shape[0], w_out.shape[-1])  # [S, out]
        width = w_in.shape[-1]  # h or 2h
        h_all = x.new_empty(x.shape[0], width) if keep else None  # [S, width] saved for backward

        def run(chunk: _Chunk):
            if not keep:  # inference: one scratch buffer per worker, reused by its experts
                scratch = x.new_empty(max(counts[chunk.experts]), width)
            for e, rows in _segments(counts[chunk.experts]):
                e, rows = e + chunk.experts.start, slice(chunk.rows.start + rows.start, chunk.rows.start + rows.stop)
                h = h_all[rows] if keep else scratch[: rows.stop - rows.start]  # [n_e, width]
                _linear_into(x[rows], w_in[e], None if b_in is None else b_in[e], h)
                _linear_into(activate(h), w_out[e], None if b_out is None else b_out[e], out[rows])

        _run_chunks(run, counts, workers)
        if keep:
            ctx.save_for_backward(x, h_all, w_in, w_out)
            ctx.counts, ctx.activate, ctx.workers = counts, activate, workers
            ctx.has_bias = (b_in is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [S, out]
        x, h_all, w_in, w_out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        need_b_in, need_b_out = need_b_in and ctx.has_bias[0], need_b_out and ctx.has_bias[1]
        need_h = need_x or need_w_in or need_b_in
        gx = torch.empty_like(x) if need_x else None
        gw_in = torch.empty_like(w_in) if need_w_in else None
        gb_in = w_in.new_empty(w_in.shape[0], w_in.shape[-1]) if need_b_in else None
        gw_out = torch.empty_like(w_out) if need_w_out else None
        gb_out = w_out.new_empty(w_out.shape[0], w_out.shape[-1]) if need_b_out else None
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]  # experts without rows: zero gradient
        for grad in (gw_in, gb_in, gw_out, gb_out):
            if grad is not None and idle:
                grad[idle] = 0

        def run(chunk: _Chunk):
            for block, members in _blocks(ctx.counts[chunk.experts], h_all.shape[-1]):
                block = slice(chunk.rows.start + block.start, chunk.rows.start + block.stop)
                with torch.enable_grad():  # the activation of the block, recomputed: one autograd call
                    h = h_all[block].detach().requires_grad_(need_h)  # [n_block, h or 2h]
                    a = ctx.activate(h)  # [n_block, h]
                ga = torch.empty_like(a) if need_h else None
                for e, rows in members:  # rows: relative to the block
                    e += chunk.experts.start
                    g = grad_out[block][rows]  # [n_e, out]
                    if gw_out is not None:
                        torch.mm(a[rows].detach().t(), g, out=gw_out[e])
                    if gb_out is not None:
                        torch.sum(g, dim=0, out=gb_out[e])
                    if ga is not None:
                        torch.mm(g, w_out[e].t(), out=ga[rows])
                if not need_h:
                    continue
                (gh,) = torch.autograd.grad(a, h, ga)  # [n_block, h or 2h]
                x_block = x[block]
                for e, rows in members:
                    e += chunk.experts.start
                    if gw_in is not None:
                        torch.mm(x_block[rows].t(), gh[rows], out=gw_in[e])
                    if gb_in is not None:
                        torch.sum(gh[rows], dim=0, out=gb_in[e])
                    if gx is not None:
                        torch.mm(gh[rows], w_in[e].t(), out=gx[block][rows])

        _run_chunks(run, ctx.counts, ctx.workers)
        return gx, gw_in, gb_in, gw_out, gb_out, None, None, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


#: CPU fp32 ``auto``: grouped_mm up to this many intermediate values ([S, h or 2h]; 32 MiB), the
#: fused loop above. Measured on a 2-core Xeon VM (d=512, h=1024, E=8 and 64): grouped_mm was
#: 7-12% faster at S*2h <= 2^23 and the fused loop 3-10% faster from 2^24 on.
_CPU_GROUPED_MM_MAX_ELEMENTS = 1 << 23


def grouped_mm_aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._grouped_mm`` needs 16-byte aligned rows and pointers."""
    size = x.element_size()
    return all(n * size % 16 == 0 for n in (x.shape[-1], weight.shape[-1], weight.shape[-2])) and all(
        t.data_ptr() % 16 == 0 for t in (x, weight)
    )


def probe_grouped_mm(device: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs correctly on ``device`` in ``dtype``: one tiny forward and
    backward over three groups, the middle one empty, against per-group products. Builds differ:
    torch 2.8 runs it on compute capability 9.0 only (elsewhere it raises) and has no CPU kernel,
    and one GPU generation was reported to give an empty group's weight a non-zero gradient."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(32, 16, generator=g).to(device, dtype).requires_grad_()  # [rows, in]
            w = torch.randn(3, 16, 16, generator=g).to(device, dtype).requires_grad_()  # [groups, in, out]
            y = torch._grouped_mm(x, w, offs=torch.tensor([16, 16, 32], dtype=torch.int32, device=device))
            y.backward(torch.ones_like(y))
            expected = torch.cat([x[:16] @ w[0], x[16:] @ w[2]]).float()
            return bool(torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2) and (w.grad[1] == 0).all())
    except (RuntimeError, NotImplementedError):
        return False


#: :func:`probe_grouped_mm`, run once per device and dtype (eagerly, also from a compiled forward)
grouped_mm_works = torch.compiler.disable(functools.cache(probe_grouped_mm))


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``auto`` picks ``torch._grouped_mm`` on CUDA for bf16 (where it is fast) when aligned and
    when this torch runs it correctly on this GPU (:func:`grouped_mm_works`)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_aligned(x, weight)
            and grouped_mm_works(str(x.device), x.dtype))


class _AddExpertBias(torch.autograd.Function):
    """rows + each row's expert bias, for rows sorted by expert. Backward sums each expert's rows in
    fp32 (autograd's own backward of the repeated bias adds row after row in the bias dtype: bf16
    keeps 8 bits of each partial sum, so a bf16 bias gradient over thousands of rows drifts by
    percents on CUDA, in an order that changes from run to run)."""

    @staticmethod
    def forward(ctx, rows, bias, counts):  # rows [S, out], bias [E, out], counts [E]
        ctx.save_for_backward(counts)
        return rows + torch.repeat_interleave(bias, counts, dim=0, output_size=rows.shape[0])

    @staticmethod
    def backward(ctx, grad):  # grad [S, out]
        (counts,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = torch.segment_reduce(grad.float(), "sum", lengths=counts, axis=0).to(grad.dtype)  # [E, out]
        return grad, grad_bias, None


def grouped_linear(
    x: torch.Tensor,  # [S, in], rows sorted by expert
    weight: torch.Tensor,  # [E, in, out]
    counts: torch.Tensor,  # [E] int64 rows per expert
    bias: torch.Tensor | None = None,  # [E, out]
    impl: str = "auto",
) -> torch.Tensor:  # [S, out]
    """One grouped matrix product: each expert's rows times its own weight."""
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x, weight) else "loop"
    if impl == "grouped_mm":
        x = x.contiguous()
        if not grouped_mm_aligned(x, weight):
            raise ValueError(
                f"impl='grouped_mm' needs feature sizes whose rows are multiples of 16 bytes; got in={x.shape[-1]}, "
                f"out={weight.shape[-1]} in {x.dtype}. Use impl='auto' or 'loop'."
            )
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = torch._grouped_mm(x, weight, offs=offsets)
        out = _ContiguousGrad.apply(out)
        if bias is not None:
            out = _AddExpertBias.apply(out, bias, counts)
        return out
    if impl == "loop":
        return _SegmentedLinear.apply(x.contiguous(), weight, bias, counts.tolist())
    raise ValueError(f"unknown grouped matmul implementation {impl!r}; choose one of {GROUPED_IMPLS}")


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    ``gated=False`` (SigLIP, CLIP, LLaVA projector): fc2(act(fc1(x))).
    ``gated=True`` (Phi-3, Llama, Qwen2, Mistral): down(act(gate(x)) * up(x)); ``w_in``
    holds [gate | up] side by side, ``[E, in, 2h]``.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        gated: bool,
        activation: nn.Module,
        bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in GROUPED_IMPLS:
            raise ValueError(f"unknown grouped matmul implementation {impl!r}; choose one of {GROUPED_IMPLS}")
        self.num_experts, self.in_features = num_experts, in_features
        self.hidden_features, self.out_features = hidden_features, out_features
        self.gated, self.impl = gated, impl
        self.act = activation
        width = 2 * hidden_features if gated else hidden_features
        self.w_in = nn.Parameter(torch.empty(num_experts, in_features, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_features, out_features))
        self.b_in = nn.Parameter(torch.zeros(num_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        for w in (self.w_in, self.w_out):
            nn.init.normal_(w, std=in_features**-0.5)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(h)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [S, in] sorted by expert, counts: [E] -> [S, out]. Under autocast the products run
        in its dtype, as an ``nn.Linear``'s would (autocast reaches neither ``out=`` products nor
        ``torch._grouped_mm``, so the operands are cast here and autocast is off inside)."""
        params = (self.w_in, self.b_in, self.w_out, self.b_out)
        dtype = _autocast_dtype(x)
        if dtype is None:
            return self._run(x, counts, *params)
        x, params = x.to(dtype), tuple(None if p is None else p.to(dtype) for p in params)
        with torch.autocast(x.device.type, enabled=False):
            return self._run(x, counts, *params)

    def _run(self, x, counts, w_in, b_in, w_out, b_out) -> torch.Tensor:
        impl = self.auto_impl(x, counts) if self.impl == "auto" else self.impl
        if impl == "loop":  # one expert at a time through the whole MLP
            keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_in, b_in, w_out, b_out))
            rows_per_expert = counts.tolist()
            return _SegmentedMLP.apply(x.contiguous(), w_in, b_in, w_out, b_out, rows_per_expert,
                                       self.activate, keep, expert_workers(x, rows_per_expert))
        h = grouped_linear(x, w_in, counts, b_in, impl)  # [S, h or 2h]
        return grouped_linear(self.activate(h), w_out, counts, b_out, impl)

    def auto_impl(self, x: torch.Tensor, counts: torch.Tensor | None = None) -> str:
        """What ``impl="auto"`` runs on x [S, in] split by ``counts``: ``torch._grouped_mm`` on CUDA
        bf16; on CPU the fused per-expert MLP when its experts run on parallel workers
        (:func:`expert_workers`), else grouped_mm for fp32 while the [S, h or 2h] intermediate is small
        (<= _CPU_GROUPED_MM_MAX_ELEMENTS), where one C++ op per projection beats a Python loop over
        experts; else the fused loop, whose cache locality wins once the intermediate no longer fits."""
        widths = (self.in_features, self.w_in.shape[-1], self.hidden_features, self.out_features)
        aligned = all(n * x.element_size() % 16 == 0 for n in widths) and all(
            t.data_ptr() % 16 == 0 for t in (x, self.w_in, self.w_out)
        )  # both projections' operands, as torch._grouped_mm needs
        if grouped_mm_supported(x, self.w_in) and aligned:
            return "grouped_mm"
        if counts is not None and x.device.type == "cpu" and expert_workers(x, counts.tolist()) > 1:
            return "loop"  # (the CPU check first: reading counts on a GPU would wait for it)
        small = 0 < x.shape[0] * self.w_in.shape[-1] <= _CPU_GROUPED_MM_MAX_ELEMENTS
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and grouped_mm_works("cpu", torch.float32)
        return "grouped_mm" if small and cpu_fp32 and aligned else "loop"

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x [N, in] -> [N, out] (for oracles and inspection)."""
        h = x @ self.w_in[e] + (0 if self.b_in is None else self.b_in[e])
        y = self.activate(h) @ self.w_out[e]
        return y + (0 if self.b_out is None else self.b_out[e])

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "plain"
        return f"{kind}, num_experts={self.num_experts}, {self.in_features}->{self.hidden_features}->{self.out_features}, impl={self.impl}"
