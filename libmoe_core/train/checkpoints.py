"""Atomic checkpoints: a checkpoint counts only once its completion marker exists.

HF Trainer writes ``checkpoint-N/`` in several steps (weights, optimizer, RNG, trainer
state). We write ``checkpoint-N/COMPLETE`` (atomically, by rename) only after every
rank has finished and its files are synced to disk, remove a stale marker before a save
begins, resume only from a marked checkpoint, and rotate old checkpoints only after the new
one is complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

MARKER = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems (FUSE, CIFS) cannot sync a folder; their files are synced
        if not directory or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def sync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root``: what a marker or rename written after this
    vouches for is on disk, not only in the page cache (a power loss, not just a kill)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder, directory=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (both synced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent, directory=True)


def mark_complete(checkpoint: str | os.PathLike, step: int) -> None:
    """Sync the checkpoint's files, then write its marker."""
    sync_tree(checkpoint)
    write_atomic(Path(checkpoint) / MARKER, json.dumps({"step": step, "time": time.time()}))


def unmark(checkpoint: str | os.PathLike) -> None:
    try:
        (Path(checkpoint) / MARKER).unlink()
    except FileNotFoundError:
        pass


def checkpoints(root: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for every ``checkpoint-N`` under ``root``, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child, (child / MARKER).is_file()))
    return sorted(found)


def last_complete_checkpoint(root: str | os.PathLike) -> Path | None:
    complete = [path for _, path, done in checkpoints(root) if done]
    return complete[-1] if complete else None


def resume_notes(root: str | os.PathLike, max_steps: int) -> list[str]:
    """What a resume from ``root``'s last complete checkpoint does, for the log: where it starts,
    the newer checkpoints it leaves out (incomplete: the run stopped while writing them), and
    whether anything is left to train."""
    chosen = last_complete_checkpoint(root)
    if chosen is None:
        notes = ["resuming from the start (no complete checkpoint)"]
        step = 0
    else:
        step = int(_CKPT.match(chosen.name).group(1))
        notes = [f"resuming from {chosen}"]
    notes += [f"not using {path.name}: incomplete (no {MARKER} marker; the run stopped while writing it)"
              for s, path, done in checkpoints(root) if not done and s > step]
    if chosen is not None and 0 < max_steps <= step:
        notes.append(f"{chosen.name} is at step {step} >= max_steps {max_steps}: nothing left to train, "
                     "its weights become the final model")
    return notes


def rotate(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` and every incomplete one older
    than the newest complete checkpoint. Returns what was removed."""
    found = checkpoints(root)
    complete = [path for _, path, done in found if done]
    if not complete:
        return []
    newest_step = max(step for step, _, done in found if done)
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [path for step, path, done in found if not done and step < newest_step]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written folder into place; an old ``final`` is replaced."""
    staging, final = Path(staging), Path(final)
    sync_tree(staging)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _fsync(final.parent, directory=True)
