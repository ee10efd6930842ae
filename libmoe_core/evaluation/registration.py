"""Registration of the libmoe model classes with lmms-eval (entry-point group ``lmms_eval.models``).

lmms-eval 0.7.3 builds its model registry when ``lmms_eval.models`` is imported: it loads
every entry point of the group ``lmms_eval.models`` and accepts a ``ModelManifest``, an
iterable of them, or a callable returning either. pyproject.toml declares::

    [project.entry-points."lmms_eval.models"]
    libmoe = "libmoe_core.evaluation.registration:lmms_eval_manifests"

Only class *paths* are registered; a class is imported when a run asks for its model
name, so registering ``libmoe`` costs nothing for other runs.
"""

from __future__ import annotations

__all__ = ["MODEL_CLASSES", "entry_point_registered", "lmms_eval_manifests", "register_with_lmms_eval"]

ENTRY_POINT_GROUP = "lmms_eval.models"

#: lmms-eval model name -> class path (simple, i.e. non-chat, models).
MODEL_CLASSES: dict[str, str] = {
    "libmoe": "libmoe_core.evaluation.lmms_model.LibMoE",
    "libmoe_toy": "libmoe_core.evaluation.toy_model.ToyLibMoE",
}


def lmms_eval_manifests():
    """The ``ModelManifest`` list lmms-eval loads through the entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODEL_CLASSES.items()]


def register_with_lmms_eval() -> None:
    """Register the manifests into lmms-eval's live registry (for runs without the entry point)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in lmms_eval_manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def entry_point_registered(model: str) -> bool:
    """Whether an installed ``lmms_eval.models`` entry point of this package declares ``model``.

    Checked from the package metadata (no lmms-eval import): true when the installed
    distribution points the group at :func:`lmms_eval_manifests` and ``model`` is ours.
    """
    from importlib.metadata import entry_points

    if model not in MODEL_CLASSES:
        return False
    target = f"{__name__}:lmms_eval_manifests"
    return any(ep.value.replace(" ", "") == target for ep in entry_points(group=ENTRY_POINT_GROUP))
