"""The pipeline: stage notebooks executed in order by papermill, resumable, one sft per router.

Each executed notebook is saved in the run folder next to what it produced. A step is skipped
when its product exists, is newer than the products it was made from (so redoing a step
redoes the steps after it) and was made with the parameters given now (a training stage's final
model records its config; the runner records other steps' parameters next to the executed
notebook); a training step whose folder holds an earlier attempt resumes it when it can;
the first failure stops the pipeline and names the executed notebook that holds the traceback.
Kernels run in the caller's working directory: relative paths in parameters mean what they
mean there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .._shipped import shipped_dir
from ..train.checkpoints import MARKER, checkpoints, last_complete_checkpoint, write_atomic

STAGES = ("pretrain", "pft", "sft", "eval", "analysis")
TRAINING_STAGES = ("pretrain", "pft", "sft")
NOTEBOOK_DIR = shipped_dir("notebooks")
NOTEBOOKS = {"pretrain": ("pretrain.ipynb",), "pft": ("pft.ipynb",), "sft": ("sft.ipynb",), "eval": ("eval.ipynb",),
             "analysis": ("analysis/router_entropy.ipynb", "analysis/expert_collapse.ipynb")}


def _newer(paths, than: Path) -> list[Path]:
    """The existing ``paths`` modified after ``than``."""
    mtime = than.stat().st_mtime
    return [p for p in paths if p.exists() and p.stat().st_mtime > mtime]


@dataclass
class Step:
    """One notebook execution."""

    name: str
    notebook: Path
    output: Path  # the executed notebook
    parameters: dict
    done_marker: Path  # exists once the step's product is complete
    upstream: tuple[Path, ...] = ()  # the products (markers) of what this step is made from
    trains: bool = False  # a training stage: its folder may hold an earlier attempt to resume
    seconds: float | None = None
    skipped: bool = False
    marker_written_by_runner: bool = False  # for steps whose product has no natural end marker
    config: object | None = None  # a training step's TrainConfig, resolved from its parameters

    @property
    def parameters_record(self) -> Path:
        """The parameters the step last ran with (written by the runner after it succeeded)."""
        return self.output.with_suffix(".params.json")

    def outdated_by(self) -> list[Path]:
        """Upstream products newer than this step's product."""
        return _newer(self.upstream, self.done_marker) if self.done_marker.exists() else []

    def changed(self) -> list[str]:
        """What differs from the run that made the product: a training step's config keys (its final
        model records them), another step's parameters (recorded by the runner)."""
        if self.trains:
            from ..train.stage_folder import final_changes

            return final_changes(self.config)
        if not self.parameters_record.is_file():
            return ["(no record of the parameters it ran with)"]
        saved = json.loads(self.parameters_record.read_text())
        now = json.loads(json.dumps(self.parameters))
        return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))

    def done(self) -> bool:
        return self.done_marker.exists() and not self.outdated_by() and not self.changed()

    def resume_blocker(self) -> str | None:
        """Why the earlier run in a training step's folder cannot be continued (None: it can, or
        there is none): made from an older upstream model, or trained with other settings."""
        folder = self.output.parent
        last = last_complete_checkpoint(folder / "checkpoints")
        if not self.trains or last is None:
            return None
        if _newer(self.upstream, last / MARKER):
            return "made from an older upstream model"
        saved = folder / "config.yaml"
        if self.config is not None and saved.is_file():
            import yaml

            from ..train.stage_folder import config_changes

            changed = config_changes(yaml.safe_load(saved.read_text()) or {}, self.config)
            if changed:
                return f"trained with other settings ({', '.join(changed)})"
        return None

    def resume(self) -> bool:
        """Whether a training step continues the earlier attempt in its folder: from its last complete
        checkpoint (or afresh when it left none), unless :meth:`resume_blocker` says it cannot."""
        folder = self.output.parent
        last = last_complete_checkpoint(folder / "checkpoints")
        if last is None:  # an attempt that died before its first complete checkpoint: resuming starts it over
            partial = checkpoints(folder / "checkpoints") or (folder / "metrics.jsonl").is_file()
            return self.trains and bool(partial) and not (folder / "final" / "config.json").is_file()
        return self.trains and self.resume_blocker() is None


@dataclass
class PipelinePlan:
    run_dir: Path
    routers: list[str]
    steps: list[Step] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)  # where the kernels run
    notes: list[str] = field(default_factory=list)  # said before the first step


def _parameter_names(stage: str, notebook: Path) -> set[str]:
    """What a stage's notebook takes: every name ``stage_config`` knows, or the ``parameters`` cell."""
    if stage in TRAINING_STAGES:
        from .stage import MOE_PARAMETERS, NON_CONFIG_PARAMETERS, PARAMETER_KEYS, PRESET_WEIGHTS_PARAMETERS

        names = (set(PARAMETER_KEYS) | NON_CONFIG_PARAMETERS) - {"stage_tag"}  # the plan names the folders
        names = names if stage == "pretrain" else names - PRESET_WEIGHTS_PARAMETERS  # pft, sft: a saved model
        return names if stage == "sft" else names - MOE_PARAMETERS
    import papermill as pm

    return set(pm.inspect_notebook(str(notebook)))


def _notebook_defaults(notebook: Path) -> dict:
    """The values a notebook's ``parameters`` cell assigns (literals)."""
    import ast

    import papermill as pm

    out = {}
    if not Path(notebook).is_file():  # reported when the step runs
        return out
    for name, info in pm.inspect_notebook(str(notebook)).items():
        try:
            out[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            raise ValueError(f"{notebook}: parameter {name!r} = {info['default']} is not a literal") from None
    return out


def notebook_overrides(stage_parameters: dict[str, dict], notebook_dir: Path) -> dict[str, dict]:
    """``{notebook: parameters}`` from ``{stage: parameters}``; an analysis parameter goes to each analysis
    notebook that takes it. An unknown stage, or a name no notebook of the stage takes, is an error."""
    out: dict[str, dict] = {}
    for stage, params in stage_parameters.items():
        if stage not in NOTEBOOKS:
            raise ValueError(f"no stage {stage!r} in the pipeline; its stages: {', '.join(STAGES)}")
        takes = {nb: _parameter_names(stage, Path(notebook_dir) / nb) for nb in NOTEBOOKS[stage]}
        known = set().union(*takes.values())
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown {stage} notebook parameter(s) {unknown}; it takes {sorted(known)}")
        out.update({nb: {k: v for k, v in params.items() if k in names} for nb, names in takes.items()})
    return out


def plan_pipeline(
    *,
    preset: str = "tiny",
    routers: list[str] = ("smoe",),
    stages: list[str] = STAGES,
    run_name: str = "default",
    runs_root: str | Path = "runs",
    stage_parameters: dict[str, dict] | None = None,
    notebook_dir: str | Path = NOTEBOOK_DIR,
) -> PipelinePlan:
    """The steps for ``stages`` (pretrain, pft, sft, eval, analysis) and ``routers``.

    ``stage_parameters`` holds extra notebook parameters per stage name (e.g. max_steps); relative
    paths among them are taken from the current working directory, where the kernels will run.
    """
    from ..moe import resolve_router_name

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    given = list(routers)
    routers = [resolve_router_name(r) for r in given]
    if not routers:
        raise ValueError("give at least one router")
    twice = sorted({r for r in routers if routers.count(r) > 1})
    if twice:
        raise ValueError(f"router(s) {twice} given more than once (--router {' --router '.join(given)})")
    not_run = sorted(set(stage_parameters or {}) & set(STAGES) - set(stages))
    runs_root = Path(runs_root).resolve()
    run_dir = runs_root / run_name
    notebooks = Path(notebook_dir)
    overrides = notebook_overrides(stage_parameters or {}, notebooks)
    common = {"preset": preset, "run_name": run_name, "runs_root": str(runs_root)}
    plan = PipelinePlan(run_dir, list(routers))
    if not_run:
        plan.notes.append(f"--set for {', '.join(not_run)}: checked, not used (--stages {','.join(stages)})")

    def add(name, notebook, folder, parameters, marker=None, runner_marker=None, upstream=(), trains=False):
        """``marker``: written by the notebook's own work; else the runner writes ``runner_marker``
        (default: the executed notebook's name with ``.ok``) once the notebook ran."""
        extra = overrides.get(notebook, {})
        fixed = sorted(set(parameters) & set(extra))
        if fixed:
            raise ValueError(f"{notebook}: the pipeline sets {fixed} itself (see --preset, --router, --run-name, "
                             "--runs-root; resume follows the stage folder)")
        output = folder / Path(notebook).name
        runner_marker = runner_marker or output.with_suffix(".ok")
        step = Step(name, notebooks / notebook, output, {**parameters, **extra}, marker or runner_marker,
                    upstream=tuple(upstream), trains=trains, marker_written_by_runner=marker is None)
        if trains:  # the config the stage will train with: bad values fail now, before any stage runs
            from .stage import stage_config

            given = {**_notebook_defaults(notebooks / notebook), **step.parameters}  # what the kernel will hold
            step.config = stage_config(Path(notebook).stem, **given)
            if step.config.stage_dir.resolve() != folder.resolve():
                raise ValueError(f"{name}: its config trains in {step.config.stage_dir}, not {folder}")
        if notebook == "eval.ipynb":  # its run options, checked now, not after the training stages
            from ..evaluation.runner import check_eval_options

            given = {**_notebook_defaults(notebooks / notebook), **step.parameters}
            try:
                check_eval_options(given.get("batch_size", 1), given.get("limit"))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        plan.steps.append(step)
        return step

    def starts_from(step, key, default):
        """The step is made from the model named by its parameter ``key`` (relative: to the kernels' cwd),
        else from the model folder ``default``."""
        model = plan.cwd / step.parameters[key] if step.parameters.get(key) else default
        step.upstream = (model / "config.json",) if model else ()

    requested, stages = stages, STAGES  # every stage is planned, so every --set is checked; the rest are dropped
    for stage, previous in (("pretrain", None), ("pft", "pretrain")):
        if stage in stages:
            folder = run_dir / stage
            step = add(stage, f"{stage}.ipynb", folder, {**common, "resume": False}, folder / "final" / "config.json",
                       trains=True)
            starts_from(step, "input_model", previous and run_dir / previous / "final")
    for router in routers:
        if "sft" in stages:
            folder = run_dir / f"sft-{router}"
            step = add(f"sft-{router}", "sft.ipynb", folder, {**common, "router": router, "resume": False},
                       folder / "final" / "config.json", trains=True)
            starts_from(step, "input_model", run_dir / "pft" / "final")
        if "eval" in stages:
            folder = run_dir / f"eval-{router}"
            step = add(f"eval-{router}", "eval.ipynb", folder,
                       {"run_name": run_name, "runs_root": str(runs_root), "router": router},
                       folder / "eval_summary.json")
            starts_from(step, "model_path", run_dir / f"sft-{router}" / "final")
    if "analysis" in stages:
        folder = run_dir / "analysis"
        traces = [str(run_dir / f"eval-{r}" / "traces") for r in routers]
        summaries = [run_dir / f"eval-{r}" / "eval_summary.json" for r in routers]
        # the comparison is of this set of routers (its parameters): another set runs it again
        add("analysis", "analysis/router_entropy.ipynb", folder,
            {"traces": traces, "labels": list(routers), "out_dir": str(folder / "router_entropy")},
            upstream=summaries)
        for router, trace, summary in zip(routers, traces, summaries):
            add(f"analysis-{router}", "analysis/expert_collapse.ipynb", folder / f"collapse-{router}",
                {"traces": [trace], "out_dir": str(folder / f"collapse-{router}")}, upstream=[summary])
    plan.steps = [step for step in plan.steps if step.name.split("-")[0] in requested]
    return plan


def _stale_training(step: Step) -> list[str]:
    """An earlier run in a training step's folder that the step must not resume (made from an
    older upstream model, or with other settings), which a fresh launch would refuse."""
    from ..train.stage_folder import earlier_run_in

    return earlier_run_in(step.output.parent) if step.trains and not step.resume() else []


def _error_line(err: Exception) -> str:
    """The line of an error worth printing. A notebook cell's error (papermill's ``ename`` / ``evalue``):
    its type and the first line of its message (a failed training run's names the rank's exception;
    the last line was the launcher's own report). Otherwise its last line that is not a rule of dashes."""
    def meaningful(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if any(c.isalnum() for c in line)]

    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename and evalue is not None:
        first = meaningful(str(evalue))
        return f"{ename}: {first[0]}" if first else str(ename)
    lines = meaningful(str(err))
    return lines[-1] if lines else ""


def _clear_outdated_run(step: Step, log) -> None:
    """Delete a training step's outdated run under the stage folder's lock (a run still going keeps it)."""
    import os

    from ..train.guard import acquire_stage_lock
    from ..train.launch import STAGE_LOCK_NAME, STAGE_LOCK_WAIT_S
    from ..train.stage_folder import StageFolderError, clear_run

    folder = step.output.parent
    try:
        lock = acquire_stage_lock(folder / STAGE_LOCK_NAME, STAGE_LOCK_WAIT_S, say=log)
    except TimeoutError as err:
        raise StageFolderError(str(err)) from None
    try:
        stale = _stale_training(step)  # again, now that nothing else can change the folder
        if stale:
            log(f"[pipeline] {step.name}: deleting the outdated run in {folder} ({', '.join(stale[:3])})")
            clear_run(folder)
    finally:
        os.close(lock)


def execute(plan: PipelinePlan, *, log: Callable[[str], None] = print, kernel: str = "python3",
            cell_timeout: float | None = None, timeout_retries: int = 0, clear_outdated: bool = False) -> int:
    """Run the plan's steps in order; 0 on success, 1 at the first failure (after naming it).

    ``cell_timeout`` (seconds, None: no limit) bounds each cell: papermill can wait forever for a
    kernel message that never arrives (nteract/papermill#711). A step whose cell timed out is run
    again up to ``timeout_retries`` times. Every attempt of a training step passes ``resume``
    (:meth:`Step.resume`), so a retry, or a rerun after a crash, continues from the last complete
    checkpoint. Kernels run in ``plan.cwd``. A training step to redo whose folder holds a run made
    from an older upstream model stops the pipeline, naming it, unless ``clear_outdated`` (then that
    run's checkpoints, metrics and final model are deleted first)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    if cell_timeout is not None and not cell_timeout > 0:
        raise ValueError(f"cell_timeout must be > 0 seconds or None, got {cell_timeout!r}")
    if timeout_retries < 0:
        raise ValueError(f"timeout_retries must be >= 0, got {timeout_retries!r}")

    for note in plan.notes:
        log(f"[pipeline] {note}")
    for step in plan.steps:
        if step.done():
            step.skipped = True
            log(f"[pipeline] {step.name}: already complete, skipped ({step.done_marker})")
            continue
        if step.outdated_by():
            log(f"[pipeline] {step.name}: outdated, {step.outdated_by()[0]} is newer than {step.done_marker}")
        elif step.done_marker.exists():
            log(f"[pipeline] {step.name}: its parameters changed since it ran ({', '.join(step.changed()[:6])}); "
                "running it again")
        stale = _stale_training(step)
        if stale and not clear_outdated:
            why = step.resume_blocker() or "that cannot be continued"
            log(f"[pipeline] {step.name} FAILED: {step.output.parent} holds a run {why} "
                f"({', '.join(stale[:3])}); run again with --clear-outdated to delete it, or delete it yourself")
            return 1
        if stale:
            try:
                _clear_outdated_run(step, log)
            except RuntimeError as err:  # the folder stayed locked by a run still going
                log(f"[pipeline] {step.name} FAILED: {err}")
                return 1
        step.output.parent.mkdir(parents=True, exist_ok=True)
        log(f"[pipeline] {step.name}: running {step.notebook.name} -> {step.output}")
        started = time.perf_counter()
        try:
            for attempt in range(timeout_retries + 1):
                parameters = step.parameters
                if step.trains:
                    parameters = {**parameters, "resume": step.resume()}
                    if parameters["resume"]:
                        log(f"[pipeline] {step.name}: resuming the earlier attempt in {step.output.parent}")
                try:
                    pm.execute_notebook(str(step.notebook), str(step.output), parameters=parameters,
                                        kernel_name=kernel, progress_bar=False, cwd=str(plan.cwd),
                                        execution_timeout=cell_timeout)
                    break
                except CellTimeoutError:
                    if attempt == timeout_retries:
                        raise
                    log(f"[pipeline] {step.name}: a cell ran past {cell_timeout} s; running the step again "
                        f"({attempt + 1} of {timeout_retries})")
        except CellTimeoutError:
            log(f"[pipeline] {step.name} FAILED: a cell ran past --cell-timeout {cell_timeout:g} s"
                + (f" in each of {timeout_retries + 1} attempts" if timeout_retries else ""))
            log(f"[pipeline] the executed notebook: {step.output}")
            return 1
        except Exception as err:  # noqa: BLE001  papermill's execution error, or a missing kernel/notebook: named, then exit 1
            log(f"[pipeline] {step.name} FAILED: {type(err).__name__}: {_error_line(err)}")
            log(f"[pipeline] the executed notebook with the full traceback: {step.output}")
            return 1
        step.seconds = time.perf_counter() - started
        write_atomic(step.parameters_record, json.dumps(step.parameters, indent=1, sort_keys=True))
        if step.marker_written_by_runner:
            step.done_marker.write_text(f"{step.seconds:.1f} s\n")
        if not step.done():
            log(f"[pipeline] {step.name} FAILED: the notebook ran but did not write {step.done_marker} anew"
                + (f" for these parameters ({', '.join(step.changed()[:6])})" if step.changed() else "")
                + f"; see {step.output}")
            return 1
        log(f"[pipeline] {step.name}: done in {step.seconds:.0f} s")
    return 0


def report(plan: PipelinePlan) -> str:
    """Where the executed notebooks and figures are, and the easy-VQA accuracy table."""
    import json

    lines = [f"\nrun folder: {plan.run_dir}", "executed notebooks:"]
    lines += [f"  {step.output}" for step in plan.steps if step.output.exists()]
    figures = sorted(plan.run_dir.rglob("*.png"))
    if figures:
        lines.append("figures:")
        lines += [f"  {path}" for path in figures]
    summaries = {r: plan.run_dir / f"eval-{r}" / "eval_summary.json" for r in plan.routers}
    results = {r: json.loads(p.read_text()) for r, p in summaries.items() if p.is_file()}
    results = {r: s for r, s in results.items() if "easyvqa" in s}
    if results:
        from .evaluate import accuracy_table, easyvqa_baselines

        doc_ids = next(iter(results.values()))["easyvqa_doc_ids"]
        rows = {f"router {r}": s["easyvqa"] for r, s in results.items()}
        rows.update(easyvqa_baselines(doc_ids))
        n = len(doc_ids)
        lines.append(f"\neasy-VQA test accuracy on {n} questions (± standard error):")
        lines.append(accuracy_table(rows).to_string())
    return "\n".join(lines)
