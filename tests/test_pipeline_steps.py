"""The pipeline's steps: resuming training, outdated steps, parameters that must reach a notebook
(or be refused), paths relative to the caller, and the eval step's choice of sample log.
Papermill is replaced by a recorder where no kernel is needed."""

import json
import os
import time
from pathlib import Path

import nbformat
import papermill
import pytest
from nbclient.exceptions import CellTimeoutError
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from libmoe_core.pipeline.runner import NOTEBOOK_DIR, _notebook_defaults, execute, plan_pipeline
from libmoe_core.pipeline.stage import stage_config
from libmoe_core.train.stage_folder import write_run_info
from runners.pipeline import main as pipeline_main


def _touch(path, text="{}", age_s=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if age_s:
        os.utime(path, (time.time() - age_s,) * 2)
    return path


def _mark_done(step, age_s=0.0):
    """What a finished step leaves: its product, and the config (training) or parameters it ran with."""
    _touch(step.done_marker, age_s=age_s)
    if step.trains:
        write_run_info(step.done_marker.parent, step.config, 1)
    else:
        _touch(step.parameters_record, json.dumps(step.parameters), age_s=age_s)


def _checkpoint(stage_dir, step, complete=True, age_s=0.0):
    folder = stage_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        _touch(folder / "COMPLETE", age_s=age_s)


class Papermill:
    """Stands in for ``papermill.execute_notebook``: records each call, then runs ``action(step name, call)``."""

    def __init__(self, monkeypatch, action=lambda name, call: None):
        self.calls, self.action = [], action
        monkeypatch.setattr(papermill, "execute_notebook", self)

    def __call__(self, notebook, output, parameters, **kwargs):
        call = {"notebook": Path(notebook), "output": Path(output), "parameters": parameters, **kwargs}
        self.calls.append(call)
        self.action(Path(output).parent.name, call)


def _finish_training(name, call):
    """A training notebook's product: the final model and the config it was trained with."""
    final = _touch(call["output"].parent / "final" / "config.json").parent
    params = {**_notebook_defaults(call["notebook"]), **call["parameters"]}
    write_run_info(final, stage_config(call["notebook"].stem, **params), 1)


def test_a_training_step_resumes_from_its_last_complete_checkpoint(tmp_path, monkeypatch):
    # a cell timeout after the first checkpoint: the retry resumes from it
    def hang_once(name, call):
        if len(fake.calls) == 1:
            _checkpoint(call["output"].parent, 2)
            raise CellTimeoutError("a cell ran past 5 s")
        _finish_training(name, call)

    fake = Papermill(monkeypatch, hang_once)
    plan = plan_pipeline(stages=["pretrain"], runs_root=tmp_path, run_name="r")
    assert execute(plan, log=lambda line: None, cell_timeout=5, timeout_retries=1) == 0
    assert [c["parameters"]["resume"] for c in fake.calls] == [False, True]

    # a rerun after a crash: each sft folder decides for itself
    run = tmp_path / "r"
    _touch(run / "pft" / "final" / "config.json", age_s=3600)
    _checkpoint(run / "sft-smoe", 4)  # a complete checkpoint: resumed
    _checkpoint(run / "sft-sigmoid", 4, complete=False)  # nothing complete, no metrics: resumed = started over
    _checkpoint(run / "sft-cosine", 4, age_s=7200)  # older than the pft model it would continue: not resumed
    _touch(run / "sft-hyper" / "metrics.jsonl", '{"step": 1}\n', age_s=7200)  # died before a checkpoint, even
    # before the pft model was made: resuming starts it afresh (launch clears it under the lock)
    plan = plan_pipeline(stages=["sft"], routers=["smoe", "sigmoid", "cosine", "hyper"], runs_root=tmp_path,
                         run_name="r")
    # the stale cosine run would be refused by a fresh launch: the pipeline stops there, naming it
    fake = Papermill(monkeypatch, _finish_training)
    lines = []
    assert execute(plan, log=lines.append) == 1
    assert [(c["output"].parent.name, c["parameters"]["resume"]) for c in fake.calls] == [("sft-smoe", True), ("sft-sigmoid", True)]
    assert any("sft-cosine FAILED" in line and "--clear-outdated" in line for line in lines), lines
    # ... and with --clear-outdated deletes that run and trains afresh
    fake = Papermill(monkeypatch, _finish_training)
    assert execute(plan, log=lambda line: None, clear_outdated=True) == 0
    assert {c["output"].parent.name: c["parameters"]["resume"] for c in fake.calls} == {
        "sft-cosine": False, "sft-hyper": True}
    assert not (run / "sft-cosine" / "checkpoints" / "checkpoint-4").exists()


def test_a_step_made_from_something_newer_runs_again(tmp_path, monkeypatch):
    plan = plan_pipeline(routers=["smoe"], stages=["sft", "eval", "analysis"], runs_root=tmp_path, run_name="r")
    sft, evaluation = plan.steps[:2]
    for step in plan.steps:  # everything was done an hour ago ...
        _mark_done(step, age_s=3600)
    assert all(step.done() for step in plan.steps)
    _touch(sft.done_marker)  # ... then sft was trained again
    assert sft.done() and not evaluation.done() and evaluation.outdated_by() == [sft.done_marker]

    def evaluate(name, call):
        if name == "eval-smoe":
            _touch(evaluation.done_marker)

    fake = Papermill(monkeypatch, evaluate)
    lines = []
    assert execute(plan, log=lines.append) == 0
    assert [c["output"].parent.name for c in fake.calls] == ["eval-smoe", "analysis", "collapse-smoe"]
    assert any("eval-smoe: outdated" in line for line in lines), lines
    assert all(step.done() for step in plan.steps)

    # a model named by a parameter is what the step is made from (relative: to the caller's directory)
    monkeypatch.chdir(tmp_path)
    plan = plan_pipeline(stages=["pft", "eval"], runs_root=tmp_path, run_name="r",
                         stage_parameters={"pft": {"input_model": "models/m"}, "eval": {"model_path": "/abs/model"}})
    assert plan.steps[0].upstream == (tmp_path / "models" / "m" / "config.json",)
    assert plan.steps[1].upstream == (Path("/abs/model/config.json"),)


def _run_until_config(nb, namespace):
    """Run a stage notebook's code cells up to its ``stage_config`` cell, without a kernel or training."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)  # noqa: S102
            if "stage_config(" in cell.source:
                return cell.source


@pytest.mark.parametrize("stage", ["pretrain", "pft", "sft"])
def test_every_name_papermill_injects_reaches_stage_config(stage, tmp_path):
    base = {"run_name": "t", "runs_root": str(tmp_path)}
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / f"{stage}.ipynb")),
                               {**base, "max_step": 2, "warmup_ratio": 0.5})
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['max_step', 'warmup_ratio'\]"):
        _run_until_config(nb, {})
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / f"{stage}.ipynb")), {**base, "max_steps": 2})
    namespace = {}
    config_cell = _run_until_config(nb, namespace)
    assert namespace["cfg"].max_steps == 2 and namespace["cfg"].stage_dir.parent == tmp_path / "t"
    # in Jupyter the later cells' names do not trouble a re-run of the config cell
    namespace.update(final_model=tmp_path / "final", plot_losses=print)
    exec(config_cell, namespace)  # noqa: S102
    assert namespace["cfg"].max_steps == 2


def test_stage_parameters_are_checked_and_reach_their_notebooks(tmp_path, capsys):
    def plan(**stage_parameters):
        return plan_pipeline(routers=["smoe"], runs_root=tmp_path, stage_parameters=stage_parameters)

    stages = "pretrain, pft, sft, eval, analysis"
    for bad, needle in (({"stf": {"max_steps": 2}}, f"no stage 'stf' in the pipeline; its stages: {stages}"),
                        ({"sft-smoe": {"max_steps": 2}}, "no stage 'sft-smoe'"),
                        ({"sft": {"max_step": 2}}, r"unknown sft notebook parameter\(s\) \['max_step'\]"),
                        ({"eval": {"limt": 8}}, r"unknown eval notebook parameter\(s\) \['limt'\]"),
                        ({"analysis": {"min_load": 0.1}}, r"unknown analysis notebook parameter\(s\) \['min_load'\]"),
                        ({"sft": {"resume": True}}, r"sets \['resume'\] itself"),
                        ({"eval": {"router": "sigmoid"}}, r"sets \['router'\] itself")):
        with pytest.raises(ValueError, match=needle):
            plan(**bad)
    steps = {s.name: s.parameters for s in plan(analysis={"max_load_ratio": 1.5, "by": "task", "placement": "vision"},
                                               sft={"seed": 3}).steps}
    assert steps["analysis"]["by"] == "task" and "max_load_ratio" not in steps["analysis"]
    assert steps["analysis-smoe"]["max_load_ratio"] == 1.5 and "by" not in steps["analysis-smoe"]
    assert steps["analysis"]["placement"] == steps["analysis-smoe"]["placement"] == "vision"
    assert steps["sft-smoe"]["seed"] == 3  # a config parameter the sft notebook's cell does not list
    # the command line: an error message and exit status 2, nothing run
    assert pipeline_main(["--runs-root", str(tmp_path), "--set", "stf.max_steps=2"]) == 2
    assert "libmoe pipeline: error: no stage 'stf'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_relative_paths_are_taken_from_the_callers_directory(tmp_path, monkeypatch):
    work, nbdir = tmp_path / "work", tmp_path / "nb"
    _touch(work / "data" / "my.json", "[]")
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("dataset = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os, pathlib\nassert os.path.isfile(dataset), (os.getcwd(), dataset)\n"
        "final = pathlib.Path(runs_root, run_name, 'pretrain', 'final')\nfinal.mkdir(parents=True)\n"
        "(final / 'config.json').write_text('{}')\n"
        "from libmoe_core.pipeline.stage import stage_config\nfrom libmoe_core.train.stage_folder import write_run_info\n"
        "write_run_info(final, stage_config('pretrain', dataset=dataset, preset=preset, run_name=run_name, "
        "runs_root=runs_root), 1)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbdir.mkdir()
    nbformat.write(nb, nbdir / "pretrain.ipynb")
    monkeypatch.chdir(work)
    plan = plan_pipeline(stages=["pretrain"], runs_root="runs", notebook_dir=nbdir,
                         stage_parameters={"pretrain": {"dataset": "data/my.json"}})
    monkeypatch.chdir(tmp_path)  # the plan keeps the directory it was made in
    lines = []
    assert execute(plan, log=lines.append, cell_timeout=120) == 0, lines
    assert (work / "runs" / "default" / "pretrain" / "final" / "config.json").is_file()


def _eval_run(folder, stamp, score):
    """What lmms-eval writes for one run: ``<stamp>_results.json`` and ``<stamp>_samples_easyvqa.jsonl``."""
    _touch(folder / f"{stamp}_samples_easyvqa.jsonl", "".join(
        json.dumps({"doc_id": i, "exact_match_colour": {"question_type": "colour", "score": score}}) + "\n"
        for i in range(4)))
    return _touch(folder / f"{stamp}_results.json", json.dumps({"results": {}}))


def test_the_eval_step_scores_and_labels_the_model_it_evaluated(tmp_path, monkeypatch):
    from libmoe_core.evaluation import runner as eval_runner

    run = tmp_path / "runs" / "demo"
    model = run / "sft-smoe" / "checkpoints" / "checkpoint-500"
    _touch(model / "config.json")
    out = run / "eval-smoe"
    _eval_run(out / "sft-smoe__final", "20261129T100000", 1.0)  # an earlier evaluation of the final model
    seen = {}

    def run_evaluation(cfg, **kwargs):
        seen.update(cfg.extra_model_args)
        results = _eval_run(cfg.output_path / "checkpoints__checkpoint-500", "20261129T120000", 0.0)
        return eval_runner.EvalOutcome(results, [], results.with_suffix(".log"), None, [])

    monkeypatch.setattr(eval_runner, "run_evaluation", run_evaluation)
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / "eval.ipynb")),
                               {"model_path": str(model), "run_name": "demo", "runs_root": str(tmp_path / "runs")})
    namespace = {}
    for cell in [c for c in nb.cells if c.cell_type == "code"][:3]:  # parameters, injected, evaluation
        exec(cell.source, namespace)  # noqa: S102
    assert namespace["summary"]["easyvqa"]["overall"]["accuracy"] == 0.0  # not the earlier evaluation's 1.0
    assert seen["checkpoint"] == "sft-smoe/checkpoint-500"
    assert json.loads((out / "eval_summary.json").read_text())["easyvqa"]["overall"]["n"] == 4


def test_a_stage_notebook_in_a_kernel_refuses_a_misspelt_parameter(tmp_path):
    """The same in an IPython kernel (its own names: In, Out, exit, ...), the notebook cut after its config."""
    nb = nbformat.read(NOTEBOOK_DIR / "sft.ipynb", as_version=4)
    cut = next(i for i, c in enumerate(nb.cells) if "stage_config(" in c.source)
    nb.cells = nb.cells[:cut + 1] + [nbformat.v4.new_code_cell("print('max_steps', cfg.max_steps)")]
    nbformat.write(nb, tmp_path / "sft.ipynb")
    base = {"run_name": "t", "runs_root": str(tmp_path), "max_steps": 2}
    done = papermill.execute_notebook(str(tmp_path / "sft.ipynb"), str(tmp_path / "ok.ipynb"), parameters=base,
                                      progress_bar=False, execution_timeout=120)
    assert "max_steps 2" in json.dumps(done.cells[-1].outputs)
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown notebook parameter\(s\) \['max_step'\]"):
        papermill.execute_notebook(str(tmp_path / "sft.ipynb"), str(tmp_path / "bad.ipynb"),
                                   parameters={**base, "max_step": 2}, progress_bar=False, execution_timeout=120)


def test_run_stage_shows_the_launchers_own_messages(monkeypatch, capsys, tmp_path):
    # "waiting for the previous run" / "already finished" must reach the notebook, not only the
    # failure tail (before: a cell that waited 60 s for a busy folder looked hung)
    from libmoe_core.pipeline import stage
    from libmoe_core.train.config import resolve_config

    def fake_launch(cfg, resume=False, on_line=None):
        on_line("libmoe: waiting for the previous training run on x (pid 1) to stop\n")
        on_line("some deepspeed chatter\n")
        return cfg.final_dir

    monkeypatch.setattr(stage, "launch", fake_launch)
    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path)})
    assert stage.run_stage(cfg, show_progress=False) == cfg.final_dir
    out = capsys.readouterr().out
    assert "waiting for the previous training run" in out and "chatter" not in out


def test_clear_outdated_waits_for_the_stage_lock(tmp_path, monkeypatch):
    # a run still holding the folder's lock is not deleted under it
    from libmoe_core.train import launch as launch_module
    from libmoe_core.train.guard import acquire_stage_lock

    run = tmp_path / "r"
    _touch(run / "pft" / "final" / "config.json")
    _checkpoint(run / "sft-smoe", 4, age_s=7200)
    monkeypatch.setattr(launch_module, "STAGE_LOCK_WAIT_S", 0.3)
    held = acquire_stage_lock(run / "sft-smoe" / launch_module.STAGE_LOCK_NAME, wait_s=0)
    fake = Papermill(monkeypatch, _finish_training)
    lines = []
    try:
        plan = plan_pipeline(stages=["sft"], routers=["smoe"], runs_root=tmp_path, run_name="r")
        assert execute(plan, log=lines.append, clear_outdated=True) == 1
    finally:
        os.close(held)
    assert (run / "sft-smoe" / "checkpoints" / "checkpoint-4" / "COMPLETE").exists() and fake.calls == []
    assert any("sft-smoe FAILED" in line and "in use by another training run" in line for line in lines), lines
    assert execute(plan, log=lines.append, clear_outdated=True) == 0  # free: cleared, then trained
    assert not (run / "sft-smoe" / "checkpoints").exists() and len(fake.calls) == 1


def test_a_finished_step_given_other_parameters_runs_again(tmp_path, monkeypatch):
    from libmoe_core.train.checkpoints import last_complete_checkpoint

    def train(name, call):
        folder = call["output"].parent
        call["log_before"] = (folder / "train.log").is_file()
        _finish_training(name, call)
        params = {**_notebook_defaults(call["notebook"]), **call["parameters"]}
        stage_config(call["notebook"].stem, **params).save(folder / "config.yaml")
        if last_complete_checkpoint(folder / "checkpoints") is None:
            _checkpoint(folder, 4)
        _touch(folder / "train.log", "log")

    fake = Papermill(monkeypatch, train)

    def plan(**params):
        return plan_pipeline(stages=["pft"], runs_root=tmp_path, run_name="r", stage_parameters={"pft": params})

    assert execute(plan(max_steps=4), log=lambda line: None) == 0
    assert plan(max_steps=4).steps[0].done()
    # more steps (a change a resume may make): the run continues
    more = plan(max_steps=8).steps[0]
    assert more.changed() == ["max_steps"] and more.resume()
    lines = []
    assert execute(plan(max_steps=8), log=lines.append) == 0
    assert fake.calls[-1]["parameters"]["resume"] is True
    assert any("pft: its parameters changed since it ran (max_steps); running it again" in line for line in lines)
    # another learning rate (was: 'already complete, skipped'): that run cannot be continued
    other = plan(max_steps=8, learning_rate=0.5)
    assert other.steps[0].changed() == ["learning_rate"]
    assert other.steps[0].resume_blocker() == "trained with other settings (learning_rate)"
    lines = []
    assert execute(other, log=lines.append) == 1
    assert any("holds a run trained with other settings (learning_rate)" in line and "--clear-outdated" in line
               for line in lines), lines
    assert execute(other, log=lambda line: None, clear_outdated=True) == 0
    assert fake.calls[-1]["parameters"]["resume"] is False and not fake.calls[-1]["log_before"]  # log cleared too
    assert plan(max_steps=8, learning_rate=0.5).steps[0].done()

    # an evaluation with another limit runs again; the same one is skipped
    def evaluate(name, call):
        _touch(call["output"].parent / "eval_summary.json")

    fake = Papermill(monkeypatch, evaluate)

    def evaluation(**params):
        return plan_pipeline(stages=["eval"], routers=["smoe"], runs_root=tmp_path, run_name="r",
                             stage_parameters={"eval": params})

    assert execute(evaluation(limit=20), log=lambda line: None) == 0
    assert evaluation(limit=20).steps[0].done() and evaluation(limit=40).steps[0].changed() == ["limit"]
    assert execute(evaluation(limit=40), log=lambda line: None) == 0 and len(fake.calls) == 2


def test_an_interrupted_pipeline_says_how_to_continue(tmp_path, monkeypatch, capsys):
    from libmoe_core.pipeline import runner

    def interrupted(plan, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    assert pipeline_main(["--runs-root", str(tmp_path), "--stages", "pretrain"]) == 130
    assert "interrupted; run the same command again to continue" in capsys.readouterr().err
