"""Training throughput of the tiny preset: tokens/s per stage with 1 and 2 processes.

    python benchmarks/train_throughput.py [--steps 40] [--procs 1,2] [--json] [--out FILE]

Runs each stage through `libmoe train` (DeepSpeed, CPU, ZeRO-2) in a scratch run folder
and reads tokens/s from metrics.jsonl (median over the steps after the first five;
tokens/s counts every real token, image tokens included, and covers data loading).
Global batch 32 as in the tiny recipe: 32 per process on one, 16 on each of two.
Also reports each stage's wall time (launch to final model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from libmoe_core.train.config import resolve_config
from libmoe_core.train.launch import launch

GLOBAL_BATCH = 32  # the tiny recipe's: one micro-batch per step on one process, 16 + 16 on two
SKIPPED_STEPS = 5  # start-up steps left out of the median


def run_stage(run_dir: Path, stage: str, procs: int, steps: int, extra: dict) -> dict:
    cfg = resolve_config(stage, overrides={"run_dir": str(run_dir), "num_procs": procs, "max_steps": steps,
                                           "save_steps": 10_000, "per_device_batch_size": GLOBAL_BATCH // procs,
                                           "global_batch_size": GLOBAL_BATCH, **extra})
    started = time.perf_counter()
    launch(cfg, on_line=lambda line: None)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.stage_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][SKIPPED_STEPS:]
    return {"stage": stage, "procs": procs, "steps": steps, "tokens_per_s": round(statistics.median(rates), 1),
            "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.steps <= SKIPPED_STEPS:
        parser.error(f"--steps must be > {SKIPPED_STEPS} (the first {SKIPPED_STEPS} steps are left out of the median)")
    try:
        counts = [int(p) for p in args.procs.split(",")]
    except ValueError:
        counts = []
    if not counts or any(p < 1 or GLOBAL_BATCH % p for p in counts):
        parser.error(f"--procs must be a comma-separated list of process counts dividing {GLOBAL_BATCH}, "
                     f"got {args.procs!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in counts:
            run_dir = Path(tmp) / f"p{procs}"
            for stage in ("pretrain", "pft", "sft"):
                row = run_stage(run_dir, stage, procs, args.steps, {"moe_vision": True} if stage == "sft" else {})
                rows.append(row)
                if not args.json:
                    print(f"{stage:<9} procs={procs}  {row['tokens_per_s']:>9.1f} tokens/s   wall {row['wall_s']:>6.1f} s "
                          f"for {args.steps} steps", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
