"""lmms-eval task definitions shipped with libmoe-kit (YAML + their ``utils`` modules).

The YAMLs reference their functions by absolute module path
(``!function libmoe_core.evaluation.tasks.<task>.utils.<fn>``), so a prepared copy of a
YAML works from any directory. Prepare runnable copies with
:func:`libmoe_core.evaluation.local_tasks.prepare_local_tasks`; do not pass this package
directory itself to ``--include_path`` (its data files are generated elsewhere).
"""
