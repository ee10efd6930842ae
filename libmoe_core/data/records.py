"""LLaVA-format record files: JSON list or JSONL of ``{id, image?, conversations}``.

Records are small dicts kept in memory; images are only opened when a sample is read.
Every record remembers where it came from (file, JSONL line or JSON list index), so any
problem can be reported as ``file:line record 'id'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..tokens import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class Problem:
    """One problem with one record (or one line of a file)."""

    file: str
    message: str
    record_id: str | None = None
    field: str | None = None
    line: int | None = None  # 1-based line in a JSONL file
    index: int | None = None  # JSON list: position in the list; JSONL: line - 1

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        who = f" record {self.record_id!r}" if self.record_id is not None else ""
        pos = f" (#{self.index})" if self.index is not None and self.line is None else ""
        fld = f" [{self.field}]" if self.field else ""
        return f"{where}{who}{pos}{fld}: {self.message}"


@dataclass
class Record:
    """A parsed record and its origin."""

    data: dict
    file: str
    index: int
    line: int | None = None

    @property
    def id(self) -> str | None:
        rid = self.data.get("id") if isinstance(self.data, dict) else None
        return None if rid is None else str(rid)

    @property
    def images(self) -> list[str]:
        """Relative image paths (``image`` may be a string, a list or absent)."""
        img = self.data.get("image")
        if img is None:
            return []
        return [img] if isinstance(img, str) else list(img)

    @property
    def conversations(self) -> list[dict]:
        return self.data.get("conversations") or []

    def problem(self, message: str, field: str | None = None) -> Problem:
        return Problem(self.file, message, record_id=self.id, field=field, line=self.line, index=self.index)


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def read_records(path: str | Path) -> LoadResult:
    """Parse a ``.json`` (list) or ``.jsonl`` file; malformed lines become problems, not exceptions."""
    path = Path(path)
    result = LoadResult()
    name = str(path)
    if not path.is_file():
        result.problems.append(Problem(name, "file not found"))
        return result
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and not stripped.startswith("[")):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                result.problems.append(Problem(name, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno))
                continue
            _add(result, obj, name, lineno - 1, lineno)
        return result
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        result.problems.append(Problem(name, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno))
        return result
    if not isinstance(items, list):
        result.problems.append(Problem(name, f"expected a JSON list of records, got {type(items).__name__}"))
        return result
    for i, obj in enumerate(items):
        _add(result, obj, name, i, None)
    return result


def _add(result: LoadResult, obj, name: str, index: int, line: int | None) -> None:
    if not isinstance(obj, dict):
        result.problems.append(Problem(name, f"record is a {type(obj).__name__}, not an object", line=line,
                                       index=index))
        return
    result.records.append(Record(obj, name, index, line))


def count_placeholders(record: Record) -> int:
    """Number of ``<image>`` placeholders in the human turns."""
    return sum(str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in record.conversations
               if isinstance(t, dict) and t.get("from", t.get("role")) in ("human", "user"))


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write records as a JSON list (``.json``) or one object per line (``.jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")
    return path
