"""Router analysis: streaming metrics over Parquet routing traces.

Typical use::

    from libmoe_core.analysis import analyze, analyze_stats, compare_checkpoints

    table = analyze(["run/step-1000", "run/final"], by=None)   # pandas DataFrame
    stats = analyze_stats(["run/final"])[0]                   # counts for heatmaps
    stats.load_matrix("llm")                                  # layers x experts

Modules: :mod:`.schema` (the trace contract), :mod:`.read` (streaming reads),
:mod:`.metrics` (definitions), :mod:`.accumulate` (one pass, per-group counters),
:mod:`.specialisation` (mutual information), :mod:`.compare` (checkpoints),
:mod:`.alarms` (collapse), :mod:`.ablation` (drop-top-1), :mod:`.report`
(table / JSON), :mod:`.plots` (seaborn figures), :mod:`.synthetic` (test traces).
"""

from .accumulate import RoutingAccumulator, RoutingStats, accumulate_trace
from .alarms import CollapseThresholds, collapse_alarms, flag_collapse
from .compare import compare_checkpoints
from .read import TraceError, check_columns, iter_batches
from .report import JSON_KEYS, analyze, analyze_stats, format_table, records
from .schema import BY_CHOICES, JOIN_KEYS, TRACE_SCHEMA
from .specialisation import over_represented, specialisation_table
from .synthetic import synthetic_trace, trace_table, write_demo_traces, write_synthetic_trace, write_trace


def __getattr__(name):
    # The ablation needs torch; import it lazily so trace analysis stays light.
    if name in ("drop_top1", "drop_top1_accuracy_change"):
        from . import ablation

        return getattr(ablation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BY_CHOICES", "JOIN_KEYS", "JSON_KEYS", "TRACE_SCHEMA", "CollapseThresholds", "RoutingAccumulator",
    "RoutingStats", "TraceError", "accumulate_trace", "analyze", "analyze_stats", "check_columns",
    "collapse_alarms", "compare_checkpoints", "drop_top1", "drop_top1_accuracy_change", "flag_collapse",
    "format_table", "iter_batches", "over_represented", "records", "specialisation_table", "synthetic_trace",
    "trace_table", "write_demo_traces", "write_synthetic_trace", "write_trace",
]
