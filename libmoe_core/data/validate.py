"""Record validation: every problem names the file, line/index, record id and field.

``check_records`` looks at structure (roles, order, empty answers, ``<image>`` count vs
images), image files (missing / unreadable) and, given a tokenizer and template, the
length after image-token expansion. ``apply_policy`` turns a report into the records to
train on: ``error`` (default) raises, ``skip`` drops bad records and logs how many.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..images import to_rgb
from ..tokens import IMAGE_PLACEHOLDER, expanded_length
from .records import LoadResult, Problem, Record, count_placeholders, read_records
from .templates import get_template, normalize_turns

POLICIES = ("error", "skip")
log = logging.getLogger(__name__)


class DataValidationError(ValueError):
    """Raised by the ``error`` policy; the message is the full report."""


@dataclass
class Report:
    """Outcome of a check: how many records were read and every problem found."""

    files: list[str]
    n_records: int
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_keys(self) -> set[tuple[str, int]]:
        """``(file, index)`` of every record with a problem."""
        return {(p.file, p.index) for p in self.problems if p.index is not None}

    def format(self, limit: int | None = None) -> str:
        bad = len({(p.file, p.index, p.line) for p in self.problems})
        head = (f"checked {self.n_records} records in {', '.join(self.files)}: "
                + ("no problems" if self.ok else f"{len(self.problems)} problems in {bad} records/lines"))
        lines = [head] + [f"  note: {n}" for n in self.notes]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  {p}" for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def image_path(image_folder: str | Path | None, rel: str) -> Path:
    """Where an image of a record lives (absolute paths are kept as they are)."""
    p = Path(rel)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p


def image_problem(path: Path, decode: bool = False) -> str | None:
    """Why ``path`` is not a usable image, or ``None``. ``decode`` reads every pixel."""
    from PIL import Image

    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            if decode:
                to_rgb(im)  # every pixel, and a mode whose range is unknown
            else:
                im.verify()
    except Exception as e:  # noqa: BLE001 (PIL raises many types for bad files)
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    return None


def check_structure(rec: Record) -> list[Problem]:
    """Id, image field, roles and order, empty answers, ``<image>`` count."""
    out: list[Problem] = []
    if rec.id is None:
        out.append(rec.problem("missing 'id'", "id"))
    img = rec.data.get("image")
    if img is not None and not (isinstance(img, str) or (isinstance(img, list) and all(isinstance(x, str) for x in img))):
        out.append(rec.problem(f"'image' must be a string or a list of strings, got {img!r}", "image"))
        return out
    conv = rec.data.get("conversations")
    if not isinstance(conv, list) or not conv:
        out.append(rec.problem("'conversations' must be a non-empty list", "conversations"))
        return out
    try:
        turns = normalize_turns(conv)
    except ValueError as e:
        out.append(rec.problem(str(e), "conversations"))
        return out
    if turns[-1][0] != "assistant":
        out.append(rec.problem("last turn is not from gpt (nothing to learn)", "conversations"))
    for i, (role, text) in enumerate(turns):
        if role == "assistant" and not text.strip():
            out.append(rec.problem(f"turn {i}: empty answer", f"conversations[{i}].value"))
        if role != "user" and IMAGE_PLACEHOLDER in text:
            out.append(rec.problem(f"turn {i}: {IMAGE_PLACEHOLDER} outside a human turn", f"conversations[{i}].value"))
    n_ph, n_img = count_placeholders(rec), len(rec.images)
    if n_ph != n_img:
        out.append(rec.problem(f"{n_ph} {IMAGE_PLACEHOLDER} placeholders but {n_img} images", "image"))
    return out


def check_images(rec: Record, image_folder: str | Path | None, decode: bool = False) -> list[Problem]:
    """Missing or unreadable image files of one record (relative paths only with an image folder)."""
    out = []
    for i, rel in enumerate(rec.images):
        if image_folder is None and not Path(rel).is_absolute():
            continue  # nothing to resolve it against: check_file notes it
        msg = image_problem(image_path(image_folder, rel), decode)
        if msg:
            out.append(rec.problem(msg, "image" if isinstance(rec.data.get("image"), str) else f"image[{i}]"))
    return out


def check_length(rec: Record, tokenizer, template: str, max_length: int, num_image_tokens: int) -> list[Problem]:
    """Render with the template; flag rendering errors and samples over ``max_length``."""
    try:
        ids, _ = get_template(template).render(rec.conversations, tokenizer)
    except ValueError as e:
        return [rec.problem(f"template {template!r}: {e}", "conversations")]
    n = expanded_length(len(ids), len(rec.images), num_image_tokens)
    if n > max_length:
        return [rec.problem(f"{n} tokens after image expansion > max length {max_length}", "conversations")]
    return []


def check_records(
    records: list[Record],
    image_folder: str | Path | None = None,
    *,
    check_image_files: bool = True,
    decode: bool = False,
    tokenizer=None,
    template: str | None = None,
    max_length: int | None = None,
    num_image_tokens: int = 1,
) -> list[Problem]:
    """All problems of ``records`` (structure first; images and length only if the structure is sound)."""
    problems: list[Problem] = []
    for rec in records:
        found = check_structure(rec)
        if not found and check_image_files:
            found += check_images(rec, image_folder, decode)
        if not found and tokenizer is not None and template and max_length:
            found += check_length(rec, tokenizer, template, max_length, num_image_tokens)
        problems += found
    return problems


def check_file(path: str | Path, image_folder: str | Path | None = None, **options) -> tuple[LoadResult, Report]:
    """Read and check one record file; ``options`` go to :func:`check_records`."""
    loaded = read_records(path)
    report = Report([str(path)], len(loaded.records), list(loaded.problems))
    report.problems += check_records(loaded.records, image_folder, **options)
    if image_folder is None and any(r.data.get("image") for r in loaded.records):
        report.notes.append("no image folder given: relative image paths not checked")
    if options.get("tokenizer") is None:
        report.notes.append("no tokenizer given: lengths not checked")
    return loaded, report


DEFAULT_MAX_SKIPPED_FRACTION = 0.1


def apply_policy(loaded: LoadResult, report: Report, policy: str = "error",
                 logger: logging.Logger | None = None,
                 max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION) -> list[Record]:
    """Records to use. ``error``: raise :class:`DataValidationError` on any problem.
    ``skip``: drop the bad records (malformed lines are already absent) and log the count; dropping
    more than ``max_skipped_fraction`` of the records and lines (1.0: any share but all) is an error:
    a wrong or partly missing image folder is not a few bad records."""
    if policy not in POLICIES:
        raise ValueError(f"unknown data policy {policy!r}; choose one of {POLICIES}")
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction!r}")
    if report.ok:
        return list(loaded.records)
    unreadable = [p for p in report.problems if p.whole_file]
    if unreadable:  # under every policy: skipping drops bad records, not whole files
        head = f"cannot use {len(unreadable)} annotation file(s) as a whole (no data policy skips a whole file):"
        raise DataValidationError("\n".join([head, *(f"  {p}" for p in unreadable)]))
    if policy == "error":
        raise DataValidationError(report.format(limit=50) + "\n(data_policy 'skip' drops these records and counts them: "
                                  "`--set data_policy=skip` in training, or the notebooks' data_policy parameter)")
    bad = report.bad_keys
    kept = [r for r in loaded.records if (r.file, r.index) not in bad]
    if not kept:  # nothing to train on is a configuration error (a wrong image folder, a truncated file)
        raise DataValidationError(report.format(limit=20) + "\ndata policy 'skip' dropped every record: "
                                  "nothing is left to train on (wrong image folder or a truncated file?)")
    total = len(loaded.records) + len(loaded.problems)
    dropped = total - len(kept)
    if dropped / total > max_skipped_fraction:
        raise DataValidationError(
            report.format(limit=20) + f"\ndata policy 'skip' would drop {dropped} of {total} records and lines "
            f"({dropped / total:.1%}), more than max_skipped_fraction={max_skipped_fraction:g}: check the image "
            "folder and the files, or raise max_skipped_fraction to train on the rest")
    (logger or log).warning("data policy 'skip': dropped %d of %d records, %d unparsable lines\n%s",
                            len(loaded.records) - len(kept), len(loaded.records),
                            len(loaded.problems), report.format(limit=20))
    return kept
