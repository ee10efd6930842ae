"""Where the kit's top-level folders are: ``notebooks/``, ``runners/``, ``data_manifests/``.

A checkout (``pip install -e .``, or ``PYTHONPATH=<checkout>``) keeps them at the top of the
repository, beside ``libmoe_core/``. A wheel (``pip install .``, ``pip install git+...``) ships them
inside the package, as ``libmoe_core/notebooks`` etc. (pyproject.toml's ``package-dir``).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED = ("notebooks", "runners", "data_manifests")


def shipped_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`SHIPPED`): the package's copy if present, else the checkout's."""
    if name not in SHIPPED:
        raise ValueError(f"shipped_dir: unknown folder {name!r} (one of {', '.join(SHIPPED)})")
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"libmoe-kit: the {name}/ folder is missing: neither {PACKAGE_DIR / name} (installed from a wheel) "
        f"nor {PACKAGE_DIR.parent / name} (a checkout) exists; reinstall libmoe-kit "
        "(`pip install --force-reinstall libmoe-kit`) or use a complete checkout (`pip install -e .`)")
