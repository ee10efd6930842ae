"""``libmoe pipeline``: run the stage notebooks in order (resumable), one sft per router.

The command's arguments and body live in ``runners/pipeline.py`` (also runnable as a script). It is
imported as ``libmoe_core.runners.pipeline`` where the package ships it (a wheel; an editable
install maps that name to the checkout's ``runners/``), else from the checkout's ``runners/`` by path
(``PYTHONPATH=<checkout>``), never as a top-level ``runners`` (a user's own folder of that name would
shadow it).
"""

from __future__ import annotations


def pipeline_module():
    """The ``runners/pipeline.py`` module of this installation."""
    import importlib
    import importlib.util
    import sys

    try:
        return importlib.import_module("libmoe_core.runners.pipeline")
    except ModuleNotFoundError as err:
        if err.name not in ("libmoe_core.runners", "libmoe_core.runners.pipeline"):
            raise
    from .._shipped import shipped_dir

    name = "libmoe_core._runners_pipeline"
    if name not in sys.modules:
        path = shipped_dir("runners") / "pipeline.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="pretrain -> pft -> sft (per router) -> eval -> analysis, as executed notebooks")
    pipeline_module().add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    return pipeline_module().run(args)
