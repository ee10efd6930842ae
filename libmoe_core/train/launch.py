"""Launch a training stage as a DeepSpeed subprocess and stream its output."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .._shipped import shipped_dir
from . import stage_folder
from .config import TrainConfig
from .cpus import available_cpus
from .guard import acquire_stage_lock, guard_command

STAGE_LOCK_NAME = ".train.lock"
STAGE_LOCK_WAIT_S = 60.0  # how long a launch waits for an earlier run on the same folder to stop

ZERO_CONFIG_FILES = {"2": "zero2.json", "3": "zero3.json", "3-offload": "zero3_offload.json"}
TRAIN_ENTRY = shipped_dir("runners") / "train.py"


#: a Python exception's last traceback line, as a rank prints it (possibly behind a "[rank0]: " prefix)
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b.*)$")


def _last_exception(lines: list[str]) -> str | None:
    """The last exception line a rank printed ("OSError: ...", "...DataValidationError: ..."), not the
    launcher's own report that a rank failed."""
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line.rstrip())
        if match and not match.group(1).startswith("subprocess.CalledProcessError"):
            return match.group(1)
    return None


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; ``tail`` holds its last output lines. The message
    leads with the exception a rank raised, when its output shows one."""

    def __init__(self, returncode: int, log_path: Path, tail: list[str]):
        self.returncode, self.log_path, self.tail = returncode, log_path, tail
        self.error = _last_exception(tail)
        cause = f": {self.error}" if self.error else ""
        last = "".join(tail[-40:])
        super().__init__(f"training exited with code {returncode}{cause}\nfull log: {log_path}\n--- last lines ---\n{last}")


def deepspeed_config(zero_stage: str) -> dict:
    """The shipped DeepSpeed config for ``2``, ``3`` or ``3-offload`` (HF fills the "auto" values)."""
    if zero_stage not in ZERO_CONFIG_FILES:
        raise ValueError(f"zero stage must be one of {sorted(ZERO_CONFIG_FILES)}, got {zero_stage!r}")
    text = resources.files("libmoe_core.train").joinpath("ds_configs", ZERO_CONFIG_FILES[zero_stage]).read_text()
    return json.loads(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(num_procs: int) -> dict:
    """Environment for the launcher: CPU accelerator without CUDA, threads split over processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, available_cpus() // num_procs)))
    return env


def build_command(cfg: TrainConfig, config_path: Path, resume: bool = False) -> list[str]:
    """The ``deepspeed`` launcher command for one stage (a hostfile is passed through)."""
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher]
    if cfg.hostfile:
        cmd += ["--hostfile", cfg.hostfile]
    else:
        cmd += ["--num_gpus", str(cfg.num_procs)]
    cmd += ["--master_port", str(free_port()), str(TRAIN_ENTRY), "--config", str(config_path)]
    if resume:
        cmd.append("--resume")
    return cmd


def stop_guarded_run(proc: subprocess.Popen, wait_s: float = 30.0) -> None:
    """Ask the guard to stop the run (SIGTERM) and wait for it; SIGKILL the guard if it does not exit."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:  # pragma: no cover - the guard ignores SIGTERM only if wedged
        proc.kill()
        proc.wait()


def lock_stage_folder(cfg: TrainConfig, say=print) -> int:
    """The stage folder's lock (a descriptor), waiting up to ``STAGE_LOCK_WAIT_S`` for a run still going."""
    try:
        return acquire_stage_lock(cfg.stage_dir / STAGE_LOCK_NAME, STAGE_LOCK_WAIT_S, say=say)
    except TimeoutError as err:
        raise stage_folder.StageFolderError(str(err)) from None


def prepare_stage_folder(cfg: TrainConfig, resume: bool) -> bool:
    """Check the stage folder against this launch (see :mod:`.stage_folder`; hold its lock) and
    write the config; False when a resume finds the run already finished."""
    if resume:
        if stage_folder.finished(cfg):
            return False
        stage_folder.check_resume_config(cfg)
        stage_folder.clear_for_restart(cfg)
    else:
        stage_folder.check_fresh_start(cfg)
    cfg.save(cfg.stage_dir / "config.yaml")
    return True


def launch(cfg: TrainConfig, resume: bool = False, on_line: Callable[[str], None] | None = None) -> Path:
    """Write the resolved config, run the stage, stream lines to ``on_line`` and ``train.log``.

    Returns the stage's final model folder; raises :class:`TrainingFailed` on failure and
    :class:`~.stage_folder.StageFolderError` when the folder holds a run this launch would mix
    with (a fresh launch on an earlier run, a resume with a changed config, a run still going).
    Lines of our own (waiting for a busy folder, nothing left to train) start with ``libmoe: ``.
    """
    from .stages import check_init_model, check_moe_settings, dataset_files, training_dtype

    check_init_model(cfg)  # fail before starting processes
    check_moe_settings(cfg)
    training_dtype(cfg)  # precision: bf16 on a GPU without native bf16 is refused here
    dataset_files(cfg)  # builds the embedded dataset once, here, before any rank needs it
    stage_dir = cfg.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / "config.yaml"
    emit = on_line or (lambda line: print(line, end="", flush=True))
    log_path = stage_dir / "train.log"
    tail: deque[str] = deque(maxlen=200)
    # The lock is held from the folder checks to the end of the run: by us until the guard starts,
    # then by the guard and the launcher it passes it to.
    lock = lock_stage_folder(cfg, say=lambda message: emit(message + "\n"))
    try:
        if not prepare_stage_folder(cfg, resume):
            emit(f"libmoe: {cfg.stage} already finished with this config; model in {cfg.final_dir}\n")
            return cfg.final_dir
        # The guard (own session, so a kernel's SIGKILL to its group misses it) stops the whole run
        # when this process is interrupted or dies.
        command = guard_command(build_command(cfg, config_path, resume), lock_fd=lock)
        with open(log_path, "a") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=launch_env(cfg.num_procs), start_new_session=True, bufsize=1, pass_fds=(lock,),
        ) as proc:
            os.close(lock)
            lock = None  # the guard holds it now
            try:
                for line in proc.stdout:
                    log.write(line)
                    tail.append(line)
                    emit(line)
                rc = proc.wait()
            except BaseException:  # KeyboardInterrupt from a notebook interrupt or Ctrl-C, an on_line error
                stop_guarded_run(proc)
                raise
    finally:
        if lock is not None:
            os.close(lock)
    if rc != 0 or not (cfg.final_dir / "config.json").is_file():
        raise TrainingFailed(rc, log_path, list(tail))
    return cfg.final_dir
