"""Packaging: the wheel's explicit package list, the shipped folders, the torchvision import check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_names_every_subpackage():
    """A folder of libmoe_core/ with an __init__.py that pyproject's `packages` leaves out would be missing
    from the wheel (an editable install would not show it)."""
    listed = set(_setuptools_config()["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "libmoe_core").rglob("__init__.py")
               if "__pycache__" not in init.parts}
    assert "libmoe_core.model" in on_disk
    assert sorted(on_disk - listed) == []


def _folder(package: str, mapping: dict) -> Path:
    """The source folder of ``package`` under pyproject's ``package-dir`` mapping."""
    for prefix in sorted(mapping, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return ROOT / mapping[prefix] / Path(*package[len(prefix):].split(".")[1:])
    return ROOT / Path(*package.split("."))


def test_shipped_folders_go_into_the_wheel_with_every_file():
    """notebooks/, runners/ and data_manifests/ go into the wheel as libmoe_core.<name>: each of their
    folders is a listed package and each file matches a package-data glob (or is a module)."""
    from libmoe_core._shipped import SHIPPED

    config = _setuptools_config()
    mapping, data, listed = config["package-dir"], config["package-data"], config["packages"]
    assert {mapping[f"libmoe_core.{name}"] for name in SHIPPED} == set(SHIPPED)
    for name in SHIPPED:
        tracked = [p for p in (ROOT / name).rglob("*") if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)]
        for folder in [ROOT / name] + [p for p in tracked if p.is_dir()]:
            package = ".".join(["libmoe_core", *folder.relative_to(ROOT).parts])
            assert package in listed, f"{folder} is not in pyproject's packages"
            assert _folder(package, mapping) == folder
            for f in [p for p in folder.iterdir() if p.is_file() and p.suffix != ".pyc"]:
                assert f.suffix == ".py" or any(f.match(g) for g in data.get(package, [])), f"{f} is not shipped"


def test_every_data_file_of_the_package_is_shipped():
    """A data file of libmoe_core/ (tokenizer assets, DeepSpeed configs, task YAMLs) that no package-data glob
    names would be missing from the wheel while the checkout's tests pass."""
    data, listed = _setuptools_config()["package-data"], set(_setuptools_config()["packages"])
    files = [f for f in (ROOT / "libmoe_core").rglob("*")
             if f.is_file() and f.suffix not in (".py", ".pyc") and "__pycache__" not in f.parts]
    assert any(f.name == "zero2.json" for f in files)
    for f in files:
        owners = [".".join(f.relative_to(ROOT).parts[:n]) for n in range(len(f.relative_to(ROOT).parts) - 1, 0, -1)]
        package = next(o for o in owners if o in listed)  # the innermost listed package holding the file
        relative = f.relative_to(ROOT / Path(*package.split(".")))
        assert any(relative.match(g) for g in data.get(package, [])), f"{f} matches no package-data glob"


def test_shipped_dir_is_the_checkout_folder_here():
    from libmoe_core._shipped import shipped_dir
    from libmoe_core.data.manifests import MANIFEST_DIR
    from libmoe_core.pipeline.runner import NOTEBOOK_DIR
    from libmoe_core.train.launch import TRAIN_ENTRY

    assert NOTEBOOK_DIR == ROOT / "notebooks" == shipped_dir("notebooks")
    assert MANIFEST_DIR == ROOT / "data_manifests"
    assert TRAIN_ENTRY == ROOT / "runners" / "train.py"


def test_shipped_dir_prefers_the_package_copy_and_names_both_places(tmp_path, monkeypatch):
    from libmoe_core import _shipped

    package = tmp_path / "site" / "libmoe_core"
    (package / "runners").mkdir(parents=True)
    monkeypatch.setattr(_shipped, "PACKAGE_DIR", package)
    assert _shipped.shipped_dir("runners") == package / "runners"
    with pytest.raises(FileNotFoundError) as err:
        _shipped.shipped_dir("notebooks")
    assert str(package / "notebooks") in str(err.value) and str(tmp_path / "site" / "notebooks") in str(err.value)


def test_pipeline_command_imports_runners_pipeline_without_a_top_level_runners(tmp_path):
    """`libmoe pipeline` never imports a top-level `runners` (a user's folder of that name must not shadow it)."""
    shadow = tmp_path / "runners"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise RuntimeError('the user\\'s own runners package was imported')\n")
    code = "from libmoe_core.cli import build_parser; build_parser().parse_args(['pipeline', '--help'])"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert out.returncode == 0, out.stderr
    assert "--preset" in out.stdout


def test_broken_torchvision_is_named(tmp_path):
    """An installed torchvision that fails to import (PyPI's wheel next to another torch build) stops
    `import libmoe_core` with an error naming it, the torch version and the fix."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(textwrap.dedent("""\
        raise RuntimeError("operator torchvision::nms does not exist")
    """))
    code = textwrap.dedent("""\
        import torch
        try:
            import libmoe_core
        except ImportError as err:
            print("ERR", err)
            print("TORCH", torch.__version__)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert out.returncode == 0, out.stderr
    err = out.stdout.split("ERR ", 1)[1].split("\nTORCH ")[0]
    torch_version = out.stdout.split("TORCH ", 1)[1].strip()
    assert "torchvision" in err and "operator torchvision::nms does not exist" in err
    assert f"torch {torch_version}" in err
    assert "pip uninstall torchvision" in err
