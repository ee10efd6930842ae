"""Build and run the lmms-eval command for a libmoe checkpoint, and check that it produced results.

lmms-eval's CLI exits 0 even when the evaluation failed (it logs the traceback and moves
on), so success here means: exit status 0 *and* a fresh ``*_results.json`` under the
output path. Anything else raises :class:`EvalRunError` carrying the last lines of
lmms-eval's output; the whole output is kept in ``<output_path>/lmms_eval.log``.

Layout of ``<output_path>``::

    lmms_tasks/            prepared libmoe-kit tasks (the --include_path), when used
    <model name>/<date>_results.json   lmms-eval's aggregated results (+ samples)
    traces/part-*.parquet  routing traces, with --return-id-experts
    lmms_eval.log          the full lmms-eval output of the last run
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .benchmarks import JUDGE_GROUPS, LOCAL_TASKS, check_judge_requirements
from .local_tasks import prepare_local_tasks
from .model_args import format_model_args, parse_batch_size
from .registration import MODEL_CLASSES, entry_point_registered
from .results import MetricRow, find_results_file, load_results, results_rows

__all__ = [
    "OFFLINE_ENV",
    "EvalConfig",
    "EvalOutcome",
    "EvalRunError",
    "build_command",
    "build_env",
    "launcher_module",
    "run_evaluation",
]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRACES_DIRNAME = "traces"
TASKS_DIRNAME = "lmms_tasks"
LOG_NAME = "lmms_eval.log"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class EvalRunError(RuntimeError):
    """lmms-eval failed or wrote no results; the message ends with the tail of its output."""


def check_eval_options(batch_size, limit) -> None:
    """``batch_size`` a positive integer, ``limit`` None or > 0 (below 1: a fraction of each task's
    documents, as lmms-eval reads it); lmms-eval failed on them only after loading the model."""
    parse_batch_size(batch_size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise ValueError(f"limit must be None or > 0 (documents per task; below 1: a fraction of them), got {limit!r}")


@dataclass
class EvalConfig:
    """One ``libmoe eval`` run. ``tasks`` are lmms-eval task names (aliases already expanded)."""

    model_path: str
    tasks: list[str]
    output_path: Path
    model: str = "libmoe"
    batch_size: int | str = 1
    limit: float | None = None
    conv_template: str | None = None
    return_id_experts: bool = False
    layers: list[int] | None = None
    placements: tuple[str, ...] | None = None
    log_samples: bool = False
    device: str | None = None
    extra_model_args: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.output_path = Path(self.output_path).resolve()
        if not self.tasks:
            raise ValueError("EvalConfig.tasks is empty")
        check_eval_options(self.batch_size, self.limit)

    @property
    def trace_dir(self) -> Path:
        return self.output_path / TRACES_DIRNAME

    @property
    def tasks_dir(self) -> Path:
        return self.output_path / TASKS_DIRNAME

    @property
    def local_tasks(self) -> list[str]:
        return [t for t in self.tasks if t in LOCAL_TASKS]

    def model_args(self) -> str:
        return format_model_args(
            self.model_path,
            conv_template=self.conv_template,
            return_id_experts=self.return_id_experts,
            layers=self.layers,
            placements=self.placements,
            trace_dir=str(self.trace_dir) if self.return_id_experts else None,
            extra=self.extra_model_args,
        )


@dataclass
class EvalOutcome:
    """What a successful run left behind."""

    results_path: Path
    rows: list[MetricRow]
    log_path: Path
    trace_dir: Path | None
    command: list[str]


def launcher_module(model: str) -> str:
    """``lmms_eval``, or the registering shim for a libmoe model whose entry point is not installed."""
    if model in MODEL_CLASSES and not entry_point_registered(model):
        return "libmoe_core.evaluation.launch"
    return "lmms_eval"


def build_command(cfg: EvalConfig, include_path: Path | None = None, module: str | None = None) -> list[str]:
    """The argv of the lmms-eval run for ``cfg`` (pure: touches no file)."""
    cmd = [
        cfg.python, "-m", module or launcher_module(cfg.model),
        "--model", cfg.model,
        "--model_args", cfg.model_args(),
        "--tasks", ",".join(cfg.tasks),
        "--batch_size", str(cfg.batch_size),
        "--output_path", str(cfg.output_path),
    ]
    if cfg.limit is not None:
        cmd += ["--limit", f"{cfg.limit:g}" if isinstance(cfg.limit, float) else str(cfg.limit)]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    if cfg.log_samples:
        cmd.append("--log_samples")
    if cfg.device:
        cmd += ["--device", cfg.device]
    return cmd


def build_env(base: Mapping[str, str] | None = None, offline: bool = False) -> dict[str, str]:
    """The subprocess environment: ``base`` (default os.environ), unbuffered, offline if asked."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if offline:
        env.update(OFFLINE_ENV)
    return env


def _check_lmms_eval_installed() -> None:
    if importlib.util.find_spec("lmms_eval") is None:
        raise EvalRunError(
            "lmms-eval is not installed in this environment; install the 'eval' extra "
            "following docs/eval_install.md (lmms-eval==0.7.3 without torchvision)"
        )


@contextlib.contextmanager
def _replacing_traces(cfg: EvalConfig, overwrite: bool):
    """An earlier run's trace parts are set aside in ``traces.previous/`` for the run and deleted
    when it succeeds; when it fails they come back and the failed run's parts go (a bad
    parameter once cost the earlier run's traces, its summary still pointing at them)."""
    parts = sorted(cfg.trace_dir.glob("*.parquet")) if cfg.trace_dir.is_dir() else []
    if parts and not overwrite:
        raise EvalRunError(
            f"{cfg.trace_dir} already holds routing traces from an earlier run ({len(parts)} parts); "
            "choose another --output-path or pass --overwrite-traces"
        )
    aside = cfg.output_path / f"{TRACES_DIRNAME}.previous"
    if parts:
        aside.mkdir(exist_ok=True)
        for part in parts:
            part.replace(aside / part.name)
    try:
        yield
    except BaseException:
        if parts:
            for new in cfg.trace_dir.glob("*.parquet"):
                new.unlink()
            for part in parts:
                (aside / part.name).replace(part)
            shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


#: Judge answers lmms-eval caches under its ``--output_path`` and reuses, unchecked, in a later run
#: there: ``hallusion_bench`` reads ``gpt_response/hallusion_output_v{d,s}_model.json`` back and
#: judges only the samples past its length (another checkpoint scored with the first one's answers).
JUDGE_CACHES = {"hallusion_bench_image": ("gpt_response/hallusion_output_vd_model.json",
                                          "gpt_response/hallusion_output_vs_model.json")}


def _check_judge_caches(cfg: EvalConfig) -> None:
    tasks = [leaf for task in cfg.tasks for leaf in JUDGE_GROUPS.get(task, (task,))]  # groups and tags too
    stale = [cfg.output_path / rel for task in dict.fromkeys(tasks) for rel in JUDGE_CACHES.get(task, ())
             if (cfg.output_path / rel).exists()]
    if stale:
        raise EvalRunError(
            f"{cfg.output_path} holds judge answers of an earlier run, which lmms-eval would reuse for this one "
            f"(scoring this model with that run's answers): {', '.join(map(str, stale))}; choose another "
            "--output-path or delete them"
        )


def run_evaluation(
    cfg: EvalConfig,
    *,
    offline: bool | None = None,
    overwrite_traces: bool = False,
    stream: TextIO | None = sys.stdout,
    tail_lines: int = 40,
    env: Mapping[str, str] | None = None,
) -> EvalOutcome:
    """Check, prepare, run lmms-eval as a subprocess and return its parsed results.

    Args:
        offline: force the Hugging Face offline variables; ``None`` sets them only when every
            task is a libmoe-kit local task (hub benchmarks then use the caller's settings).
        overwrite_traces: delete an earlier run's trace parts in ``<output_path>/traces``.
        stream: where lmms-eval's output is echoed live (None: quiet; always logged to file).
        env: base environment (default ``os.environ``); also used for the judge check.

    Raises:
        JudgeRequirementError: a task needs an API judge and the key is not set.
        EvalRunError: lmms-eval missing, failed, or wrote no results file.
    """
    base_env = os.environ if env is None else env
    check_judge_requirements(cfg.tasks, base_env)
    _check_lmms_eval_installed()
    cfg.output_path.mkdir(parents=True, exist_ok=True)
    _check_judge_caches(cfg)
    with _replacing_traces(cfg, overwrite_traces) if cfg.return_id_experts else contextlib.nullcontext():
        return _run_lmms_eval(cfg, offline, stream, tail_lines, base_env)


def _run_lmms_eval(cfg: EvalConfig, offline: bool | None, stream: TextIO | None, tail_lines: int,
                   base_env: Mapping[str, str]) -> EvalOutcome:
    include_path = prepare_local_tasks(cfg.local_tasks, cfg.tasks_dir)
    if offline is None:
        offline = len(cfg.local_tasks) == len(cfg.tasks)
    command = build_command(cfg, include_path)
    log_path = cfg.output_path / LOG_NAME
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    started = time.time()
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + subprocess.list2cmdline(command) + "\n")
        with subprocess.Popen(  # the with block closes the pipe on every path
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=build_env(base_env, offline),
        ) as proc:
            try:
                for line in proc.stdout:
                    plain = _ANSI.sub("", line)
                    log.write(plain)
                    tail.append(plain.rstrip("\n"))
                    if stream is not None:
                        stream.write(line)
                        stream.flush()
                returncode = proc.wait()
            except BaseException:  # an interrupt or a failing stream: lmms-eval must not run on unseen
                proc.kill()
                proc.wait()
                raise
    results_path = find_results_file(cfg.output_path, newer_than=started - 0.01)
    if returncode != 0 or results_path is None:
        why = f"exited with status {returncode}" if returncode != 0 else "wrote no *_results.json"
        raise EvalRunError(
            f"lmms-eval {why} under {cfg.output_path} (tasks: {','.join(cfg.tasks)}; full log: {log_path}).\n"
            "Last lines of its output:\n" + "\n".join(tail)
        )
    rows = results_rows(load_results(results_path))
    trace_dir = cfg.trace_dir if cfg.return_id_experts and cfg.trace_dir.is_dir() else None
    return EvalOutcome(results_path, rows, log_path, trace_dir, command)
