"""Throughput of the routing analysis on a large synthetic trace (default: 50 million rows).

Generates a trace with the trace schema in chunks under a temporary directory
(zstd part files, as the evaluation writer does), runs ``libmoe analyze --json`` on
it in a child process (so its peak memory is the analysis alone), prints rows/s,
the time for 50M rows (measured or extrapolated, labelled) and the peak RSS, then
deletes the trace. Optionally also times the checkpoint comparison of two traces.

    python benchmarks/analysis_throughput.py                 # 50M rows, k=2, E=4
    python benchmarks/analysis_throughput.py --rows 10000000 # smaller; prints the extrapolation

Numbers depend on the machine and its load; nothing is asserted.
"""

from __future__ import annotations

import argparse
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


def _run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process (its own rusage, via wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()}")
    return wall, usage.ru_maxrss / 1024.0


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

        cmd = [sys.executable, "-m", "libmoe_core.cli", "analyze", trace, "--json"]
        if args.batch_rows:
            cmd += ["--batch-rows", str(args.batch_rows)]
        startup, base = _run_child([sys.executable, "-m", "libmoe_core.cli", "--help"])
        wall, peak = _run_child(cmd)
        rate = rows / max(wall - startup, 1e-9)
        print(f"start-up of the libmoe command (imports, incl. torch): {startup:.1f} s, {base:.0f} MiB RSS")
        print(f"libmoe analyze: {wall:.1f} s wall for {rows:,} rows; excluding start-up "
              f"{wall - startup:.1f} s = {rate / 1e6:.2f} M rows/s")
        if rows >= TARGET_ROWS:
            print(f"time for {rows:,} rows (measured, incl. start-up): {wall:.1f} s (target < 60 s)")
        else:
            print(f"time for {TARGET_ROWS:,} rows (EXTRAPOLATED from the measured rate, + start-up): "
                  f"{TARGET_ROWS / rate + startup:.1f} s (target < 60 s)")
        print(f"peak RSS of the analysis process: {peak:.0f} MiB ({peak - base:.0f} MiB above the start-up RSS)")

        if args.compare:
            earlier = os.path.join(work, "earlier")
            _generate(earlier, args, docs, rows_per_doc, checkpoint="earlier", progress=0.5)
            cmd = [sys.executable, "-m", "libmoe_core.cli", "analyze", earlier, trace, "--json"]
            wall, peak = _run_child(cmd)
            print(f"two checkpoints (metrics of both + row-aligned comparison): {wall:.1f} s wall for 2 x {rows:,} "
                  f"rows = {2 * rows / max(wall - startup, 1e-9) / 1e6:.2f} M rows/s excluding start-up, "
                  f"peak RSS {peak:.0f} MiB")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
