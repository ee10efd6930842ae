"""The evaluation and analysis notebooks refuse a parameter they do not declare (a misspelt ``-p``)."""

import papermill
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from libmoe_core.pipeline.notebook_params import NOTEBOOK_PARAMETERS, as_list, check_notebook_parameters
from libmoe_core.pipeline.runner import NOTEBOOK_DIR


@pytest.mark.parametrize("name", sorted(NOTEBOOK_PARAMETERS))
def test_the_declared_names_are_the_parameters_cell(name):
    assert set(papermill.inspect_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"))) == set(NOTEBOOK_PARAMETERS[name])


def _run_cells(nb, namespace, count):
    for cell in [c for c in nb.cells if c.cell_type == "code"][:count]:
        exec(cell.source, namespace)  # noqa: S102


@pytest.mark.parametrize(("name", "typo"), [("eval", "limt"), ("analysis/router_entropy", "placment"),
                                            ("analysis/expert_collapse", "dead_expert"),
                                            ("analysis/checkpoint_trends", "method")])
def test_a_misspelt_parameter_stops_the_notebook_before_it_works(name, typo, monkeypatch, tmp_path):
    from libmoe_core.pipeline import evaluate

    def must_not_run(*args, **kwargs):
        raise AssertionError("the notebook went on past its parameters")

    monkeypatch.setattr(evaluate, "run_eval_stage", must_not_run)
    monkeypatch.chdir(tmp_path)
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / f"{name}.ipynb")), {typo: 5})
    with pytest.raises(ValueError, match=rf"unknown {name} notebook parameter\(s\) \['{typo}'\]"):
        _run_cells(nb, {}, 3)  # parameters, injected, the first working cell


def test_papermill_inject_paths_names_are_not_parameters():
    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOK_DIR / "eval.ipynb")), {"limit": 1})
    namespace = {"PAPERMILL_INPUT_PATH": "notebooks/eval.ipynb", "PAPERMILL_OUTPUT_PATH": "out/eval.ipynb"}
    for cell in [c for c in nb.cells if c.cell_type == "code"][:2]:  # parameters, injected
        exec(cell.source, namespace)  # noqa: S102
    check_notebook_parameters(namespace, "eval")  # papermill --inject-paths: no error
    from libmoe_core.pipeline.stage import notebook_parameters

    assert "PAPERMILL_INPUT_PATH" not in notebook_parameters(namespace) and notebook_parameters(namespace)["limit"] == 1


def test_a_rerun_in_jupyter_is_not_troubled_by_later_cells_names():
    namespace = {"traces": [], "out_dir": "x", "by": None, "placement": "llm", "compare_method": "auto"}
    check_notebook_parameters(namespace, "analysis/checkpoint_trends")
    namespace.update(saved=["a.png"], names=["ckpt"])  # lists a later cell bound
    check_notebook_parameters(namespace, "analysis/checkpoint_trends")  # the cell run again: no error
    with pytest.raises(ValueError, match="unknown analysis/checkpoint_trends notebook parameter"):
        check_notebook_parameters({**namespace, "_libmoe_parameters_checked": False}, "analysis/checkpoint_trends")
    with pytest.raises(ValueError, match="no parameter list for notebook 'evl'"):
        check_notebook_parameters({}, "evl")


@pytest.mark.slow
def test_papermill_run_with_a_misspelt_parameter_fails(tmp_path):
    """The same through papermill and a real kernel (IPython's own names in the namespace)."""
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown analysis/router_entropy notebook parameter\(s\) \['placment'\]"):
        papermill.execute_notebook(str(NOTEBOOK_DIR / "analysis" / "router_entropy.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"placment": "vision", "out_dir": str(tmp_path)}, kernel_name="python3",
                                   progress_bar=False, execution_timeout=300, cwd=str(tmp_path))


def test_list_parameters_take_one_string_as_one_item():
    # papermill's -p never makes a list: `-p traces run/traces` reached the notebook as a string
    # and `traces[-1:]` read the trace "s"
    assert as_list("runs/demo/eval-smoe/traces") == ["runs/demo/eval-smoe/traces"]
    assert as_list(["a", "b"]) == ["a", "b"] and as_list(()) == []
    assert as_list(None) == [] and as_list("") == []  # `-p traces None`: the synthetic demo, as before


@pytest.mark.slow
def test_an_analysis_notebook_takes_one_trace_with_p(tmp_path):
    import nbformat

    from libmoe_core.analysis import write_demo_traces

    trace = write_demo_traces(tmp_path / "t", num_checkpoints=1, num_docs=4, tokens_per_doc=8, num_layers=2)[0]
    work = tmp_path / "work"  # nothing here: a path made of the string's last character resolves to nothing
    work.mkdir()
    nb = nbformat.read(NOTEBOOK_DIR / "analysis" / "expert_collapse.ipynb", as_version=4)
    first_figure = next(i for i, c in enumerate(nb.cells) if "max_load_ratio" in c.source and "save_figure" in c.source)
    nb.cells = nb.cells[:first_figure + 1]  # up to the first figure: no widget cells (the test is about traces)
    nbformat.write(nb, tmp_path / "expert_collapse.ipynb")
    papermill.execute_notebook(str(tmp_path / "expert_collapse.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"traces": str(trace), "out_dir": str(tmp_path / "fig")},
                               kernel_name="python3", progress_bar=False, execution_timeout=600, cwd=str(work))
    assert (tmp_path / "fig" / "max_load_ratio.png").is_file()


def _parameters_cell(path):
    cells = [c for c in load_notebook_node(str(path)).cells if "parameters" in c.metadata.get("tags", [])]
    return cells[0] if cells else None


@pytest.mark.parametrize("path", [p for p in sorted(NOTEBOOK_DIR.rglob("*.ipynb")) if _parameters_cell(p) is not None],
                         ids=lambda p: p.relative_to(NOTEBOOK_DIR).as_posix())
def test_papermill_reads_every_name_of_the_parameters_cell(path):
    """The pipeline learns a notebook's parameters from papermill's inspection, which skips a line it
    cannot parse (a comment holding ``=`` hid ``max_steps``, and ``--set sft.max_steps=2`` was then
    refused). Oracle: the names the parameters cell assigns, read with ast."""
    import ast

    from papermill.inspection import inspect_notebook

    assigned = {t.id for node in ast.parse(_parameters_cell(path).source).body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    assert assigned and set(inspect_notebook(str(path))) == assigned
