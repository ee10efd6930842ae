"""``libmoe pipeline``: the stage notebooks in order, through papermill (see libmoe_core.pipeline.runner).

    python runners/pipeline.py --preset tiny --router smoe --router sigmoid --run-name demo
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny",
                        help="model preset (tiny, or a hub preset listed in docs/model.md); a hub preset's local copies go in with "
                        "--set pretrain.vision_path=DIR --set pretrain.llm_path=DIR")
    parser.add_argument("--router", dest="routers", action="append", help="router for the sft stage (repeatable)")
    parser.add_argument("--stages", default="pretrain,pft,sft,eval,analysis", help="comma-separated subset, in order")
    parser.add_argument("--run-name", default="default", help="run folder under --runs-root")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.PARAM=VALUE",
                        help="notebook parameter of one stage (pretrain, pft, sft, eval, analysis), e.g. "
                        "sft.max_steps=2, eval.limit=200, analysis.max_load_ratio=1.5 (each analysis notebook that "
                        "takes it); an unknown stage or parameter is an error; relative paths are from the current "
                        "directory (repeatable)")
    parser.add_argument("--cell-timeout", type=float, default=None, metavar="SECONDS",
                        help="fail a step whose notebook cell runs longer (default: no limit)")
    parser.add_argument("--timeout-retries", type=int, default=0, metavar="N",
                        help="run a step whose cell timed out again, up to N times (a training step resumes from "
                        "its last complete checkpoint)")
    parser.add_argument("--clear-outdated", action="store_true",
                        help="delete the checkpoints, metrics and model of a training step made from an older "
                        "upstream model, or with settings a resume cannot change, before training it again "
                        "(default: stop and name it)")


def parse_stage_overrides(items: list[str]) -> dict[str, dict]:
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--set expects STAGE.PARAM=VALUE, got {item!r}")
        out.setdefault(stage, {})[name] = yaml.safe_load(raw)
    return out


def run(args) -> int:
    from libmoe_core.pipeline.runner import execute, plan_pipeline, report

    try:
        plan = plan_pipeline(
            preset=args.preset, routers=args.routers or ["smoe", "sigmoid"], stages=args.stages.split(","),
            run_name=args.run_name, runs_root=args.runs_root, stage_parameters=parse_stage_overrides(args.overrides),
        )
        code = execute(plan, cell_timeout=args.cell_timeout, timeout_retries=args.timeout_retries,
                       clear_outdated=args.clear_outdated)
    except ValueError as err:  # a bad --stages, --router, --set, --cell-timeout or --timeout-retries
        print(f"libmoe pipeline: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("libmoe pipeline: interrupted; run the same command again to continue (a training step resumes "
              "from its last complete checkpoint)", file=sys.stderr)
        return 130
    if code == 0:
        print(report(plan))
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
