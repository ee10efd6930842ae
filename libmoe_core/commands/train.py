"""``libmoe train``: run one training stage under DeepSpeed."""

import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="train one stage (pretrain | pft | sft) under DeepSpeed")
    p.add_argument("--stage", required=True, choices=["pretrain", "pft", "sft"])
    p.add_argument("--config", help="YAML file of training config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set router=sigmoid --set max_steps=2")
    p.add_argument("--num-procs", type=int, help="processes (GPUs, or CPU workers) on this node; with --hostfile its slots= set the processes")
    p.add_argument("--zero", choices=["2", "3", "3-offload"], help="DeepSpeed ZeRO stage")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node runs (passed to the launcher)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import parse_overrides, resolve_config
    from ..train.launch import TrainingFailed, launch
    from ..train.stage_folder import StageFolderError

    try:
        overrides = parse_overrides(args.overrides)
        for key, value in (("num_procs", args.num_procs), ("zero_stage", args.zero), ("hostfile", args.hostfile)):
            if value is not None:
                overrides[key] = value
        cfg = resolve_config(args.stage, args.config, overrides)
        final = launch(cfg, resume=args.resume)
    except TrainingFailed as err:
        print(f"\nlibmoe train: {err}")
        return 1
    except (ValueError, OSError, StageFolderError) as err:  # bad config, missing file, busy or earlier run
        print(f"libmoe train: error: {err}", file=sys.stderr)
        return 2
    print(f"\nlibmoe train: {cfg.stage} finished; model in {final}")
    return 0
