"""Dataset manifests (``data_manifests/*.yaml``): what to download, where it goes, what to expect.

A manifest names its downloads (a Hugging Face hub file or pattern, or a plain URL, or
a manual step), the annotation files with their expected record counts, the image
folder the annotations' paths are relative to, and the folder layout. All paths are
relative to a data root chosen by the user. ``verify`` checks a local copy;
``prepare`` downloads (online) or says exactly what to fetch (offline).
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .._shipped import shipped_dir
from .records import read_records
from .validate import check_structure, image_problem

MANIFEST_DIR = shipped_dir("data_manifests")


class ManifestError(ValueError):
    """A manifest that cannot be found or parsed, or whose structure is wrong (:func:`manifest_problems`)."""


class PrepareError(RuntimeError):
    """Downloading is impossible (offline, manual source, network failure); says what to fetch."""


@dataclass
class Manifest:
    name: str
    path: Path
    data: dict

    @property
    def downloads(self) -> list[dict]:
        return list(self.data.get("downloads") or [])

    @property
    def annotations(self) -> list[dict]:
        return list(self.data.get("annotations") or [])

    @property
    def layout(self) -> list[dict]:
        return list(self.data.get("layout") or [])

    @property
    def requires(self) -> list[str]:
        return list(self.data.get("requires") or [])

    @property
    def image_folder(self) -> str:
        return self.data.get("image_folder", ".")


def list_manifests(directory: Path = MANIFEST_DIR) -> list[str]:
    """Names of the manifests shipped in ``data_manifests/``."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_manifest(name_or_path: str | Path, directory: Path = MANIFEST_DIR) -> Manifest:
    """A manifest by name (``data_manifests/NAME.yaml``) or by file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ManifestError(f"no manifest {name_or_path!r}; known: {', '.join(list_manifests(directory))}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict) or "name" not in data:
        raise ManifestError(f"{path}: a manifest is a mapping with at least 'name'")
    problems = manifest_problems(data)
    if len(problems) == 1:
        raise ManifestError(f"{path}: {problems[0]}")
    if problems:
        raise ManifestError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems))
    return Manifest(data["name"], path, data)


# -- schema ------------------------------------------------------------------------
# Every key the code reads, with its check; anything else is refused (a misspelt key would otherwise
# be ignored: `annotation:` verified no annotation file and printed OK). A check returns what is
# wrong with a value, or None.


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping", type(None): "null"}


def _what(value) -> str:
    """``'3' (a string)``: the value and its YAML kind, for a message."""
    return f"{value!r} ({_KINDS.get(type(value), type(value).__name__)})"


def _text(value):
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {_what(value)}"


def _count(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"must be an integer >= 0, got {_what(value)}"


def _count_or_null(value):  # null: no expected count (not published)
    return None if value is None or _count(value) is None else f"must be an integer >= 0 or null, got {_what(value)}"


def _texts(value):
    if isinstance(value, list) and all(_text(v) is None for v in value):
        return None
    return f"must be a list of non-empty strings, got {_what(value)}"


def _text_or_texts(value):
    ok = _text(value) is None or (isinstance(value, list) and value and _texts(value) is None)
    return None if ok else f"must be a non-empty string or a non-empty list of strings, got {_what(value)}"


def _one_of(*choices):
    def check(value):
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}, got {_what(value)}"
    return check


def _entries(value):  # null is an empty list, as the properties read it
    return None if value is None or isinstance(value, list) else f"must be a list of mappings, got {_what(value)}"


TOP_KEYS = {
    "name": _text, "title": _text, "stage": _text, "template": _text, "homepage": _text, "notes": _text,
    "builder": _one_of("easyvqa"), "requires": _texts, "image_folder": _text,
    "downloads": _entries, "annotations": _entries, "layout": _entries,
}
ANNOTATION_KEYS = {"file": _text, "records": _count_or_null}
LAYOUT_KEYS = {"path": _text, "kind": _one_of("dir", "file"), "files": _count, "min_files": _count}
DOWNLOAD_KEYS = {  # by source: exactly one of repo_id, url, manual
    "repo_id": {"repo_id": _text, "repo_type": _one_of("dataset", "model", "space"), "filename": _text,
                "allow_patterns": _text_or_texts, "target_dir": _text, "unpack_to": _text},
    "url": {"url": _text, "target_dir": _text, "unpack_to": _text},
    "manual": {"manual": _text, "target_dir": _text, "unpack_to": _text},
}


def _unknown(key, known, where: str) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}unknown key {key!r}{hint}; known keys: {', '.join(known)}"


def _check_keys(entry: dict, spec: dict, where: str, required: tuple[str, ...] = ()) -> list[str]:
    out = [_unknown(k, list(spec), where) for k in entry if k not in spec]
    out += [f"{where}missing required key {k!r}" for k in required if k not in entry]
    out += [f"{where}{k!r} {msg}" for k, check in spec.items() if k in entry and (msg := check(entry[k]))]
    return out


def _label(section: str, i: int, entry: dict, key: str | None) -> str:
    """``annotations[0] (file 'a.json'): ``: the entry by index, and by the value naming it if any."""
    named = entry.get(key) if key else None
    return f"{section}[{i}]" + (f" ({key} {named!r})" if isinstance(named, str) else "") + ": "


def manifest_problems(data: dict) -> list[str]:
    """What is wrong with a manifest's structure (unknown or missing keys, mistyped values), one line
    each naming the entry (``annotations[0] (file 'a.json')``) and the key; empty if nothing."""
    problems = _check_keys(data, TOP_KEYS, "", ("name",))
    for section, key, spec in (("annotations", "file", ANNOTATION_KEYS), ("layout", "path", LAYOUT_KEYS)):
        entries = data.get(section)
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if not isinstance(entry, dict):
                problems.append(f"{section}[{i}]: must be a mapping with {key!r}, got {_what(entry)}")
                continue
            where = _label(section, i, entry, key)
            problems += _check_keys(entry, spec, where, (key,))
            if section == "layout" and "files" in entry and "min_files" in entry:
                problems.append(f"{where}give 'files' or 'min_files', not both")
            if section == "layout" and entry.get("kind") == "file" and ({"files", "min_files"} & entry.keys()):
                problems.append(f"{where}'files'/'min_files' count a folder's files; this entry is kind 'file'")
    downloads = data.get("downloads")
    for i, d in enumerate(downloads if isinstance(downloads, list) else []):
        if not isinstance(d, dict):
            problems.append(f"downloads[{i}]: must be a mapping with one of repo_id, url, manual, got {_what(d)}")
            continue
        sources = [s for s in DOWNLOAD_KEYS if s in d]
        if len(sources) != 1:
            known = list(dict.fromkeys(k for keys in DOWNLOAD_KEYS.values() for k in keys))
            problems += [_unknown(k, known, f"downloads[{i}]: ") for k in d if k not in known]
            problems.append(f"downloads[{i}]: give exactly one source key (repo_id, url or manual), got "
                            f"{', '.join(sources) or 'none'}")
            continue
        where = _label("downloads", i, d, None if sources[0] == "manual" else sources[0])
        problems += _check_keys(d, DOWNLOAD_KEYS[sources[0]], where)
        if sources[0] == "repo_id" and ("filename" in d) == ("allow_patterns" in d):
            problems.append(f"{where}give exactly one of 'filename' or 'allow_patterns'")
        if "target_dir" in d and "unpack_to" in d:
            problems.append(f"{where}give 'target_dir' (files kept) or 'unpack_to' (archives unzipped), not both")
    return problems


# -- verify ------------------------------------------------------------------------


@dataclass
class VerifyReport:
    manifest: str
    root: str
    checks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int | None = 50) -> str:
        lines = [f"verify {self.manifest} under {self.root}: " + ("OK" if self.ok else f"{len(self.problems)} problems")]
        lines += [f"  ok: {c}" for c in self.checks]
        shown = self.problems if limit is None else self.problems[:limit]
        lines += [f"  FAIL: {p}" for p in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file())


def _records_text(recs: list, shown: int = 3) -> str:
    """``record 'a' (#0)``, or for an image several records use: how many, and the first few."""
    names = ", ".join(f"{r.id!r} (#{r.index})" for r in recs[:shown])
    if len(recs) == 1:
        return f"record {names}"
    return f"{len(recs)} records ({names}{', ...' if len(recs) > shown else ''})"


def verify_manifest(manifest: Manifest, root: str | Path, *, image_sample: int | None = None,
                    decode: bool = True) -> VerifyReport:
    """Check layout, annotation files and record counts, every record's structure (what training
    refuses: roles, empty answers, ``<image>`` count), and the images the records reference.

    Every referenced image must exist; ``image_sample`` limits how many are also opened
    (``None``: all), each decoded in full unless ``decode=False`` (a header check, which passes a
    truncated JPEG). Required manifests are not verified here; verify them by name.
    """
    root = Path(root)
    rep = VerifyReport(manifest.name, str(root))
    for entry in manifest.layout:
        p = root / entry["path"]
        kind = entry.get("kind", "dir")
        if kind == "file":
            if p.is_file():
                rep.checks.append(f"file {entry['path']}")
            else:
                rep.problems.append(f"missing file {entry['path']} ({p})")
            continue
        if not p.is_dir():
            rep.problems.append(f"missing folder {entry['path']} ({p})")
            continue
        n = _count_files(p)
        if "files" in entry and n != entry["files"]:
            rep.problems.append(f"folder {entry['path']}: {n} files, expected {entry['files']}")
        elif "min_files" in entry and n < entry["min_files"]:
            rep.problems.append(f"folder {entry['path']}: {n} files, expected at least {entry['min_files']}")
        else:
            rep.checks.append(f"folder {entry['path']} ({n} files)")
    image_root = root / manifest.image_folder
    for ann in manifest.annotations:
        path = root / ann["file"]
        if not path.is_file():
            rep.problems.append(f"missing annotation file {ann['file']} ({path})")
            continue
        loaded = read_records(path)
        rep.problems += [str(p) for p in loaded.problems]
        n, expected = len(loaded.records), ann.get("records")
        if expected is not None and n != expected:
            rep.problems.append(f"{ann['file']}: {n} records, expected {expected}")
        else:
            rep.checks.append(f"{ann['file']}: {n} records" + ("" if expected is not None else " (no expected count)"))
        refs: dict[str, list] = {}  # image -> the records using it
        for rec in loaded.records:
            rep.problems += [str(p) for p in check_structure(rec)]
            try:
                images = rec.images
            except ValueError:  # a malformed 'image' field, reported by the structure check
                continue
            for rel in images:
                refs.setdefault(rel, []).append(rec)
        opened = 0
        for rel, recs in refs.items():
            p = image_root / rel
            if not p.is_file():
                rep.problems.append(f"{ann['file']} {_records_text(recs)}: image not found: {rel}")
                continue
            if image_sample is None or opened < image_sample:
                opened += 1
                msg = image_problem(p, decode)
                if msg:
                    rep.problems.append(f"{ann['file']} {_records_text(recs)}: {msg}")
        rep.checks.append(f"{ann['file']}: {len(refs)} distinct images referenced, all present or reported "
                          f"({opened} opened)")
    return rep


# -- prepare -----------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def describe_download(d: dict) -> str:
    """One line saying what to fetch and where to put it."""
    where = d.get("unpack_to") or d.get("target_dir") or "."
    if "repo_id" in d:
        what = d.get("filename") or f"files matching {d.get('allow_patterns')}"
        src = f"hub {d.get('repo_type', 'dataset')} {d['repo_id']}: {what}"
    elif "url" in d:
        src = d["url"]
    else:
        src = f"manual: {d.get('manual', 'see manifest notes')}"
    return f"{src} -> <root>/{where}" + (" (unzip)" if d.get("unpack_to") else "")


def prepare_manifest(manifest: Manifest, root: str | Path, *, with_requirements: bool = True,
                     directory: Path | None = None) -> list[Path]:
    """Download (and unzip) everything a manifest lists into ``root``.

    Offline (``HF_HUB_OFFLINE=1``) or for manual sources this raises :class:`PrepareError`
    listing exactly what to fetch and where.
    """
    root = Path(root)
    if manifest.data.get("builder") == "easyvqa":
        from .easyvqa import build_easyvqa

        build_easyvqa(root)
        return [root]
    manifests = [manifest]
    if with_requirements:
        d = directory or manifest.path.parent
        manifests = [_required(r, d) for r in manifest.requires] + manifests
    todo = [(m, d) for m in manifests for d in m.downloads]
    after = f"\nthen run: libmoe data verify {manifest.name} --root {root}"
    if _offline():
        lines = [f"{m.name}: {describe_download(d)}" for m, d in todo]
        raise PrepareError(f"cannot download {manifest.name}: offline (HF_HUB_OFFLINE=1). Fetch these into {root}:\n  "
                           + "\n  ".join(lines) + after)
    written = []
    for m, d in todo:
        if "repo_id" not in d and "url" not in d:
            continue
        try:
            written += _download(d, root)
        except Exception as e:
            raise PrepareError(f"{m.name}: failed to fetch {describe_download(d)}: {type(e).__name__}: {e}") from e
    manual = [f"{m.name}: {describe_download(d)}" for m, d in todo if "repo_id" not in d and "url" not in d]
    if manual:
        raise PrepareError(f"{manifest.name}: downloaded what could be; these need a manual step into {root}:\n  "
                           + "\n  ".join(manual) + after)
    return written


def _required(name: str, directory: Path) -> Manifest:
    """A required manifest: beside the one requiring it, else a shipped one (a user's own manifest
    may require e.g. ``coco-train2017``)."""
    try:
        return load_manifest(name, directory)
    except ManifestError:
        if Path(directory).resolve() == MANIFEST_DIR:
            raise
        return load_manifest(name, MANIFEST_DIR)


def _download(d: dict, root: Path) -> list[Path]:
    """Fetch one download. An archive (``unpack_to``) goes to a staging folder of its own, is unzipped
    and deleted, so one download's archives never reach another's folder; other files land in place."""
    root.mkdir(parents=True, exist_ok=True)
    unpack = bool(d.get("unpack_to"))
    where = Path(tempfile.mkdtemp(prefix=".download-", dir=root)) if unpack else root / d.get("target_dir", ".")
    where.mkdir(parents=True, exist_ok=True)
    try:
        if "repo_id" in d:
            from huggingface_hub import hf_hub_download, snapshot_download

            kind = d.get("repo_type", "dataset")
            if d.get("filename"):
                files = [Path(hf_hub_download(d["repo_id"], d["filename"], repo_type=kind, local_dir=where))]
            else:
                snap = Path(snapshot_download(d["repo_id"], repo_type=kind, allow_patterns=d["allow_patterns"],
                                              local_dir=where))
                files = sorted(p for p in snap.rglob("*") if p.is_file() and ".cache" not in p.relative_to(snap).parts)
        else:
            import urllib.request

            files = [where / Path(d["url"]).name]
            urllib.request.urlretrieve(d["url"], files[0])
        if not unpack:
            return files
        dest = root / d["unpack_to"]
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.suffix == ".zip":
                with zipfile.ZipFile(f) as z:
                    z.extractall(dest)
        return [dest]
    finally:
        if unpack:
            shutil.rmtree(where, ignore_errors=True)
