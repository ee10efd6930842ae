"""The pipeline: stage notebooks executed in order by papermill, resumable, one sft per router.

Each executed notebook is saved in the run folder next to what it produced; a step whose
output already exists is skipped; the first failure stops the pipeline and names the
executed notebook that holds the traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("pretrain", "pft", "sft", "eval", "analysis")
NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"


@dataclass
class Step:
    """One notebook execution."""

    name: str
    notebook: Path
    output: Path  # the executed notebook
    parameters: dict
    done_marker: Path  # exists once the step's product is complete
    seconds: float | None = None
    skipped: bool = False
    marker_written_by_runner: bool = False  # for steps whose product has no natural end marker

    def done(self) -> bool:
        return self.done_marker.exists()


@dataclass
class PipelinePlan:
    run_dir: Path
    routers: list[str]
    steps: list[Step] = field(default_factory=list)


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

    ``stage_parameters`` holds extra notebook parameters per stage name (e.g. max_steps).
    """
    from ..moe import resolve_router_name

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    routers = [resolve_router_name(r) for r in routers]
    if not routers:
        raise ValueError("give at least one router")
    runs_root = Path(runs_root).resolve()
    run_dir = runs_root / run_name
    notebooks = Path(notebook_dir)
    extra = stage_parameters or {}
    common = {"preset": preset, "run_name": run_name, "runs_root": str(runs_root)}
    plan = PipelinePlan(run_dir, list(routers))

    def add(name, notebook, folder, parameters, marker=None, runner_marker=None):
        """``marker``: written by the notebook's own work; else the runner writes ``runner_marker``
        (default: the executed notebook's name with ``.ok``) once the notebook ran."""
        output = folder / Path(notebook).name
        runner_marker = runner_marker or output.with_suffix(".ok")
        plan.steps.append(Step(name, notebooks / notebook, output, parameters, marker or runner_marker,
                               marker_written_by_runner=marker is None))

    for stage in ("pretrain", "pft"):
        if stage in stages:
            folder = run_dir / stage
            add(stage, f"{stage}.ipynb", folder, {**common, **extra.get(stage, {})}, folder / "final" / "config.json")
    for router in routers:
        if "sft" in stages:
            folder = run_dir / f"sft-{router}"
            add(f"sft-{router}", "sft.ipynb", folder, {**common, "router": router, **extra.get("sft", {})},
                folder / "final" / "config.json")
        if "eval" in stages:
            folder = run_dir / f"eval-{router}"
            add(f"eval-{router}", "eval.ipynb", folder,
                {"run_name": run_name, "runs_root": str(runs_root), "router": router, **extra.get("eval", {})},
                folder / "eval_summary.json")
    if "analysis" in stages:
        folder = run_dir / "analysis"
        traces = [str(run_dir / f"eval-{r}" / "traces") for r in routers]
        # the comparison is done for this set of routers: adding a router later runs it again
        add("analysis", "analysis/router_entropy.ipynb", folder,
            {"traces": traces, "labels": list(routers), "out_dir": str(folder / "router_entropy")},
            runner_marker=folder / f"router_entropy.{'+'.join(routers)}.ok")
        for router, trace in zip(routers, traces):
            add(f"analysis-{router}", "analysis/expert_collapse.ipynb", folder / f"collapse-{router}",
                {"traces": [trace], "out_dir": str(folder / f"collapse-{router}")})
    return plan


def execute(plan: PipelinePlan, *, log: Callable[[str], None] = print, kernel: str = "python3",
            cell_timeout: float | None = None, timeout_retries: int = 0) -> int:
    """Run the plan's steps in order; 0 on success, 1 at the first failure (after naming it).

    ``cell_timeout`` (seconds, None: no limit) bounds each cell: papermill can wait forever for a
    kernel message that never arrives (nteract/papermill#711). A step whose cell timed out is run
    again up to ``timeout_retries`` times (steps resume: trainings from their last checkpoint)."""
    import papermill as pm
    from nbclient.exceptions import CellTimeoutError

    if cell_timeout is not None and not cell_timeout > 0:
        raise ValueError(f"cell_timeout must be > 0 seconds or None, got {cell_timeout!r}")
    if timeout_retries < 0:
        raise ValueError(f"timeout_retries must be >= 0, got {timeout_retries!r}")

    for step in plan.steps:
        if step.done():
            step.skipped = True
            log(f"[pipeline] {step.name}: already complete, skipped ({step.done_marker})")
            continue
        step.output.parent.mkdir(parents=True, exist_ok=True)
        log(f"[pipeline] {step.name}: running {step.notebook.name} -> {step.output}")
        started = time.perf_counter()
        try:
            for attempt in range(timeout_retries + 1):
                try:
                    pm.execute_notebook(str(step.notebook), str(step.output), parameters=step.parameters,
                                        kernel_name=kernel, progress_bar=False, cwd=str(step.notebook.parent),
                                        execution_timeout=cell_timeout)
                    break
                except CellTimeoutError:
                    if attempt == timeout_retries:
                        raise
                    log(f"[pipeline] {step.name}: a cell ran past {cell_timeout} s; running the step again "
                        f"({attempt + 1} of {timeout_retries})")
        except Exception as err:  # noqa: BLE001  papermill's execution error, or a missing kernel/notebook: named, then exit 1
            log(f"[pipeline] {step.name} FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
            log(f"[pipeline] the executed notebook with the full traceback: {step.output}")
            return 1
        step.seconds = time.perf_counter() - started
        if step.marker_written_by_runner:
            step.done_marker.write_text(f"{step.seconds:.1f} s\n")
        if not step.done():
            log(f"[pipeline] {step.name} FAILED: the notebook ran but {step.done_marker} was not written; see {step.output}")
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
