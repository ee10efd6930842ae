"""CPU budget detection (affinity, cgroup v1/v2 quotas) and the training entry's CPU-side set-up and teardown."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libmoe_core.train.cpus import available_cpus, cgroup_cpu_quota
from libmoe_core.train.launch import launch_env


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == 1  # 1.5 CPUs: one thread per whole CPU, at least 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota_and_no_cgroup(tmp_path):
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0
    assert cgroup_cpu_quota(tmp_path / "missing") is None


def test_launch_env_splits_the_cpus_over_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("libmoe_core.train.launch.available_cpus", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    env = launch_env(num_procs=2)
    assert env["OMP_NUM_THREADS"] == "4" and env["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch_env(num_procs=2).get("OMP_NUM_THREADS") == "3"  # the user's choice wins


def test_training_entry_keeps_deepspeed_from_compiling_its_cpu_shm_op(monkeypatch):
    import deepspeed.ops

    from runners.train import skip_cpu_shm_comm_op

    ops = deepspeed.ops.__compatible_ops__
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setitem(ops, "deepspeed_shm_comm", True)
    monkeypatch.setenv("LIBMOE_DS_SHM_COMM", "1")
    skip_cpu_shm_comm_op()
    assert ops["deepspeed_shm_comm"] is True  # asked for: left alone
    monkeypatch.delenv("LIBMOE_DS_SHM_COMM")
    skip_cpu_shm_comm_op()
    assert ops["deepspeed_shm_comm"] is False  # build_shm_op then returns None: gloo all-reduce


# Two gloo ranks that keep references to their process groups (as the training objects do).
# With ``destroy_process_group()`` and a normal exit, about half of such pairs have a rank die
# with "terminate called without an active exception" (16 of 30 measured with torch 2.13).
RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from runners.train import exit_after_success

rank, store, code = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
held = [dist.group.WORLD, dist.new_group([0, 1])]
t = torch.ones(1000)
for group in held:
    dist.all_reduce(t, group=group)
assert t[0].item() == 4.0
print(f"rank {rank} finished", end="")  # no newline: reaches the pipe only if stdout is flushed
exit_after_success(code)
"""


@pytest.mark.slow
def test_training_entry_exits_cleanly_while_process_groups_are_still_referenced(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for pair in range(8):
        store = tmp_path / f"store{pair}"
        code = 0 if pair else 3  # the first pair checks that the exit code goes through
        ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(store), str(code)], cwd=root,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        for rank, proc in enumerate(ranks):
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == code, f"pair {pair} rank {rank}: exit {proc.returncode}\n{out}"
            assert "terminate called" not in out and out.endswith(f"rank {rank} finished"), out
