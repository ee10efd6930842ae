"""``libmoe analyze``: routing metrics of Parquet routing traces (table or JSON)."""

from __future__ import annotations

import json
import sys


def _ratio(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def register(sub) -> None:
    from ..analysis.alarms import DEFAULT_DEAD_EXPERTS, DEFAULT_MAX_LOAD_RATIO
    from ..analysis.read import DEFAULT_BATCH_ROWS
    from ..analysis.schema import BY_CHOICES

    p = sub.add_parser(
        "analyze",
        help="routing metrics of routing traces (entropy, load, collapse, checkpoint switches)",
        description="Per placement and layer routing metrics of Parquet routing traces. With two or more "
        "traces (checkpoints of one run, oldest first), also switch rate, overlap and saturation.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE", help="Parquet file or directory of part files")
    p.add_argument("--by", choices=BY_CHOICES, help="also group by task or token kind")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per placement/layer")
    p.add_argument("--max-load-ratio", type=_ratio, default=DEFAULT_MAX_LOAD_RATIO,
                   help="collapse alarm when max load / ideal >= this; 'auto' (default): per layer, halfway "
                   "from 1 to the most top-k allows (E/k), at most 2")
    p.add_argument("--dead-experts", type=_at_least_one, default=DEFAULT_DEAD_EXPERTS,
                   help="collapse alarm when this many experts are never selected (default %(default)s)")
    p.add_argument("--fail-on-alarm", action="store_true", help="exit with status 1 when a layer is flagged")
    p.add_argument("--compare-method", choices=("auto", "zip", "join"), default="auto",
                   help="how rows of several traces are matched (default: zip if row-aligned, else join)")
    p.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="rows per streamed batch")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.alarms import CollapseThresholds
    from ..analysis.read import TraceError
    from ..analysis.report import analyze, format_table, records

    thresholds = CollapseThresholds(args.max_load_ratio, args.dead_experts)
    try:
        table = analyze(args.traces, by=args.by, thresholds=thresholds, method=args.compare_method,
                        batch_rows=args.batch_rows)
    except (TraceError, FileNotFoundError) as exc:
        print(f"libmoe analyze: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        rows = [json.dumps(r) for r in records(table)]
        print("[\n" + ",\n".join(rows) + "\n]" if rows else "[]")
    else:
        print(format_table(table))
    flagged = int(table["alarm"].map(bool).sum())
    if flagged:
        print(f"libmoe analyze: {flagged} layer(s) flagged for expert collapse", file=sys.stderr)
    return 1 if flagged and args.fail_on_alarm else 0
