"""Throughput of the routing analysis on a large synthetic trace (default: 50 million rows).

Generates a trace with the trace schema in chunks under a temporary directory
(zstd part files, as the evaluation writer does), runs ``libmoe analyze --json`` on
it in a child process that times its start-up (imports, parsing) and the analysis apart and
reads its own peak RSS (VmHWM), prints rows/s of the analysis, the time for 50M rows
(measured or extrapolated, labelled) and the peak RSS, then
deletes the trace. Optionally also times the checkpoint comparison of two traces.

    python benchmarks/analysis_throughput.py                 # 50M rows, k=2, E=4
    python benchmarks/analysis_throughput.py --rows 10000000 # smaller; prints the extrapolation

Numbers depend on the machine and its load; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

TARGET_ROWS = 50_000_000


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _generate(path, args, docs, rows_per_doc, checkpoint="final", progress=1.0) -> float:
    from libmoe_core.analysis.synthetic import synthetic_trace, write_trace

    docs_per_chunk = max(1, args.chunk_rows // rows_per_doc)

    def chunks():
        for start in range(0, docs, docs_per_chunk):
            yield synthetic_trace(
                min(docs_per_chunk, docs - start), args.tokens_per_doc, num_experts=args.experts, top_k=args.top_k,
                num_layers=args.layers, checkpoint=checkpoint, progress=progress, doc_offset=start,
            )

    t0 = time.perf_counter()
    write_trace(chunks(), path, files=args.files, compression=args.compression)
    return time.perf_counter() - t0


# Runs one libmoe command and reports, on its last stderr line, the time to import and parse
# (start-up), the time of the command itself, and the peak RSS of its own address space
# (VmHWM: fresh at exec; ru_maxrss from wait4 would include this benchmark's own peak).
_CHILD = r"""
import json, sys, time
def hwm_mib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except OSError:
        return None
t0 = time.perf_counter()
from libmoe_core.cli import build_parser
args = build_parser().parse_args(sys.argv[1:])
t1 = time.perf_counter()
base = hwm_mib()
code = int(args.func(args) or 0)
t2 = time.perf_counter()
sys.stderr.write("\nLIBMOE_BENCH " + json.dumps({"startup_s": t1 - t0, "run_s": t2 - t1, "base_mib": base,
                                                   "peak_mib": hwm_mib()}) + "\n")
sys.exit(code)
"""


def _run_child(libmoe_args: list[str]) -> dict:
    """Run ``libmoe <libmoe_args>`` in a child process: its start-up and run seconds, its RSS after
    start-up and its peak RSS (MiB; None where /proc is missing) and the wall time."""
    cmd = [sys.executable, "-c", _CHILD, *libmoe_args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        code = subprocess.run(cmd, check=False, stdout=out, stderr=err, text=True).returncode
        wall = time.perf_counter() - t0
        err.seek(0)
        log = err.read()
    if code != 0:
        sys.exit(f"command failed ({code}): libmoe {' '.join(libmoe_args)}\n{log}")
    stats = json.loads(log.rsplit("LIBMOE_BENCH ", 1)[1])
    return dict(stats, wall_s=wall)


def _mib(value) -> str:
    return "n/a (no /proc)" if value is None else f"{value:.0f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=TARGET_ROWS, help="trace rows to generate (default 50M)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=8, help="MoE layers per placement (3 placements)")
    p.add_argument("--tokens-per-doc", type=int, default=256)
    p.add_argument("--chunk-rows", type=int, default=250_000, help="rows per generated chunk = Parquet row group (the evaluation writer's part size)")
    p.add_argument("--files", type=int, default=8, help="part files")
    p.add_argument("--compression", default="zstd")
    p.add_argument("--batch-rows", type=int, default=None, help="analysis batch size (default: the library's)")
    p.add_argument("--compare", action="store_true", help="also time the comparison of two checkpoint traces")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the trace is written (deleted afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the generated trace")
    args = p.parse_args(argv)

    rows_per_doc = 3 * args.layers * args.tokens_per_doc
    docs = math.ceil(args.rows / rows_per_doc)
    rows = docs * rows_per_doc
    work = tempfile.mkdtemp(prefix="libmoe-analysis-bench-", dir=args.tmp)
    trace = os.path.join(work, "final")
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f} (measured under the machine's current load)")
    print(f"trace: {rows:,} rows = {docs:,} docs x 3 placements x {args.layers} layers x {args.tokens_per_doc} tokens; "
          f"E={args.experts}, k={args.top_k}; {args.files} {args.compression} part files under {work}")
    try:
        gen = _generate(trace, args, docs, rows_per_doc)
        size = _dir_size(trace)
        print(f"generated in {gen:.1f} s ({rows / gen / 1e6:.2f} M rows/s), {size / 2**30:.2f} GiB on disk")

        batch = ["--batch-rows", str(args.batch_rows)] if args.batch_rows else []
        run = _run_child(["analyze", trace, "--json", *batch])
        rate = rows / run["run_s"]
        print(f"start-up of the libmoe command (imports, argument parsing): {run['startup_s']:.1f} s, "
              f"{_mib(run['base_mib'])} RSS")
        print(f"libmoe analyze: {run['wall_s']:.1f} s wall for {rows:,} rows (interpreter start-up included); "
              f"the analysis alone {run['run_s']:.1f} s = {rate / 1e6:.2f} M rows/s")
        whole = run["wall_s"] - run["run_s"]  # interpreter, imports, parsing
        if rows >= TARGET_ROWS:
            print(f"time for {rows:,} rows (measured, incl. start-up): {run['wall_s']:.1f} s (target < 60 s)")
        else:
            print(f"time for {TARGET_ROWS:,} rows (EXTRAPOLATED from the measured rate, + start-up): "
                  f"{TARGET_ROWS / rate + whole:.1f} s (target < 60 s)")
        if run["peak_mib"] is not None:
            print(f"peak RSS of the analysis process: {run['peak_mib']:.0f} MiB "
                  f"({run['peak_mib'] - run['base_mib']:.0f} MiB above its RSS after start-up)")

        if args.compare:
            earlier = os.path.join(work, "earlier")
            _generate(earlier, args, docs, rows_per_doc, checkpoint="earlier", progress=0.5)
            run = _run_child(["analyze", earlier, trace, "--json", *batch])
            print(f"two checkpoints (metrics of both + row-aligned comparison): {run['wall_s']:.1f} s wall for "
                  f"2 x {rows:,} rows, the analysis alone {run['run_s']:.1f} s = {2 * rows / run['run_s'] / 1e6:.2f} "
                  f"M rows/s, peak RSS {_mib(run['peak_mib'])}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
