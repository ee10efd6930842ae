"""CPU budget detection: affinity and cgroup v1/v2 quotas."""

import os

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
