"""``libmoe eval``: evaluate a checkpoint on lmms-eval tasks (a thin wrapper around ``python -m lmms_eval``)."""

from __future__ import annotations

import argparse
import subprocess
import sys

_EPILOG = """\
task names: lmms-eval task names, comma or space separated; aliases: libmoe12 (the
LibMoE suite), libmoe12_nojudge (without the GPT-judged tasks); easyvqa (offline,
shipped with libmoe-kit). Judge tasks need OPENAI_API_KEY (or API_TYPE=azure with
AZURE_API_KEY and AZURE_ENDPOINT).

examples:
  libmoe eval --model-path ckpt/ --tasks easyvqa --limit 64
  libmoe eval --model-path ckpt/ --tasks libmoe12 --return-id-experts \\
      --layers-expert-selection 0 5 11 --placements vision,llm --output-path runs/eval
"""


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint with lmms-eval",
        description=__doc__,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-path", required=True, help="checkpoint directory (passed as pretrained=...)")
    p.add_argument("--tasks", required=True, nargs="+", help="task names or aliases (see below)")
    p.add_argument("--model", default="libmoe", help="lmms-eval model name (default: libmoe; libmoe_toy for tests)")
    p.add_argument("--conv-template", default=None, help="conversation template name")
    p.add_argument("--batch-size", default="1", help="lmms-eval batch size (default: 1)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (testing only)")
    p.add_argument("--output-path", default="eval_outputs", help="results directory (default: ./eval_outputs)")
    p.add_argument("--return-id-experts", action="store_true", help="record expert routing to <output>/traces")
    p.add_argument("--layers-expert-selection", nargs="+", type=int, default=None, metavar="LAYER",
                   help="MoE layer indices to record (default: all)")
    p.add_argument("--placements", default=None, help="placements to record: vision,projector,llm (default: all)")
    p.add_argument("--overwrite-traces", action="store_true", help="delete traces of an earlier run in the output path")
    p.add_argument("--log-samples", action="store_true", help="also save every model answer (lmms-eval --log_samples)")
    p.add_argument("--device", default=None, help="device passed to lmms-eval (e.g. cuda:0)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra model argument (repeatable)")
    p.add_argument("--offline", action="store_true",
                   help="set the Hugging Face offline variables (automatic when all tasks are local)")
    p.add_argument("--dry-run", action="store_true", help="print the lmms-eval command and exit")
    p.add_argument("--drop-top1", action="store_true",
                   help="ablation: evaluate as is and with every token's top-1 expert removed; print the change")
    p.set_defaults(func=run)


def _config(args):
    from ..evaluation import EvalConfig, expand_tasks, parse_placements
    from ..evaluation.model_args import parse_bool

    extra = {}
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        extra[key] = parse_bool(value) if value.lower() in ("true", "false") else value
    if not args.return_id_experts and (args.layers_expert_selection or args.placements):
        raise ValueError("--layers-expert-selection / --placements need --return-id-experts")
    limit = args.limit
    if limit is not None and limit.is_integer():
        limit = int(limit)
    return EvalConfig(
        model_path=args.model_path,
        tasks=expand_tasks(args.tasks),
        output_path=args.output_path,
        model=args.model,
        batch_size=args.batch_size,
        limit=limit,
        conv_template=args.conv_template,
        return_id_experts=args.return_id_experts,
        layers=args.layers_expert_selection,
        placements=parse_placements(args.placements) if args.placements else None,
        log_samples=args.log_samples,
        device=args.device,
        extra_model_args=extra,
    )


def run(args) -> int:
    from ..evaluation import EvalRunError, JudgeRequirementError, build_command, format_table, run_evaluation
    from ..evaluation.runner import TASKS_DIRNAME

    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"libmoe eval: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from ..evaluation import check_judge_requirements

        try:
            check_judge_requirements(cfg.tasks)
        except JudgeRequirementError as exc:
            print(f"note: a real run would stop here: {exc}", file=sys.stderr)
        include = cfg.tasks_dir if cfg.local_tasks else None
        print(subprocess.list2cmdline(build_command(cfg, include)))
        if include is not None:
            print(f"# local tasks are prepared into {cfg.output_path / TASKS_DIRNAME} on a real run")
        return 0
    if args.drop_top1:
        return _run_drop_top1(cfg, args)
    try:
        outcome = run_evaluation(cfg, offline=True if args.offline else None, overwrite_traces=args.overwrite_traces)
    except (JudgeRequirementError, EvalRunError, ValueError) as exc:
        print(f"libmoe eval: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(outcome.rows))
    print(f"\nresults: {outcome.results_path}")
    if outcome.trace_dir is not None:
        print(f"routing traces: {outcome.trace_dir}")
    print(f"lmms-eval log: {outcome.log_path}")
    return 0


def _run_drop_top1(cfg, args) -> int:
    """Evaluate twice (as is, then drop_top1=true) and print each metric's change."""
    import dataclasses

    from ..evaluation import EvalRunError, JudgeRequirementError, run_evaluation

    values = {}
    for name, extra in (("baseline", {}), ("drop_top1", {"drop_top1": True})):
        run_cfg = dataclasses.replace(cfg, output_path=cfg.output_path / name,
                                      extra_model_args={**cfg.extra_model_args, **extra})
        try:
            outcome = run_evaluation(run_cfg, offline=True if args.offline else None, overwrite_traces=True)
        except (JudgeRequirementError, EvalRunError, ValueError) as exc:
            print(f"libmoe eval ({name}): {exc}", file=sys.stderr)
            return 1
        values[name] = {(r.task, r.metric): r.value for r in outcome.rows if isinstance(r.value, (int, float))}
    print("\ntask     metric               baseline  drop-top-1    change")
    for key, base in values["baseline"].items():
        ablated = values["drop_top1"].get(key)
        if ablated is not None:
            print(f"{key[0]:<8} {key[1]:<20} {base:8.4f}  {ablated:10.4f}  {ablated - base:+8.4f}")
    return 0
