"""The MoE-layer benchmark script runs and writes the JSON rows the issue asks for (no timing asserted)."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("malloc_flag, malloc_mode", [([], "default"), (["--keep-freed-memory"], "keep_freed")])
def test_moe_layer_benchmark_writes_its_json_rows(tmp_path, malloc_flag, malloc_mode):
    if malloc_flag and not sys.platform.startswith("linux"):
        pytest.skip("--keep-freed-memory uses glibc's mallopt")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--json", "--repeats", "1", "--tokens", "32",
           "--experts", "4", "--k", "1,2", "--out", str(out), *malloc_flag]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert json.loads(proc.stdout) == rows
    impls = {"ours", "hf_eager", "hf_grouped", "libmoe_loop", "dense"}
    assert {(r["impl"], r["k"]) for r in rows} == {(i, k) for i in impls for k in (1, 2)}
    for r in rows:
        assert {"impl", "E", "k", "tokens", "fwd_ms", "fwdbwd_ms", "ratio_vs_dense", "floor_fwdbwd_ms"} <= r.keys()
        assert r["E"] == 4 and r["tokens"] == 32 and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["malloc"] == malloc_mode
        dense = next(d for d in rows if d["impl"] == "dense" and d["k"] == r["k"])
        assert math.isclose(r["ratio_vs_dense"], r["fwdbwd_ms"] / dense["fwdbwd_ms"], rel_tol=0.02, abs_tol=2e-3)
        if r["impl"] != "dense":  # one round: the paired ratio is that round's, its interval that one value
            low, high = r["paired_vs_dense_ci"]
            assert low == r["paired_vs_dense"] == high and r["ci_coverage"] == 0
    for ours in (r for r in rows if r["impl"] == "ours"):
        hf = {r["impl"]: r["fwdbwd_ms"] for r in rows if r["impl"].startswith("hf_") and r["k"] == ours["k"]}
        assert ours["fastest_hf"] == min(hf, key=hf.get)
        assert math.isclose(ours["paired_vs_fastest_hf"], ours["fwdbwd_ms"] / hf[ours["fastest_hf"]], rel_tol=0.02)
    assert "ours fwd+bwd <= fastest transformers: " in proc.stderr  # the target summary, off stdout's JSON


def _benchmark_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import moe_layer
    finally:
        sys.path.pop(0)
    return moe_layer


@pytest.mark.parametrize("n, ranks, coverage", [
    (9, (2, 8), 1 - 2 * (1 + 9) / 2**9),  # 0.961; x(3), x(7) would cover only 0.820
    (20, (6, 15), 1 - 2 * sum(math.comb(20, i) for i in range(6)) / 2**20),  # the textbook n=20 interval, 0.959
    (5, (1, 5), 1 - 2 / 2**5),  # too few for 0.95: the range, 0.9375
    (1, (1, 1), 0.0),
])
def test_median_confidence_interval_is_the_order_statistic_interval(n, ranks, coverage):
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose; x(j) == j
    median, low, high, cover = _benchmark_module().median_ci(values)
    assert median == (n + 1) / 2
    assert (low, high) == ranks
    assert cover == pytest.approx(coverage)


def test_paired_ratio_cancels_drift_shared_by_a_round():
    bench = _benchmark_module()
    # the machine slows down 3x over the run; in every round ours takes 0.9x of hf's time
    hf = [10.0, 14.0, 20.0, 25.0, 30.0, 30.0]
    samples = {"ours": [0.9 * t for t in hf], "hf": hf}
    median, low, high, _ = bench.paired_ratio(samples, "ours", "hf")
    assert median == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(0.9)
    assert statistics.median(samples["ours"]) / statistics.median(hf) == pytest.approx(0.9)
    samples["ours"] = [9.0, 12.6, 18.0, 40.0, 27.0, 27.0]  # one slow round (round 4): the median ignores it
    median, low, high, _ = bench.paired_ratio(samples, "ours", "hf")
    assert median == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(1.6)


def test_target_summary_counts_rows_and_names_the_ones_beyond_the_noise():
    bench = _benchmark_module()

    def ours(tokens, e, k, vs_dense, dense_ci, vs_hf, hf_ci):
        return dict(impl="ours", device="cpu", dtype="float32", tokens=tokens, E=e, k=k, paired_vs_dense=vs_dense,
                    paired_vs_dense_ci=dense_ci, paired_vs_fastest_hf=vs_hf, paired_vs_fastest_hf_ci=hf_ci,
                    fastest_hf="hf_grouped", ci_coverage=0.961)

    rows = [ours(4096, 4, 1, 1.10, [1.05, 1.15], 0.95, [0.90, 0.99]),  # within both, faster beyond noise
            ours(4096, 64, 1, 1.33, [1.25, 1.40], 0.83, [0.80, 0.86]),  # above 1.2x dense beyond noise
            ours(4096, 8, 2, 1.19, [1.10, 1.30], 1.02, [0.97, 1.06]),  # slower than hf by a tie
            ours(1024, 16, 1, 2.0, [1.9, 2.1], 1.05, [1.01, 1.09]),  # slower beyond noise; not a 4096 row
            dict(impl="dense", device="cpu", dtype="float32", tokens=4096, E=4, k=1)]
    dense_line, hf_line, coverage_line = bench.target_summary(rows)
    assert "1.2x dense at 4096 tokens: 2/3 rows" in dense_line
    assert dense_line.endswith("confidence interval above 1.2: T=4096 E=64 k=1")
    assert "fastest transformers: 2/4 rows" in hf_line and "worst 1.050" in hf_line
    assert hf_line.endswith("below 1 (faster) on 2, above 1 (slower) on 1: T=1024 E=16 k=1")
    assert "coverage 0.961" in coverage_line


_FAULT_PROBE = """
import resource, sys
sys.path.insert(0, "benchmarks")
import torch
if sys.argv[1] == "keep":
    from moe_layer import keep_freed_memory
    keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(16):
    torch.ones(16 << 20)  # 64 MiB, above glibc's mmap threshold; freed at once
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _huge_pages_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages make fresh allocations fault rarely")
def test_keep_freed_memory_reuses_pages_instead_of_faulting_in_fresh_ones():
    def minor_faults(mode: str) -> int:
        proc = subprocess.run([sys.executable, "-c", _FAULT_PROBE, mode], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, check=True)
        return int(proc.stdout.split()[-1])

    import resource  # POSIX only

    pages = (64 << 20) // resource.getpagesize()  # one 64 MiB allocation
    default, keep = minor_faults("default"), minor_faults("keep")
    assert default >= 12 * pages, (default, keep)  # every one of the 16 allocations faults its pages in afresh
    # only while the heap grows (measured: 2-4 allocations' worth); later ones reuse its pages
    assert keep <= default / 3, (default, keep)


def test_benchmark_refuses_zero_repeats_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _benchmark_module().main(["--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_has_null_not_nan_for_ratios_without_their_dense_row(tmp_path):
    bench = _benchmark_module()
    assert bench.json_ready({"a": float("nan"), "b": [1.5, float("nan")], "c": "x"}) == {"a": None, "b": [1.5, None], "c": "x"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--json", "--repeats", "1", "--tokens", "32",
           "--experts", "4", "--k", "1", "--impls", "ours,hf_grouped"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = _strict_json(proc.stdout)
    assert {r["impl"] for r in rows} == {"ours", "hf_grouped"}
    assert all(r["ratio_vs_dense"] is None and r["floor_ratio"] is None for r in rows)


def test_the_two_transformers_rows_take_their_own_experts_path(monkeypatch):
    """hf_grouped goes through transformers' grouped_mm experts function; hf_eager never does."""
    import torch
    from transformers.integrations import moe as hf_moe

    bench = _benchmark_module()
    calls = []
    grouped = hf_moe.ExpertsInterface._global_mapping["grouped_mm"]

    def counting(*args, **kwargs):
        calls.append(1)
        return grouped(*args, **kwargs)

    monkeypatch.setitem(hf_moe.ExpertsInterface._global_mapping, "grouped_mm", counting)
    x = torch.randn(1, 8, bench.D)
    bench.build("hf_eager", 4, 2, torch.device("cpu"), torch.float32)(x)
    assert calls == []
    bench.build("hf_grouped", 4, 2, torch.device("cpu"), torch.float32)(x)
    assert calls == [1]
