"""Evaluation of libmoe checkpoints through lmms-eval 0.7.3.

Importing this package does not import lmms-eval (only the model classes do).

* :mod:`.benchmarks`  the LibMoE suite (``libmoe12``) as lmms-eval task names, judge checks
* :mod:`.local_tasks` prepare the shipped offline tasks (``easyvqa``) for ``--include_path``
* :mod:`.model_args`  the ``--model_args`` contract of the libmoe model classes
* :mod:`.traces`      streamed Parquet writer for expert-routing traces
* :mod:`.runner`      build / run the lmms-eval command, check its results file
* :mod:`.results`     read results JSON into (task, metric, value, stderr) rows
* :mod:`.registration` the ``lmms_eval.models`` entry point (``libmoe``, ``libmoe_toy``)
* :mod:`.toy_model`   ``libmoe_toy``, a rule-based model to test the plumbing
"""

from .benchmarks import (
    JUDGE_TASKS,
    LIBMOE12,
    LOCAL_TASKS,
    TASK_ALIASES,
    JudgeRequirementError,
    check_judge_requirements,
    expand_tasks,
)
from .local_tasks import prepare_local_tasks
from .model_args import format_model_args, parse_bool, parse_int_list, parse_placements
from .results import MetricRow, find_results_file, format_table, load_results, results_rows
from .runner import EvalConfig, EvalOutcome, EvalRunError, build_command, run_evaluation
from .traces import PLACEMENTS, TOKEN_KINDS, TRACE_SCHEMA, TraceWriter, read_traces

__all__ = [
    "JUDGE_TASKS",
    "LIBMOE12",
    "LOCAL_TASKS",
    "PLACEMENTS",
    "TASK_ALIASES",
    "TOKEN_KINDS",
    "TRACE_SCHEMA",
    "EvalConfig",
    "EvalOutcome",
    "EvalRunError",
    "JudgeRequirementError",
    "MetricRow",
    "TraceWriter",
    "build_command",
    "check_judge_requirements",
    "expand_tasks",
    "find_results_file",
    "format_model_args",
    "format_table",
    "load_results",
    "parse_bool",
    "parse_int_list",
    "parse_placements",
    "prepare_local_tasks",
    "read_traces",
    "results_rows",
    "run_evaluation",
]
