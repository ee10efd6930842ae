"""The throughput scripts run on small sizes and report what they measure (no timing asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


def test_analysis_throughput_times_the_analysis_and_its_own_peak_memory(tmp_path):
    proc = _run("analysis_throughput.py", "--rows", "20000", "--layers", "1", "--tokens-per-doc", "64",
                "--files", "1", "--tmp", str(tmp_path), "--compare")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = int(re.search(r"trace: ([\d,]+) rows", out).group(1).replace(",", ""))
    assert rows == 20_160  # 105 docs x 3 placements x 1 layer x 64 tokens
    rate = float(re.search(r"the analysis alone [\d.]+ s = ([\d.]+) M rows/s", out).group(1))
    assert rate > 0  # timed inside the child: a noisy start-up subtraction could make it negative
    peak, above = map(int, re.search(r"peak RSS of the analysis process: (\d+) MiB \((-?\d+) MiB above", out).groups())
    assert above >= 0 and peak < 4096  # the child's own VmHWM, not this test process's peak
    assert "two checkpoints" in out and list(tmp_path.iterdir()) == []  # the trace is deleted


@pytest.mark.parametrize("args,message", [(["--steps", "5"], "--steps must be > 5"),
                                          (["--procs", "3"], "dividing 32, got '3'")])
def test_train_throughput_refuses_arguments_it_cannot_measure(args, message):
    proc = _run("train_throughput.py", *args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
