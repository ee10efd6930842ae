"""Tie a training run's processes to whoever launched it, and one run to one stage folder.

``launch`` runs the DeepSpeed launcher through this guard::

    python -I libmoe_core/train/guard.py --parent PID --lock-fd N -- deepspeed ...

(run as a file, standard library only, so it starts in milliseconds without importing torch).

The stage folder's exclusive lock, taken by ``launch`` before it checks the folder, is
passed to the guard and on to the launcher (a second run on the same folder waits for it,
then fails with the holder's pid; it is free again once both have exited). The guard
starts the command in its own process group and stops that whole group
(SIGTERM, then SIGKILL after a grace period) when

- the guard gets SIGTERM, SIGINT or SIGHUP (``launch`` sends SIGTERM when the notebook cell
  or the ``libmoe train`` command is interrupted), or
- the launching process dies, even by SIGKILL (a Jupyter kernel shut down after a cell
  timeout): on Linux through ``PR_SET_PDEATHSIG``, elsewhere by polling the parent pid.

Without it, DeepSpeed's launcher, its per-node launcher and the ranks outlived an
interrupted notebook and kept writing checkpoints next to the retried run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

LOCK_BUSY_EXIT = 75  # EX_TEMPFAIL: another run holds the stage folder
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """Linux ``prctl``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _name_holder(fd: int, holder: str) -> None:
    """Write who holds the lock into the lock file, for a waiting launch's messages."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{holder}\n".encode(), 0)


class LockWaitStopped(Exception):
    """The wait for a busy stage lock was given up because the caller was asked to stop."""


def acquire_stage_lock(path: Path, wait_s: float, say=print, stop=lambda: False) -> int:
    """Open and exclusively lock ``path`` (waiting up to ``wait_s``); write our pid into it.

    Returns the open file descriptor (the lock lives as long as it, or a descriptor inherited
    from it, stays open). Raises ``TimeoutError`` naming the holder's pid when the lock stays
    busy, :class:`LockWaitStopped` as soon as ``stop()`` is true; the descriptor never leaks.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if stop():
                raise LockWaitStopped(str(path))
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"stage folder {path.parent} is in use by another training run ({holder}); "
                    f"waited {wait_s:g} s for it to stop"
                )
            if not announced:
                say(f"libmoe: waiting for the previous training run on {path.parent} ({holder}) to stop")
                announced = True
            time.sleep(0.2)
        _name_holder(fd, f"pid {os.getpid()}")
        return fd
    except BaseException:  # a timeout, a stop, a KeyboardInterrupt in a notebook
        os.close(fd)
        raise


def _reap_orphans() -> None:
    """Collect exited descendants re-parented to us (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member we may not signal still exists
        return True


def stop_group(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace_s``; wait until it is gone."""
    pgid = child.pid  # the child leads its own group (start_new_session)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            child.poll()
            _reap_orphans()
            if child.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)


def run_guarded(command: list[str], parent: int, *, lock: Path | None = None, lock_fd: int | None = None,
                grace_s: float = 10.0, lock_wait_s: float = 60.0) -> int:
    """Run ``command`` under the guard; returns the exit status to exit with.

    ``lock_fd``: a descriptor of the stage lock that the launcher already holds (passed on, so
    the folder stays locked from the launcher's checks to the end of the run); ``lock``: a lock
    file to acquire first (waiting up to ``lock_wait_s``, unless asked to stop).
    """
    stop_requested: list[int] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # the parent's death becomes a SIGTERM to us
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphaned grandchildren come to us, so we can wait for them

    def should_stop() -> bool:
        return bool(stop_requested) or os.getppid() != parent  # the parent may have died before PDEATHSIG

    def stop_status() -> int:
        return 128 + (stop_requested[0] if stop_requested else signal.SIGTERM)

    if lock_fd is None and lock is not None:
        try:
            lock_fd = acquire_stage_lock(lock, lock_wait_s, say=lambda m: print(m, flush=True), stop=should_stop)
        except TimeoutError as err:
            print(f"libmoe: {err}", flush=True)
            return LOCK_BUSY_EXIT
        except LockWaitStopped:
            return stop_status()
    try:
        if should_stop():
            return stop_status()
        # The launcher keeps a copy of the lock: the folder stays locked while it lives, even past our death.
        child = subprocess.Popen(command, start_new_session=True, pass_fds=() if lock_fd is None else (lock_fd,))
        if lock_fd is not None:  # the launcher may outlive us (and keep the lock): name both
            _name_holder(lock_fd, f"guard pid {os.getpid()}, launcher pid {child.pid}")
        while True:
            try:
                child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if should_stop():
                stop_group(child, grace_s)
                return stop_status()
        if _group_alive(child.pid):  # the launcher exited and left ranks behind
            stop_group(child, grace_s)
        rc = child.returncode
        return rc if rc >= 0 else 128 - rc
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def guard_command(command: list[str], lock: Path | None = None, lock_fd: int | None = None, grace_s: float = 10.0,
                  lock_wait_s: float = 60.0) -> list[str]:
    """``command`` wrapped in this guard, with the current process as the parent to follow
    (give ``lock_fd`` to the ``Popen`` as ``pass_fds``)."""
    wrapped = [sys.executable, "-I", str(Path(__file__).resolve()), "--parent", str(os.getpid()),
               "--grace", str(grace_s), "--lock-wait", str(lock_wait_s)]
    if lock is not None:
        wrapped += ["--lock", str(lock)]
    if lock_fd is not None:
        wrapped += ["--lock-fd", str(lock_fd)]
    return wrapped + ["--", *command]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guard.py", description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True, help="pid whose death stops the run")
    parser.add_argument("--lock", type=Path, help="lock file of the stage folder, to acquire")
    parser.add_argument("--lock-fd", type=int, help="inherited descriptor of a stage lock the launcher holds")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--lock-wait", type=float, default=60.0, help="seconds to wait for a busy stage folder")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    return run_guarded(command, args.parent, lock=args.lock, lock_fd=args.lock_fd, grace_s=args.grace,
                       lock_wait_s=args.lock_wait)


if __name__ == "__main__":
    sys.exit(main())
