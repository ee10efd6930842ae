"""Lazy LLaVA-format dataset: records in memory, images opened only in ``__getitem__``."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from ..images import to_rgb
from .records import LoadResult, Record, read_records
from .validate import DEFAULT_MAX_SKIPPED_FRACTION, Report, apply_policy, check_records, image_path


class LLaVADataset(Dataset):
    """Samples ``{"id", "conversations", "images": [PIL.Image RGB], "record"}``.

    Build it with :meth:`from_files` (validates and applies the data policy) or directly
    from already checked :class:`Record` objects / plain dicts.
    """

    def __init__(self, records: list[Record] | list[dict], image_folder: str | Path | None = None,
                 image_length: int = 576):
        self.records = [r if isinstance(r, Record) else Record(r, "<memory>", i) for i, r in enumerate(records)]
        self.image_folder = image_folder
        self.image_length = image_length  # tokens one image adds, for the length estimate
        self.report: Report | None = None

    @classmethod
    def from_files(cls, paths: str | Path | list[str | Path], image_folder: str | Path | None = None, *,
                   policy: str = "error", check_image_files: bool = True, decode: bool = False, tokenizer=None,
                   template: str | None = None, max_length: int | None = None, num_image_tokens: int = 1,
                   image_length: int | None = None, logger: logging.Logger | None = None,
                   max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION) -> LLaVADataset:
        """Read, validate (see :func:`~libmoe_core.data.validate.check_records`) and apply ``policy``
        (:func:`~libmoe_core.data.validate.apply_policy`)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:  # a wrong path is a configuration error under every policy, not a bad record
            raise FileNotFoundError(f"annotation file(s) not found: {', '.join(missing)}")
        loaded = LoadResult()
        for p in paths:
            one = read_records(p)
            loaded.records += one.records
            loaded.problems += one.problems
        if image_folder is None and check_image_files:
            _refuse_relative_images(loaded.records)
        report = Report([str(p) for p in paths], len(loaded.records), list(loaded.problems))
        report.problems += check_records(loaded.records, image_folder, check_image_files=check_image_files,
                                         decode=decode, tokenizer=tokenizer, template=template,
                                         max_length=max_length, num_image_tokens=num_image_tokens)
        kept = apply_policy(loaded, report, policy, logger, max_skipped_fraction)
        if image_length is None:
            image_length = num_image_tokens if num_image_tokens > 1 else 576
        ds = cls(kept, image_folder, image_length)
        ds.report = report
        return ds

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        rec = self.records[i]
        images = []
        for rel in rec.images:
            path = image_path(self.image_folder, rel)
            try:
                with Image.open(path) as im:
                    images.append(to_rgb(im))
            except Exception as e:
                raise OSError(f"{rec.file}: record {rec.id!r}: cannot read image {path}: {e}") from e
        return {"id": rec.id, "conversations": rec.conversations, "images": images, "record": rec.data}

    @property
    def lengths(self) -> list[int]:
        """Rough length of each sample: words of all turns plus ``image_length`` per image."""
        return [_words(r) + self.image_length * len(r.images) for r in self.records]

    @property
    def modality_lengths(self) -> list[int]:
        """``lengths`` signed by modality: positive with images, negative for text-only samples."""
        return [n if r.images else -n for n, r in zip(self.lengths, self.records)]


def _refuse_relative_images(records: list[Record]) -> None:
    """Relative image paths need an image folder: without one they could not be checked up front
    and would be read from the working directory. A configuration error under every data policy."""
    relative = [(r, rel) for r in records for rel in _images_or_none(r) if not Path(rel).is_absolute()]
    if relative:
        rec, rel = relative[0]
        raise ValueError(f"{rec.file}: record {rec.id!r} has the relative image path {rel!r} "
                         f"({len(relative)} relative path(s) in all) but no image folder was given; "
                         "set image_folder (the folder those paths are relative to)")


def _images_or_none(rec: Record) -> list[str]:
    """The record's image paths; none for a malformed ``image`` field (the structure check reports it)."""
    try:
        return rec.images
    except ValueError:
        return []


def _words(rec: Record) -> int:
    return max(1, sum(len(str(t.get("value", t.get("content", ""))).split()) for t in rec.conversations))
