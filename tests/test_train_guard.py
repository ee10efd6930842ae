"""The training guard: a run's whole process tree dies with its launcher; one run per stage folder.

Real processes throughout: a fake launcher (a Python process that starts a grandchild, as
DeepSpeed's runner starts its per-node launcher and ranks) under the guard, and checks that
every pid is gone afterwards.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from libmoe_core.train import guard
from libmoe_core.train.config import resolve_config
from libmoe_core.train.guard import LOCK_BUSY_EXIT, acquire_stage_lock, guard_command

GUARD = str(Path(guard.__file__).resolve())

# A launcher that starts a grandchild, writes "launcher_pid grandchild_pid", says "started", sleeps.
# With IGNORE_TERM both ignore SIGTERM, so only SIGKILL stops them.
FAKE_LAUNCHER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    ignore = os.environ.get("IGNORE_TERM") == "1"
    code = "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if ignore else "") + "time.sleep(600)"
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", code])
    open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}\\n")
    print("started", flush=True)
    if sys.argv[2:] == ["exit-leaving-grandchild"]:
        sys.exit(0)
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_pids(path: Path, timeout: float = 30.0) -> list[int]:
    assert wait_for(lambda: path.is_file() and path.read_text().endswith("\n"), timeout), "fake launcher never started"
    return [int(p) for p in path.read_text().split()]


@pytest.fixture
def fake_launcher(tmp_path) -> list[str]:
    script = tmp_path / "fake_launcher.py"
    script.write_text(FAKE_LAUNCHER)
    return [sys.executable, str(script), str(tmp_path / "pids")]


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_parent_killed_by_sigkill_stops_the_whole_tree(tmp_path, fake_launcher):
    # The parent plays a Jupyter kernel killed after a cell timeout: SIGKILL, no chance to clean up.
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"cmd = [sys.executable, '-I', {GUARD!r}, '--parent', str(os.getpid()), '--grace', '2', '--', *{fake_launcher!r}]\n"
        "subprocess.Popen(cmd, start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], start_new_session=True)
    try:
        pids = read_pids(tmp_path / "pids")
        assert all(alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: not any(alive(p) for p in pids), 10), "the run outlived its launcher"
    finally:
        parent.kill()


def test_sigterm_to_guard_escalates_to_sigkill_after_grace(tmp_path, fake_launcher):
    proc = subprocess.Popen([sys.executable, "-I", GUARD, "--parent", str(os.getpid()), "--grace", "1", "--",
                             *fake_launcher], env=dict(os.environ, IGNORE_TERM="1"))
    pids = read_pids(tmp_path / "pids")
    start = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert time.monotonic() - start >= 1.0  # the grace period was given before SIGKILL
    assert not any(alive(p) for p in pids)


def run_guard(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The guard as launch() runs it, following this test process; returns when it exits."""
    return subprocess.run([sys.executable, "-I", GUARD, "--parent", str(os.getpid()), *args],
                          check=False, timeout=60, **kwargs)


def test_exit_status_passes_through_and_leftovers_are_stopped(tmp_path, fake_launcher):
    assert run_guard("--", sys.executable, "-c", "raise SystemExit(3)").returncode == 3
    killed = run_guard("--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == 128 + signal.SIGKILL
    # The launcher exits 0 but leaves a "rank" running: the guard stops it before exiting.
    assert run_guard("--grace", "2", "--", *fake_launcher, "exit-leaving-grandchild").returncode == 0
    assert not any(alive(p) for p in read_pids(tmp_path / "pids"))


def test_busy_stage_folder_waits_then_fails_naming_the_holder(tmp_path):
    lock = tmp_path / ".train.lock"
    held = acquire_stage_lock(lock, wait_s=0)
    try:
        out = run_guard("--lock", str(lock), "--lock-wait", "0.5", "--", sys.executable, "-c", "print('ran')",
                        capture_output=True, text=True)
        assert out.returncode == LOCK_BUSY_EXIT
        assert f"in use by another training run (pid {os.getpid()})" in out.stdout
        assert str(tmp_path) in out.stdout and "ran" not in out.stdout
        with pytest.raises(TimeoutError, match="in use by another training run"):
            acquire_stage_lock(lock, wait_s=0)
        # A run started while the lock is held goes ahead once it is released.
        waiting = subprocess.Popen([sys.executable, "-I", GUARD, "--parent", str(os.getpid()), "--lock", str(lock),
                                    "--lock-wait", "30", "--", sys.executable, "-c", "print('ran')"],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert waiting.poll() is None
    finally:
        os.close(held)
    stdout, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "waiting for the previous training run" in stdout and "ran" in stdout


def test_interrupted_launch_stops_training(tmp_path, fake_launcher, monkeypatch):
    # A notebook interrupt (or Ctrl-C on `libmoe train`) arrives as KeyboardInterrupt while
    # launch() streams the output: the training tree must not keep running behind it.
    from libmoe_core.train import launch as launch_module

    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path / "run")})
    monkeypatch.setattr(launch_module, "build_command", lambda *args, **kwargs: fake_launcher)

    def interrupt(line):
        if line.startswith("started"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch_module.launch(cfg, on_line=interrupt)
    pids = read_pids(tmp_path / "pids")
    assert not any(alive(p) for p in pids), "training kept running after the interrupt"
    # The stage folder is free again: a second launch is not refused as busy.
    assert (cfg.stage_dir / launch_module.STAGE_LOCK_NAME).is_file()
    os.close(acquire_stage_lock(cfg.stage_dir / launch_module.STAGE_LOCK_NAME, wait_s=0))


def test_second_launch_on_a_busy_stage_folder_is_a_clear_failure(tmp_path, monkeypatch):
    from libmoe_core.train import launch as launch_module
    from libmoe_core.train.stage_folder import StageFolderError

    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path / "run")})
    cfg.stage_dir.mkdir(parents=True)
    monkeypatch.setattr(launch_module, "build_command", lambda *a, **k: [sys.executable, "-c", "print('trained')"])
    monkeypatch.setattr(launch_module, "STAGE_LOCK_WAIT_S", 0.3)
    held = acquire_stage_lock(cfg.stage_dir / launch_module.STAGE_LOCK_NAME, wait_s=0)
    try:
        with pytest.raises(StageFolderError, match=f"in use by another training run \\(pid {os.getpid()}\\)"):
            launch_module.launch(cfg, on_line=lambda line: None)
    finally:
        os.close(held)
    assert not (cfg.stage_dir / "config.yaml").exists()  # refused before anything was written


def test_guard_command_follows_this_process():
    cmd = guard_command(["deepspeed", "x.py"], lock=Path("/tmp/s/.train.lock"), grace_s=3, lock_wait_s=7)
    assert cmd[:3] == [sys.executable, "-I", GUARD]
    assert cmd[cmd.index("--parent") + 1] == str(os.getpid())
    assert cmd[cmd.index("--lock") + 1] == "/tmp/s/.train.lock"
    assert cmd[cmd.index("--grace") + 1] == "3" and cmd[cmd.index("--lock-wait") + 1] == "7"
    assert cmd[-3:] == ["--", "deepspeed", "x.py"]


def test_two_launches_at_once_cannot_both_start_fresh(tmp_path, monkeypatch):
    # The folder stays locked from the first launch's checks to the end of its run, so the second
    # waits for it and then finds its checkpoint (before: 6 of 10 such pairs both trained "fresh").
    import threading

    from libmoe_core.train import launch as launch_module
    from libmoe_core.train.stage_folder import StageFolderError

    cfg = resolve_config("pretrain", overrides={"run_dir": str(tmp_path / "run")})
    code = ("import pathlib, time, sys; d = pathlib.Path(sys.argv[1]); (d / 'checkpoints' / 'checkpoint-1').mkdir(parents=True); "
            "time.sleep(1.5); (d / 'final').mkdir(); (d / 'final' / 'config.json').write_text('{}')")
    monkeypatch.setattr(launch_module, "build_command", lambda c, *a, **k: [sys.executable, "-c", code, str(c.stage_dir)])
    real_guard_command = launch_module.guard_command

    def slow_guard(*args, **kwargs):  # widen the moment between the checks and the guard's start
        delay = "import os, sys, time; time.sleep(1); os.execv(sys.argv[1], sys.argv[1:])"
        return [sys.executable, "-c", delay, *real_guard_command(*args, **kwargs)]

    monkeypatch.setattr(launch_module, "guard_command", slow_guard)
    results = []
    thread = threading.Thread(target=lambda: results.append(launch_module.launch(cfg, on_line=lambda line: None)))
    thread.start()
    # the first launch has passed its checks and written its config; its guard has not started yet
    assert wait_for(lambda: (cfg.stage_dir / "config.yaml").exists(), 30)
    assert not cfg.checkpoint_dir.exists()
    lines = []
    with pytest.raises(StageFolderError, match="holds an earlier run"):
        launch_module.launch(cfg, on_line=lines.append)
    thread.join(30)
    assert results == [cfg.final_dir]
    assert any("waiting for the previous training run" in line for line in lines)


def test_a_guard_waiting_for_the_lock_stops_at_once_when_asked(tmp_path):
    lock = tmp_path / ".train.lock"
    held = acquire_stage_lock(lock, wait_s=0)
    try:
        proc = subprocess.Popen([sys.executable, "-I", GUARD, "--parent", str(os.getpid()), "--lock", str(lock),
                                 "--lock-wait", "60", "--", sys.executable, "-c", "print('ran')"],
                                stdout=subprocess.PIPE, text=True)
        assert wait_for(lambda: False, 1.0) is False  # let it start waiting
        proc.terminate()
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM  # before: it waited out the 60 s
        assert "ran" not in proc.stdout.read()
        proc.stdout.close()
    finally:
        os.close(held)


def test_an_interrupted_lock_wait_leaks_no_descriptor(tmp_path):
    lock = tmp_path / ".train.lock"
    held = acquire_stage_lock(lock, wait_s=0)
    before = len(os.listdir("/proc/self/fd"))
    def interrupt(message):  # a notebook interrupt arriving while the wait is announced
        raise KeyboardInterrupt

    for _ in range(3):
        with pytest.raises(guard.LockWaitStopped):
            acquire_stage_lock(lock, wait_s=30, stop=lambda: True)
        with pytest.raises(TimeoutError):
            acquire_stage_lock(lock, wait_s=0)
        with pytest.raises(KeyboardInterrupt):
            acquire_stage_lock(lock, wait_s=30, say=interrupt)
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(held)


def test_the_lock_names_the_guard_and_the_launcher(tmp_path, fake_launcher):
    # the launcher keeps the lock if the guard dies: a waiting launch's message names both
    lock = tmp_path / ".train.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    proc = subprocess.Popen([sys.executable, "-I", GUARD, "--parent", str(os.getpid()), "--grace", "1",
                             "--lock-fd", str(fd), "--", *fake_launcher], pass_fds=(fd,))
    os.close(fd)
    try:
        launcher, _ = read_pids(tmp_path / "pids")
        with pytest.raises(TimeoutError, match=rf"in use by another training run \(guard pid {proc.pid}, "
                                               rf"launcher pid {launcher}\)"):
            acquire_stage_lock(lock, wait_s=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    os.close(acquire_stage_lock(lock, wait_s=5))  # free once the run is stopped
