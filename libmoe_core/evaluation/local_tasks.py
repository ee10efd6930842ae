"""Prepare the lmms-eval tasks shipped with libmoe-kit so that ``--include_path`` can load them.

lmms-eval reads a local dataset through ``dataset_path: json`` and
``dataset_kwargs.data_files``, which must name an existing file. The shipped YAMLs
(``libmoe_core/evaluation/tasks/<task>/<task>.yaml``) are templates: preparing a task
generates its data file into ``<root>/<task>/`` and writes a copy of the YAML there whose
``data_files`` is that file's absolute path. ``<root>`` is then the include path::

    python -m libmoe_core.evaluation.local_tasks /tmp/lmms_tasks   # prints the include path
    python -m lmms_eval --include_path /tmp/lmms_tasks --tasks easyvqa ...

``libmoe eval`` does this by itself (``<output_path>/lmms_tasks``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from .benchmarks import LOCAL_TASKS

__all__ = ["TASKS_DIR", "easyvqa_records", "prepare_easyvqa", "prepare_local_tasks", "write_jsonl"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def easyvqa_records() -> list[dict]:
    """The easy-VQA test split (package ``easy-vqa``) as flat task documents."""
    from easy_vqa import get_test_image_paths, get_test_questions

    from .tasks.easyvqa.utils import question_type

    questions, answers, image_ids = get_test_questions()
    image_paths = get_test_image_paths()
    records = []
    for doc_id, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        path = image_paths.get(image_id)
        if path is None:
            raise KeyError(f"easy_vqa test question {doc_id} names image {image_id}, which has no file")
        records.append(
            {
                "doc_id": doc_id,
                "image_id": int(image_id),
                "image_path": str(Path(path).resolve()),
                "question": question,
                "answer": answer,
                "question_type": question_type(question),
            }
        )
    return records


def write_jsonl(records: Iterable[dict], path: Path) -> Path:
    """Write one JSON object per line (atomically: a partial file never has the final name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def _write_task_yaml(task: str, data_file: Path, out_dir: Path) -> Path:
    """Copy the shipped ``<task>.yaml`` into ``out_dir`` with ``test:`` pointing at ``data_file``."""
    template = TASKS_DIR / task / f"{task}.yaml"
    text = template.read_text(encoding="utf-8")
    pattern = re.compile(rf"^(\s+test:\s*){re.escape(data_file.name)}\s*$", re.MULTILINE)
    text, count = pattern.subn(lambda m: f"{m.group(1)}{json.dumps(str(data_file.resolve()))}", text)
    if count != 1:
        raise ValueError(f"{template}: expected one 'test: {data_file.name}' line under data_files, found {count}")
    out = out_dir / template.name
    out.write_text(text, encoding="utf-8")
    return out


def _first_image_exists(data_file: Path) -> bool:
    with data_file.open(encoding="utf-8") as f:
        line = f.readline()
    try:
        return Path(json.loads(line)["image_path"]).is_file()
    except (ValueError, KeyError, TypeError):
        return False


def prepare_easyvqa(root: str | os.PathLike) -> Path:
    """Write ``<root>/easyvqa/easyvqa_test.jsonl`` and ``easyvqa.yaml``; return the YAML path.

    The data file is rewritten only when missing or when its images moved (another venv).
    """
    out_dir = Path(root) / "easyvqa"
    data_file = out_dir / "easyvqa_test.jsonl"
    if not data_file.exists() or not _first_image_exists(data_file):
        write_jsonl(easyvqa_records(), data_file)
    return _write_task_yaml("easyvqa", data_file, out_dir)


_PREPARERS: dict[str, Callable[[Path], Path]] = {"easyvqa": prepare_easyvqa}
assert set(_PREPARERS) == set(LOCAL_TASKS)


def prepare_local_tasks(tasks: Iterable[str], root: str | os.PathLike) -> Path | None:
    """Prepare the libmoe-kit tasks among ``tasks`` under ``root``; return ``root`` (the include
    path) or ``None`` when none of ``tasks`` is a local task."""
    wanted = [t for t in tasks if t in _PREPARERS]
    if not wanted:
        return None
    root = Path(root).resolve()
    for task in wanted:
        _PREPARERS[task](root)
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m libmoe_core.evaluation.local_tasks DIR [TASK ...]``: prepare, print the include path."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    root = prepare_local_tasks(argv[1:] or LOCAL_TASKS, argv[0])
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
