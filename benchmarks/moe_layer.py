"""Benchmark one MoE layer: ours vs transformers' experts vs a LibMoE-style loop vs dense.

    python benchmarks/moe_layer.py [--json] [--quick] [--repeats N] [--out FILE] [--keep-freed-memory]
                                   [--tokens 1024,4096] [--experts 4,8] [--k 1,2] [--impls ours,dense]

Gated experts (gate/up -> SiLU -> down), d=512, h=1024, E in {4, 8, 16, 64},
k in {1, 2, 4}, tokens in {1024, 4096}. CPU fp32; on CUDA also bf16.
Implementations (each includes its router, except ``dense``):
  ours         libmoe_core MoELayer (smoe router; sorted grouped dispatch)
  hf_eager     transformers MixtralSparseMoeBlock, experts_implementation="eager"
  hf_grouped   transformers MixtralSparseMoeBlock, experts_implementation="grouped_mm"
  libmoe_loop  LibMoE-style: ModuleList of experts, torch.where per expert, index_add_
  dense        one dense MLP on tokens*k rows: the FLOP floor
Timings are medians over ``--repeats`` after one warm-up, all implementations of a row
timed round-robin (each round one step of each, order rotated) so the drift of a shared
machine's speed does not favour whichever ran first; gradients are set to None between
iterations as an optimiser's zero_grad does.

Paired ratios: sample r of every implementation ran in the same round, so per-round ratios
cancel most of the drift. Rows carry ``paired_vs_dense`` (median of impl / dense per round) and,
for ours, ``paired_vs_fastest_hf`` (against the transformers implementation with the lowest
median, ``fastest_hf``), each with ``*_ci``: a distribution-free confidence interval of that
median (order statistics; ``ci_coverage`` says its level, 0.95 from 6 repeats on). The run ends
with the issue's targets over these: a row whose interval lies above 1 is slower beyond the
noise, one whose median is above 1 but interval straddles 1 is a tie at this many repeats.

Every row also carries ``floor_fwdbwd_ms``: fwd+bwd of the E experts alone (our stacked
experts on tokens*k rows pre-sorted and split evenly; no router, sort, gather or combine), the
cost of the expert GEMMs that any implementation keeping E separate experts pays, and
``floor_ratio`` = floor / dense. ours / floor is what routing and dispatch add; floor / dense is
what E separate weight matrices cost against one (smaller GEMMs, E times the weights to read).

It also carries ``weight_traffic_ms``: the time to read all E experts' stacked weights
twice (forward, backward) and write one fresh stacked gradient of them (new memory, as after
zero_grad), measured on this machine, and ``traffic_ratio`` = (dense fwd+bwd + weight_traffic_ms)
/ dense fwd+bwd: an estimate of the ratio that the memory traffic of E separate experts alone
implies (the dense MLP touches one expert's worth). An estimate, not a bound: reads overlap
compute and both timings are noisy.

On CPU, glibc serves every allocation above 32 MiB with fresh mmap'd pages, so each step pays
page faults for its large activations and gradients (every implementation alike; measured here
at 15-30% of a step, and the largest source of run-to-run noise). ``--keep-freed-memory`` (glibc's
``mallopt``: no mmap, no trimming) keeps freed memory in the process and removes that cost, the
steady state a caching allocator (CUDA's) gives; rows record which allocator mode they ran under.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from libmoe_core.moe import Experts, MoELayer, get_router_class

D, H = 512, 1024


class GatedMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class LibMoEStyleLoop(nn.Module):
    """The dispatch style of LibMoE's layers: one module per expert, torch.where, index_add_."""

    def __init__(self, d, h, e, k):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(GatedMLP(d, h) for _ in range(e))

    def forward(self, x):
        x = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(x).float(), -1)
        top, idx = probs.topk(self.k, -1)
        top = (top / top.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(idx == e)
            if token.numel():
                out.index_add_(0, token, top[token, slot, None] * expert(x[token]))
        return out


def build(impl: str, e: int, k: int, device, dtype):
    if impl == "ours":
        router = get_router_class("smoe")(D, e, k)
        experts = Experts(e, D, H, D, gated=True, activation=nn.SiLU())
        return MoELayer(router, experts).to(device=device, dtype=dtype)
    if impl.startswith("hf_"):
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=D, intermediate_size=H, num_local_experts=e, num_experts_per_tok=k,
                            num_attention_heads=8, num_key_value_heads=8)
        cfg._experts_implementation = {"hf_eager": "eager", "hf_grouped": "grouped_mm"}[impl]
        block = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, D**-0.5)
        return block.to(device=device, dtype=dtype)
    if impl == "libmoe_loop":
        return LibMoEStyleLoop(D, H, e, k).to(device=device, dtype=dtype)
    if impl == "dense":
        return GatedMLP(D, H).to(device=device, dtype=dtype)
    raise ValueError(impl)


def keep_freed_memory() -> None:
    """Make glibc serve every allocation from its heap and keep up to 2 GiB of freed memory
    instead of giving it back to the OS, so each step reuses the pages of the last one instead
    of faulting in fresh ones."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None) if libc_name else None
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    if mallopt is None or not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("--keep-freed-memory needs glibc's mallopt (Linux); run without it")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once_ms(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000


def interleaved_samples(steps: dict, device, repeats: int) -> dict:
    """ms of every step in every round, timed round-robin (one warm-up each, then ``repeats``
    rounds, the order rotated every round) so that drift in the machine's speed, which on a shared
    VM is larger than the differences measured, hits every implementation alike. Sample r of two
    steps ran in the same round, close in time: their ratio is a paired measurement."""
    names = list(steps)
    for name in names:
        steps[name]()
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_once_ms(steps[name], device))
    return samples


def median_ci(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): a distribution-free confidence interval of the median, the
    order statistics x(j) and x(n+1-j) with the largest j whose coverage 1 - 2 P(Binomial(n, 1/2) < j)
    is >= ``confidence``; with too few values for that, the whole range (j = 1) and its coverage."""
    x = sorted(values)
    n = len(x)

    def coverage(j: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return statistics.median(x), x[j - 1], x[n - j], coverage(j)


def paired_ratio(samples: dict, numerator, denominator) -> tuple[float, float, float, float]:
    """median_ci of the per-round ratios numerator / denominator (fwd+bwd, same round)."""
    return median_ci([a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)])


def layer_steps(impl, e, k, tokens, device, dtype):
    """(forward, forward+backward) callables of one implementation on its input."""
    torch.manual_seed(0)
    module = build(impl, e, k, device, dtype)
    rows = tokens * k if impl == "dense" else tokens
    x = torch.randn(1, rows, D, device=device, dtype=dtype)
    probe = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwdbwd():
        for p in module.parameters():
            p.grad = None
        xin = x.detach().requires_grad_(True)
        (module(xin) * probe).sum().backward()

    return fwd, fwdbwd


def expert_floor_step(e: int, k: int, tokens: int, device, dtype):
    """fwd+bwd of the E experts alone (our stacked ``Experts``) on tokens*k rows already sorted
    and split evenly: no router, no sort, no gathers, no combine. What any implementation that
    keeps E separate expert weights pays for the GEMMs themselves; ours / this = dispatch cost."""
    torch.manual_seed(0)
    experts = Experts(e, D, H, D, gated=True, activation=nn.SiLU()).to(device=device, dtype=dtype)
    rows = tokens * k
    counts = torch.full((e,), rows // e, dtype=torch.long)
    counts[: rows % e] += 1
    counts = counts.to(device)
    x = torch.randn(rows, D, device=device, dtype=dtype)
    probe = torch.randn(rows, D, device=device, dtype=dtype)

    def fwdbwd():
        for p in experts.parameters():
            p.grad = None
        xin = x.detach().requires_grad_(True)
        (experts(xin, counts) * probe).sum().backward()

    return fwdbwd


def weight_traffic_step(e: int):
    """Read E gated experts' weights twice and write a fresh gradient of them (fp32, CPU)."""
    weights = torch.randn(e, D, 3 * H)  # w_in [D, 2H] and w_out [H, D] of every expert, as one block

    def touch():
        weights.sum()
        weights.sum()
        torch.empty_like(weights).fill_(1.0)

    return touch


def measure_row(impls, e, k, tokens, device, dtype, repeats) -> tuple[dict, float, float, dict]:
    """({impl: (fwd_ms, fwdbwd_ms)}, floor_ms, traffic_ms, samples) of one (E, k, tokens) row,
    interleaved; medians of the rounds, ``samples`` the rounds themselves (see interleaved_samples)."""
    steps = {}
    for impl in impls:
        steps[impl, "fwd"], steps[impl, "fwdbwd"] = layer_steps(impl, e, k, tokens, device, dtype)
    steps["floor"] = expert_floor_step(e, k, tokens, device, dtype)
    if device.type == "cpu":
        steps["traffic"] = weight_traffic_step(e)
    samples = interleaved_samples(steps, device, repeats)
    ms = {name: statistics.median(v) for name, v in samples.items()}
    results = {impl: (ms[impl, "fwd"], ms[impl, "fwdbwd"]) for impl in impls}
    return results, ms["floor"], ms.get("traffic", float("nan")), samples


def paired_columns(impl: str, results: dict, samples: dict) -> dict:
    """Paired per-round fwd+bwd ratios of ``impl`` (median and its confidence interval): against
    dense, and for ours against the transformers implementation with the lowest median."""
    columns = {}
    if "dense" in results and impl != "dense":
        median, low, high, cover = paired_ratio(samples, (impl, "fwdbwd"), ("dense", "fwdbwd"))
        columns.update(paired_vs_dense=round(median, 3), paired_vs_dense_ci=[round(low, 3), round(high, 3)],
                       ci_coverage=round(cover, 3))
    hf = [name for name in results if name.startswith("hf_")]
    if impl == "ours" and hf:
        fastest = min(hf, key=lambda name: results[name][1])
        median, low, high, cover = paired_ratio(samples, ("ours", "fwdbwd"), (fastest, "fwdbwd"))
        columns.update(fastest_hf=fastest, paired_vs_fastest_hf=round(median, 3),
                       paired_vs_fastest_hf_ci=[round(low, 3), round(high, 3)], ci_coverage=round(cover, 3))
    return columns


def json_ready(value):
    """``value`` with every NaN float (a ratio without its dense row, the CPU-only traffic column on
    CUDA) replaced by None: standard JSON has no NaN, and strict parsers refuse it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    return value


def target_summary(rows: list[dict], dense_limit: float = 1.2, at_tokens: int = 4096) -> list[str]:
    """The issue's two targets over the ``ours`` rows, by paired median and by confidence interval:
    fwd+bwd <= ``dense_limit`` x dense at ``at_tokens`` tokens, and <= the fastest transformers one."""

    def names(rs):
        return ", ".join(f"T={r['tokens']} E={r['E']} k={r['k']}" for r in rs) or "none"

    lines = []
    for (device, dtype), group in _groups([r for r in rows if r["impl"] == "ours"]).items():
        head = f"{device} {dtype}:"
        dense = [r for r in group if r["tokens"] == at_tokens and "paired_vs_dense" in r]
        if dense:
            within = [r for r in dense if r["paired_vs_dense"] <= dense_limit]
            above = [r for r in dense if r["paired_vs_dense_ci"][0] > dense_limit]
            lines.append(f"{head} ours fwd+bwd <= {dense_limit}x dense at {at_tokens} tokens: {len(within)}/{len(dense)} "
                         f"rows (paired median); confidence interval above {dense_limit}: {names(above)}")
        vs_hf = [r for r in group if "paired_vs_fastest_hf" in r]
        if vs_hf:
            within = [r for r in vs_hf if r["paired_vs_fastest_hf"] <= 1]
            slower = [r for r in vs_hf if r["paired_vs_fastest_hf_ci"][0] > 1]
            faster = [r for r in vs_hf if r["paired_vs_fastest_hf_ci"][1] < 1]
            ratios = sorted(r["paired_vs_fastest_hf"] for r in vs_hf)
            lines.append(f"{head} ours fwd+bwd <= fastest transformers: {len(within)}/{len(vs_hf)} rows (paired median; "
                         f"median over rows {statistics.median(ratios):.3f}, worst {ratios[-1]:.3f}); confidence "
                         f"interval below 1 (faster) on {len(faster)}, above 1 (slower) on {len(slower)}: {names(slower)}")
    coverages = sorted({r["ci_coverage"] for r in rows if "ci_coverage" in r})
    if coverages:
        lines.append(f"confidence intervals: distribution-free, of the median of per-round ratios; coverage "
                     f"{', '.join(f'{c:.3f}' for c in coverages)} (0.95 needs >= 6 repeats)")
    return lines


def _paired_text(row: dict) -> str:
    """' paired x1.02 [0.98, 1.06] vs hf_grouped' for a row that has it, else ''."""
    if "paired_vs_fastest_hf" not in row:
        return ""
    low, high = row["paired_vs_fastest_hf_ci"]
    return f"   paired x{row['paired_vs_fastest_hf']:.3f} [{low:.3f}, {high:.3f}] vs {row['fastest_hf']}"


def _groups(rows: list[dict]) -> dict:
    groups = {}
    for r in rows:
        groups.setdefault((r["device"], r["dtype"]), []).append(r)
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--quick", action="store_true", help="E in {4, 64}, k in {1, 4}, 1024 tokens only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="ours,hf_eager,hf_grouped,libmoe_loop,dense")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 1024,4096)")
    parser.add_argument("--experts", default=None, help="comma-separated expert counts (default 4,8,16,64)")
    parser.add_argument("--k", default=None, help="comma-separated top-k values (default 1,2,4)")
    parser.add_argument("--out", default=None, help="also write the JSON rows to this file")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: reuse freed memory instead of fresh mmap'd pages (no page-fault cost)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1 (timed rounds after the warm-up), got {args.repeats}")
    if args.keep_freed_memory:
        keep_freed_memory()
    malloc_mode = "keep_freed" if args.keep_freed_memory else "default"

    experts_grid, k_grid = ([4, 64], [1, 4]) if args.quick else ([4, 8, 16, 64], [1, 2, 4])
    if args.experts:
        experts_grid = [int(e) for e in args.experts.split(",")]
    if args.k:
        k_grid = [int(k) for k in args.k.split(",")]
    token_grid = [int(t) for t in args.tokens.split(",")] if args.tokens else ([1024] if args.quick else [1024, 4096])
    impls = args.impls.split(",")
    setups = [(torch.device("cpu"), torch.float32)]
    if torch.cuda.is_available():
        setups.append((torch.device("cuda"), torch.bfloat16))

    rows = []
    for device, dtype in setups:
        for tokens in token_grid:
            for e in experts_grid:
                for k in k_grid:
                    if k > e:
                        continue
                    results, floor, traffic, samples = measure_row(impls, e, k, tokens, device, dtype, args.repeats)
                    dense_fb = results["dense"][1] if "dense" in results else float("nan")
                    for impl, (fwd, fb) in results.items():
                        row = dict(impl=impl, device=device.type, dtype=str(dtype).removeprefix("torch."), E=e, k=k,
                                   tokens=tokens, fwd_ms=round(fwd, 2), fwdbwd_ms=round(fb, 2),
                                   ratio_vs_dense=round(fb / dense_fb, 3), weight_traffic_ms=round(traffic, 2),
                                   traffic_ratio=round((dense_fb + traffic) / dense_fb, 3),
                                   floor_fwdbwd_ms=round(floor, 2), floor_ratio=round(floor / dense_fb, 3),
                                   malloc=malloc_mode, **paired_columns(impl, results, samples))
                        rows.append(row)
                        if not args.json:
                            print(f"{row['device']:>4} {row['dtype']:>8} T={tokens:<5} E={e:<3} k={k}  {impl:<12}"
                                  f" fwd {fwd:8.1f} ms   fwd+bwd {fb:8.1f} ms   x{row['ratio_vs_dense']:.2f} dense"
                                  + _paired_text(row), flush=True)
                    if not args.json:
                        print(f"{'':>14} T={tokens:<5} E={e:<3} k={k}  {'experts only':<12} {'':>16} fwd+bwd "
                              f"{floor:8.1f} ms   x{floor / dense_fb:.2f} dense (the GEMM floor)", flush=True)
    if args.json:
        json.dump(json_ready(rows), sys.stdout, indent=1, allow_nan=False)
        print()
    for line in target_summary(rows):  # stderr under --json, so stdout stays one JSON document
        print(line, file=sys.stderr if args.json else sys.stdout)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(json_ready(rows), f, indent=1, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
