"""Parameters of the notebooks that do not train (evaluation, analysis): what each declares in its
``parameters`` cell, and the check that a papermill run injected no other name (a misspelt
``-p limt 5`` would otherwise be a new, unused variable and the run would go on with the default).
The training notebooks check theirs through :func:`libmoe_core.pipeline.stage.stage_config`."""

from __future__ import annotations

from .stage import notebook_parameters

#: notebook (path under ``notebooks/`` without ``.ipynb``) -> the names its ``parameters`` cell binds
NOTEBOOK_PARAMETERS: dict[str, tuple[str, ...]] = {
    "eval": ("model_path", "router", "tasks", "limit", "batch_size", "record_experts", "layers", "placements",
             "run_name", "runs_root"),
    "analysis/router_entropy": ("traces", "labels", "out_dir", "by", "placement"),
    "analysis/expert_collapse": ("traces", "out_dir", "max_load_ratio", "dead_experts", "placement", "layer"),
    "analysis/checkpoint_trends": ("traces", "out_dir", "by", "placement", "compare_method"),
}

_CHECKED = "_libmoe_parameters_checked"


def check_notebook_parameters(namespace: dict, notebook: str) -> None:
    """Raise if ``namespace`` (the notebook's ``globals()``) holds a parameter that ``notebook`` does not
    declare. Checked on the cell's first run (papermill's, right after the injected parameters); a re-run
    in Jupyter, when later cells have bound more names, is not checked again."""
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ValueError(f"no parameter list for notebook {notebook!r}; known: {sorted(NOTEBOOK_PARAMETERS)}")
    if namespace.get(_CHECKED):
        return
    declared = NOTEBOOK_PARAMETERS[notebook]
    unknown = sorted(set(notebook_parameters(namespace)) - set(declared))
    if unknown:
        raise ValueError(f"unknown {notebook} notebook parameter(s) {unknown}; it takes {sorted(declared)}")
    namespace[_CHECKED] = True


def as_list(value) -> list:
    """A list parameter as given with ``-y 'traces: [a, b]'``, or one string as ``-p traces PATH``
    passes it (papermill's ``-p`` never makes a list), as a one-item list; None and "" as empty."""
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)
