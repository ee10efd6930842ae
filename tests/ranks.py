"""Running a test module as several local ranks (torch.distributed's env:// rendezvous on a free port)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


def run_ranks(argv: list[str], ranks: int, log_dir: Path, env: dict | None = None,
              timeout: float = 300) -> list[tuple[int, str]]:
    """Start ``argv`` once per rank with the rank's environment (plus ``env``), wait for all; returns
    (return code, output) per rank. Output goes to ``log_dir/rank{r}.log`` (a full pipe would block a
    rank); a rank still running after ``timeout`` (left waiting in a collective) is killed and raises."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                    "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
        with open(log_dir / f"rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen(argv, env=rank_env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(code, (log_dir / f"rank{rank}.log").read_text()) for rank, code in enumerate(codes)]
