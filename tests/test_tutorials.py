"""Tutorial notebooks are committed without outputs, on the ``python3`` kernel.

They run cell by cell under nbval in the README's test command
(``pytest tests notebooks/tutorials --nbval-lax``).
"""

import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "notebooks" / "tutorials").glob("*.ipynb"))


def test_the_tutorials_are_there():
    assert {"01_quickstart.ipynb", "02_new_router.ipynb", "03_routing_analysis.ipynb"} <= {p.name for p in TUTORIALS}


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.get("outputs") or c.get("execution_count") is not None]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3", f"{path.name}: use the python3 kernel (make setup registers it)"
    assert json.loads(path.read_text())["nbformat"] == 4
