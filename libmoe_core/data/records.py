"""LLaVA-format record files: JSON list or JSONL of ``{id, image?, conversations}``.

Records are small dicts kept in memory; images are only opened when a sample is read.
Every record remembers where it came from (file, JSONL line or JSON list index), so any
problem can be reported as ``file:line record 'id'``.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..tokens import IMAGE_PLACEHOLDER
from .templates import normalize_turns


@dataclass(frozen=True)
class Problem:
    """One problem with one record (or one line of a file)."""

    file: str
    message: str
    record_id: str | None = None
    field: str | None = None
    line: int | None = None  # 1-based line in a JSONL file
    index: int | None = None  # JSON list: position in the list; JSONL: line - 1
    #: The whole file is unusable (missing, empty, or a JSON list that does not parse): no policy
    #: can skip it as a few bad records.
    whole_file: bool = False

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
        """Relative image paths (``image`` may be a string, a list of strings or absent)."""
        img = self.data.get("image")
        if img is None:
            return []
        if isinstance(img, str):
            return [img]
        if isinstance(img, list) and all(isinstance(x, str) for x in img):
            return list(img)
        raise ValueError(str(self.problem(f"'image' must be a string or a list of strings, got {img!r}", "image")))

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
    """Parse a ``.json`` (list) or ``.jsonl`` file; malformed lines become problems, not exceptions.

    A UTF-8 byte-order mark is ignored. A file of another suffix is a JSON list when it starts
    with ``[``, else JSONL. Lines end at ``\n`` only (JSON allows U+2028 inside strings). A file
    that is missing, holds no record, or is a JSON list that cannot be read is one problem with
    ``whole_file`` set."""
    result = _read_records(Path(path))
    if not result.records and not result.problems:
        result.problems.append(Problem(str(path), "no records: the file is empty (an empty JSON list, "
                                       "or no non-blank lines)", whole_file=True))
    return result


def _read_records(path: Path) -> LoadResult:
    result = LoadResult()
    name = str(path)
    if not path.is_file():
        result.problems.append(Problem(name, "file not found", whole_file=True))
        return result
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    as_list = path.suffix == ".json" or (path.suffix != ".jsonl" and raw.lstrip().startswith(b"["))
    if not as_list:
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            text = _utf8(line, name, result, lineno)
            if text is None:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                result.problems.append(Problem(name, f"malformed JSON: {e.msg} (column {e.colno})", line=lineno))
                continue
            _add(result, obj, name, lineno - 1, lineno)
        return result
    text = _utf8(raw, name, result, None)
    if text is None:  # a JSON list is read whole or not at all
        result.problems[-1] = replace(result.problems[-1], whole_file=True)
        return result
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        result.problems.append(Problem(name, f"malformed JSON: {e.msg} (column {e.colno}){hint}; none of the "
                                       "file's records can be read", line=e.lineno, whole_file=True))
        return result
    if not isinstance(items, list):
        result.problems.append(Problem(name, f"expected a JSON list of records, got {type(items).__name__}",
                                       whole_file=True))
        return result
    for i, obj in enumerate(items):
        _add(result, obj, name, i, None)
    return result


def _utf8(data: bytes, name: str, result: LoadResult, line: int | None) -> str | None:
    """``data`` decoded, or None with a problem naming the line and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data.count(b"\n", 0, e.start) + 1
        result.problems.append(Problem(name, f"not UTF-8: byte 0x{data[e.start]:02x} (save the file as UTF-8)", line=at))
        return None


def _add(result: LoadResult, obj, name: str, index: int, line: int | None) -> None:
    if not isinstance(obj, dict):
        result.problems.append(Problem(name, f"record is a {type(obj).__name__}, not an object", line=line,
                                       index=index))
        return
    result.records.append(Record(obj, name, index, line))


def count_placeholders(record: Record) -> int:
    """Number of ``<image>`` placeholders in the user turns, read as the templates read them
    (``{from, value}`` or ``{role, content}``, roles in any case); 0 for conversations the
    templates cannot read (the structure check reports those)."""
    try:
        turns = normalize_turns(record.conversations)
    except ValueError:
        return 0
    return sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")


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
