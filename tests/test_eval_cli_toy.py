"""End to end through the real lmms-eval CLI: ``libmoe eval --model libmoe_toy --tasks easyvqa``.

``libmoe_toy`` answers by a fixed rule, so the expected accuracy on the first documents
is known exactly. Each run starts lmms-eval in a subprocess (~10-20 s on a small CPU).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from libmoe_core.evaluation.local_tasks import easyvqa_records
from libmoe_core.evaluation.tasks.easyvqa.utils import easyvqa_doc_to_text, normalize_answer
from libmoe_core.evaluation.traces import read_traces

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed"),
]

POST_PROMPT = ""  # the easyvqa task's prompt is the question alone


def _libmoe_eval(tmp_path, *argv):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    return subprocess.run([sys.executable, "-m", "libmoe_core.cli", "eval", *argv], capture_output=True, text=True,
                          env=env, timeout=1200, check=False)


def test_toy_model_on_easyvqa_writes_results_and_traces(tmp_path):
    from libmoe_core.evaluation.toy_model import toy_answer

    out = tmp_path / "run"
    proc = _libmoe_eval(tmp_path, "--model", "libmoe_toy", "--model-path", "toy-ckpt", "--tasks", "easyvqa",
                        "--limit", "8", "--output-path", str(out), "--return-id-experts",
                        "--layers-expert-selection", "0", "2", "--placements", "vision,llm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results_files = list(out.rglob("*_results.json"))
    assert len(results_files) == 1
    results = json.loads(results_files[0].read_text())["results"]["easyvqa"]
    docs = easyvqa_records()[:8]
    hits = [normalize_answer(toy_answer(easyvqa_doc_to_text(d, {"post_prompt": POST_PROMPT}))) == d["answer"]
            for d in docs]
    accuracy = results["exact_match,none"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(sum(hits) / len(hits))
    for qtype in ("colour", "shape", "yesno"):
        typed = [h for h, d in zip(hits, docs) if d["question_type"] == qtype]
        if typed:
            assert results[f"exact_match_{qtype},none"] == pytest.approx(sum(typed) / len(typed))
    # the wrapper printed the table and where things are
    assert "easyvqa  exact_match " in proc.stdout and str(results_files[0]) in proc.stdout

    # routing traces: 8 docs x 2 placements x 2 layers blocks; 4 image tokens + prompt words + 1 generated each
    traces = read_traces(out / "traces").to_pandas()
    assert set(traces["doc_id"]) == set(range(8))
    assert set(traces["placement"]) == {"vision", "llm"} and set(traces["layer"]) == {0, 2}
    assert set(traces["checkpoint"]) == {"toy-ckpt"} and set(traces["task"]) == {"easyvqa"}
    per_doc = [4 + len(easyvqa_doc_to_text(d, {"post_prompt": POST_PROMPT}).split()) + 1 for d in docs]
    assert len(traces) == 4 * sum(per_doc)
    assert traces.groupby("token_kind").size()["image"] == 4 * 4 * 8


def test_failed_lmms_eval_run_is_an_error(tmp_path):
    out = tmp_path / "run"
    proc = _libmoe_eval(tmp_path, "--model", "libmoe_toy", "--model-path", "toy", "--tasks", "no_such_task_xyz",
                        "--output-path", str(out), "--offline")
    assert proc.returncode == 1
    assert "wrote no *_results.json" in proc.stderr
    assert "no_such_task_xyz" in proc.stderr  # the tail of lmms-eval's output names the problem
    assert (out / "lmms_eval.log").exists()
