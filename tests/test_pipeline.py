"""The notebook pipeline: planning, resumability, failure reporting, parameter validation,
and (slow) the whole pipeline on the tiny preset through papermill."""

import json
import subprocess
import sys

import nbformat
import pytest

from libmoe_core.pipeline.evaluate import accuracy_by_type, easyvqa_baselines
from libmoe_core.pipeline.runner import execute, plan_pipeline
from libmoe_core.pipeline.stage import stage_config
from libmoe_core.train.stage_folder import write_run_info


def test_plan_has_one_sft_and_eval_per_router(tmp_path):
    plan = plan_pipeline(routers=["smoe", "smoe_sigmoidgating"], runs_root=tmp_path, run_name="r")
    names = [s.name for s in plan.steps]
    assert names == ["pretrain", "pft", "sft-smoe", "eval-smoe", "sft-sigmoid", "eval-sigmoid", "analysis",
                     "analysis-smoe", "analysis-sigmoid"]
    sft = plan.steps[4]
    assert sft.parameters["router"] == "sigmoid" and sft.output == tmp_path / "r" / "sft-sigmoid" / "sft.ipynb"
    assert sft.done_marker == tmp_path / "r" / "sft-sigmoid" / "final" / "config.json"
    assert plan.steps[6].parameters["traces"] == [str(tmp_path / "r" / f"eval-{r}" / "traces") for r in ("smoe", "sigmoid")]
    # the comparison step is done for the parameters it ran with: another set of routers runs it again
    comparison = plan.steps[6]
    comparison.done_marker.parent.mkdir(parents=True)
    comparison.done_marker.write_text("done")
    assert not comparison.done() and comparison.changed() == ["(no record of the parameters it ran with)"]
    comparison.parameters_record.write_text(json.dumps(comparison.parameters))
    assert comparison.done()
    for routers in (["smoe", "sigmoid", "cosine"], ["smoe"]):
        other = next(s for s in plan_pipeline(routers=routers, runs_root=tmp_path, run_name="r").steps
                     if s.name == "analysis")
        assert other.done_marker == comparison.done_marker and other.changed() == ["labels", "traces"]
    with pytest.raises(ValueError, match=r"router\(s\) \['smoe'\] given more than once"):
        plan_pipeline(routers=["smoe", "sigmoid", "smoe"], runs_root=tmp_path)
    with pytest.raises(ValueError, match=r"eval.ipynb: the pipeline sets \['run_name'\] itself"):  # not run, checked
        plan_pipeline(stages=["pretrain"], runs_root=tmp_path, stage_parameters={"eval": {"run_name": "x"}})
    only = plan_pipeline(stages=["pretrain"], runs_root=tmp_path, stage_parameters={"eval": {"limit": 5}})
    assert [s.name for s in only.steps] == ["pretrain"]
    assert only.notes == ["--set for eval: checked, not used (--stages pretrain)"]
    with pytest.raises(ValueError, match=r"unknown pretrain notebook parameter\(s\) \['router'\]"):
        plan_pipeline(stages=["pretrain"], runs_root=tmp_path, stage_parameters={"pretrain": {"router": "sigmoid"}})
    with pytest.raises(ValueError, match=r"parameter\(s\) \['num_experts'\] are for the sft stage"):
        stage_config("pft", num_experts=8)  # papermill -p num_experts 8 on the pft notebook
    with pytest.raises(ValueError, match="max_steps must be -1"):  # a bad sft value, before pretrain trains
        plan_pipeline(runs_root=tmp_path, stage_parameters={"sft": {"max_steps": 0}})
    for bad, needle in (({"limit": 0}, "eval-smoe: limit must be None or > 0"),  # lmms-eval failed after loading
                        ({"limit": -3}, "got -3"), ({"batch_size": 0}, "eval-smoe: batch_size must be a positive")):
        with pytest.raises(ValueError, match=needle):
            plan_pipeline(routers=["smoe"], runs_root=tmp_path, stage_parameters={"eval": bad})
    with pytest.raises(ValueError, match=r"router 'shared' \(num_experts=4, top_k=1\)"):  # failed in sft's launch
        plan_pipeline(routers=["shared"], runs_root=tmp_path, stage_parameters={"sft": {"top_k": 1}})
    with pytest.raises(ValueError, match="unknown stage"):
        plan_pipeline(stages=["pretrain", "distill"], runs_root=tmp_path)
    with pytest.raises(ValueError, match="unknown router"):
        plan_pipeline(routers=["nope"], runs_root=tmp_path)


def _notebook(path, code):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_skips_completed_steps_and_stops_at_the_first_failure(tmp_path):
    nbdir = tmp_path / "nb"
    # a multi-line message as a failed training run's (headline first, then the launcher's output)
    _notebook(nbdir / "analysis" / "router_entropy.ipynb",
              "raise RuntimeError('boom in the notebook\\n--- last lines ---\\nlauncher: exits with return code = 1')")
    _notebook(nbdir / "analysis" / "expert_collapse.ipynb", "pass")
    plan = plan_pipeline(stages=["pretrain", "analysis"], runs_root=tmp_path / "runs", notebook_dir=nbdir)
    plan.steps[0].done_marker.parent.mkdir(parents=True)
    plan.steps[0].done_marker.write_text("{}")  # pretrain already done, with this config
    write_run_info(plan.steps[0].done_marker.parent, plan.steps[0].config, 1)
    lines = []
    assert execute(plan, log=lines.append) == 1
    text = "\n".join(lines)
    assert "pretrain: already complete, skipped" in text
    assert "analysis FAILED: PapermillExecutionError: RuntimeError: boom in the notebook\n" in text + "\n", text
    assert str(plan.steps[1].output) in text
    executed = nbformat.read(plan.steps[1].output, as_version=4)
    assert "boom in the notebook" in json.dumps(executed.cells[-1].outputs)
    assert not plan.steps[2].output.exists(), "a step after the failure ran"
    # fixed notebook: the failed step runs again, later steps follow, a rerun skips everything
    _notebook(nbdir / "analysis" / "router_entropy.ipynb", "pass")
    assert execute(plan, log=lines.append) == 0
    assert all(s.done() for s in plan.steps)
    lines.clear()
    assert execute(plan, log=lines.append) == 0 and all("skipped" in line for line in lines)


def test_a_cell_past_the_timeout_fails_the_step_or_runs_it_again(tmp_path):
    nbdir, flag = tmp_path / "nb", tmp_path / "first-attempt-done"
    # the first attempt hangs (as papermill does when a kernel message is lost), the second finishes
    _notebook(nbdir / "analysis" / "router_entropy.ipynb",
              f"import os, time\nfirst = not os.path.exists({str(flag)!r})\nopen({str(flag)!r}, 'w').close()\n"
              "time.sleep(60 if first else 0)")
    _notebook(nbdir / "analysis" / "expert_collapse.ipynb", "pass")
    plan = plan_pipeline(stages=["analysis"], runs_root=tmp_path / "runs", notebook_dir=nbdir)
    lines = []
    assert execute(plan, log=lines.append, cell_timeout=5) == 1
    assert "analysis FAILED: a cell ran past --cell-timeout 5 s\n" in "\n".join(lines) + "\n"  # was: '---------'
    flag.unlink()
    lines.clear()
    assert execute(plan, log=lines.append, cell_timeout=5, timeout_retries=1) == 0
    assert any("a cell ran past 5 s; running the step again (1 of 1)" in line for line in lines), lines
    assert all(s.done() for s in plan.steps)
    for bad, needle in (({"cell_timeout": 0}, "cell_timeout must be > 0"), ({"timeout_retries": -1}, "timeout_retries must be >= 0")):
        with pytest.raises(ValueError, match=needle):
            execute(plan, **bad)


@pytest.mark.parametrize("params,needle", [
    ({"router": "nope"}, "unknown router 'nope'"),
    ({"zero_stage": 4}, "zero_stage"),
    ({"top_k": "two"}, "'top_k' must be int"),
    ({"learning_rte": 1.0}, "unknown notebook parameter"),
    ({"run_name": "a/b"}, "run_name"),
])
def test_notebook_parameters_are_validated_by_name(params, needle):
    with pytest.raises(ValueError, match=needle):
        stage_config("sft", **params)


def test_accuracy_and_baselines():
    scores = [(0, "colour", 1.0), (1, "colour", 0.0), (2, "shape", 1.0), (3, "yesno", 1.0)]
    table = accuracy_by_type(scores)
    assert table["overall"]["accuracy"] == 0.75 and table["overall"]["n"] == 4
    assert table["overall"]["stderr"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert table["colour"]["accuracy"] == 0.5
    base = easyvqa_baselines(list(range(1000)))
    # the question-only baseline never looks at the image, yet beats the majority answer
    assert 0.3 < base["majority answer"]["overall"]["accuracy"] < 0.45
    assert base["question only"]["overall"]["accuracy"] > base["majority answer"]["overall"]["accuracy"] + 0.2
    assert base["question only"]["overall"]["n"] == 1000


@pytest.mark.slow
def test_whole_pipeline_on_the_tiny_preset(tmp_path):
    """pretrain + pft by the pipeline, one sft by exactly the design card's papermill command,
    then the pipeline again: it reuses all three, trains the other router, evaluates both and
    runs the analysis notebooks. Timeouts are generous: CI machines can be many times slower."""
    small = ["pretrain.max_steps=2", "pft.max_steps=2", "sft.max_steps=2", "eval.limit=8",
             "pretrain.per_device_batch_size=4", "pretrain.global_batch_size=4", "pft.per_device_batch_size=4",
             "pft.global_batch_size=4", "sft.per_device_batch_size=4", "sft.global_batch_size=4"]
    cmd = [sys.executable, "-m", "libmoe_core.cli", "pipeline", "--router", "smoe", "--router", "sigmoid",
           "--run-name", "t", "--runs-root", str(tmp_path), "--cell-timeout", "600", "--timeout-retries", "1",
           ] + [a for s in small for a in ("--set", s)]  # a lost kernel message is retried, not waited on
    proc = subprocess.run(cmd + ["--stages", "pretrain,pft"], capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = tmp_path / "t"
    assert not (run / "sft-smoe").exists(), "--stages pretrain,pft ran more than those stages"

    # exactly the design card's command (sized for this CPU), against the same run folder
    out = tmp_path / "out.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", "notebooks/sft.ipynb", str(out), "-p", "router", "sigmoid",
                           "-p", "preset", "tiny", "-p", "max_steps", "2", "-p", "run_name", "t",
                           "-p", "runs_root", str(tmp_path), "-p", "per_device_batch_size", "4",
                           "-p", "global_batch_size", "4"], capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "sft-sigmoid" / "final" / "config.json").is_file() and out.is_file()

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("already complete, skipped") == 3  # pretrain, pft, sft-sigmoid
    for folder in ("pretrain", "pft", "sft-smoe", "sft-sigmoid"):
        assert (run / folder / "final" / "config.json").is_file()
        assert (run / folder / "losses.png").is_file()
    for folder in ("pretrain", "pft", "sft-smoe"):
        executed = json.loads((run / folder / (folder.split("-")[0] + ".ipynb")).read_text())
        shown = [o for cell in executed["cells"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        assert shown, f"the {folder} notebook shows no loss plot"  # matplotlib.use("Agg") hid it
    for router in ("smoe", "sigmoid"):
        summary = json.loads((run / f"eval-{router}" / "eval_summary.json").read_text())
        assert summary["easyvqa"]["overall"]["n"] == 8
    assert list((run / "analysis").rglob("*.png"))
    assert "router smoe" in proc.stdout and "router sigmoid" in proc.stdout
    assert "question only" in proc.stdout and "majority answer" in proc.stdout
    # resumable: a third call skips every step
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert again.returncode == 0 and again.stdout.count("already complete, skipped") == 9


def test_notebook_values_papermill_leaves_as_strings_are_refused_or_parsed(tmp_path, monkeypatch):
    """papermill -p keeps "false" a string (which is true), and a one-item list a string: resume ran
    as a resume, record_experts recorded, placements "vision" became ['v', 'i', ...]."""
    from libmoe_core.pipeline import evaluate

    with pytest.raises(ValueError, match="parameter 'resume' must be True or False, got 'false'"):
        stage_config("pretrain", resume="false", runs_root=str(tmp_path))
    with pytest.raises(ValueError, match="parameter 'run_name' must be a folder name, got ''"):
        stage_config("pretrain", run_name="", runs_root=str(tmp_path))  # trained into runs/default
    with pytest.raises(ValueError, match="sft needs at least one MoE placement"):  # failed after the launch
        stage_config("sft", moe_vision=False, runs_root=str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr("libmoe_core.evaluation.runner.run_evaluation", lambda cfg, **kw: seen.append(cfg) or 1 / 0)
    with pytest.raises(ValueError, match="record_experts must be True or False, got 'false'"):
        evaluate.run_eval_stage(model, tmp_path / "out", record_experts="false")
    with pytest.raises(ZeroDivisionError):
        evaluate.run_eval_stage(model, tmp_path / "out", placements="vision,llm", layers=1)
    assert seen[-1].placements == ("vision", "llm") and seen[-1].layers == [1]
    with pytest.raises(ValueError, match=r"placements / layers: unknown placement\(s\) \['decoder'\]"):
        evaluate.run_eval_stage(model, tmp_path / "out", placements="decoder")
    # a LibMoE alias names the folders the sft stage trained into (sft-sigmoid), as the pipeline does
    assert evaluate.sft_model_dir(tmp_path, "smoe_sigmoidgating") == tmp_path / "sft-sigmoid" / "final"
    assert evaluate.eval_dir(tmp_path, "smoe_sigmoidgating") == tmp_path / "eval-sigmoid"
