"""``libmoe pipeline``: run the stage notebooks in order (resumable), one sft per router."""


def register(sub) -> None:
    from runners.pipeline import add_arguments

    p = sub.add_parser("pipeline", help="pretrain -> pft -> sft (per router) -> eval -> analysis, as executed notebooks")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from runners.pipeline import run as run_pipeline

    return run_pipeline(args)
