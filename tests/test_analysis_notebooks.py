"""Analysis notebooks: committed without outputs; executed headless (papermill) on a small trace.
(The tutorials run under nbval in the README's test command.)"""

import json
from pathlib import Path

import pytest

from libmoe_core.analysis import write_demo_traces

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ANALYSIS = {
    "router_entropy": ["entropy_curves", "entropy_distribution_llm", "router_comparison"],
    "expert_collapse": ["max_load_ratio", "load_heatmap_vision", "load_heatmap_llm", "specialisation_task",
                        "specialisation_token_kind"],
    "checkpoint_trends": ["switch_rate", "router_entropy_norm_over_checkpoints", "max_load_ratio_over_checkpoints"],
}


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.rglob("*.ipynb")), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_are_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.relative_to(ROOT)}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("name", sorted(ANALYSIS))
def test_analysis_notebook_has_a_parameters_cell(name):
    nb = json.loads((NOTEBOOKS / "analysis" / f"{name}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", [])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return write_demo_traces(tmp_path_factory.mktemp("traces"), num_checkpoints=2, num_docs=4, tokens_per_doc=8,
                             num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ANALYSIS))
def test_analysis_notebook_runs_headless(name, small_run, tmp_path):
    papermill = pytest.importorskip("papermill")
    out_dir = tmp_path / "figures"
    papermill.execute_notebook(
        str(NOTEBOOKS / "analysis" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
        parameters={"traces": [str(p) for p in small_run], "out_dir": str(out_dir)},
        kernel_name="python3", progress_bar=False, execution_timeout=1200, cwd=str(tmp_path),
    )
    missing = [f for f in ANALYSIS[name] if not (out_dir / f"{f}.png").is_file()]
    assert not missing, f"{name} did not save {missing}"
    # The selectors drew into HTML views; no Output widget, whose headless emulation (the runner
    # sending its state to the kernel while it waits for the cell's reply) could miss the reply.
    nb = json.loads((tmp_path / f"{name}.ipynb").read_text())
    state = nb["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = [m["model_name"] for m in state.values()]
    assert "OutputModel" not in models
    shown = [any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in c["outputs"])
             for c in nb["cells"] if c["cell_type"] == "code" and "\nselector(" in "\n" + "".join(c["source"])]
    assert shown and all(shown), f"{name}: a selector cell shows no widget (a trailing ';'?): {shown}"
    views = [m["state"]["value"] for m in state.values() if m["model_name"] == "HTMLModel"]
    assert views and all(v.startswith(("<img src=\"data:image/png;base64,", "<table")) for v in views), views

