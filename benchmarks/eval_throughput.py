"""Evaluation throughput of the `libmoe` lmms-eval model on the easy-VQA test split.

    python benchmarks/eval_throughput.py [--model-path DIR] [--docs 256] [--json]

Documents/s of `LibMoE.generate_until` (the code lmms-eval calls) at batch 1 and 8, with
and without expert recording (Parquet traces of every layer). Without --model-path a
tiny MoE model (vision + projector + two LLM layers) is built; it is untrained, so
its answers run to the task's max_new_tokens (16). The warm-up (8 documents) is not in the
timed trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


class Request:
    def __init__(self, args):
        self.args = args


def requests_for(docs, max_new_tokens: int):
    from libmoe_core.evaluation.tasks.easyvqa.utils import easyvqa_doc_to_text, easyvqa_doc_to_visual

    kwargs = {"max_new_tokens": max_new_tokens, "until": ["\n\n"], "do_sample": False, "temperature": 0}
    post = {"post_prompt": ""}
    return [Request((easyvqa_doc_to_text(d, post), dict(kwargs), easyvqa_doc_to_visual, i, "easyvqa", "test"))
            for i, d in enumerate(docs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from libmoe_core.evaluation.lmms_model import LibMoE
    from libmoe_core.evaluation.local_tasks import easyvqa_records
    from libmoe_core.evaluation.traces import TraceWriter

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_path
        if path is None:
            import torch

            from libmoe_core.model.presets import build_model, build_processor

            torch.manual_seed(0)
            path = str(Path(tmp) / "tiny")
            build_model("tiny", moe_vision=True, moe_projector=True, moe_llm_layers=[1, 3]).save_pretrained(path)
            build_processor("tiny").save_pretrained(path)
        docs = easyvqa_records()[: args.docs]
        rows = []
        for record in (False, True):
            for batch in (1, 8):
                extra = {"return_id_experts": True, "trace_dir": str(Path(tmp) / f"traces-{batch}")} if record else {}
                lm = LibMoE(pretrained=path, batch_size=batch, **extra)
                lm.task_dict = {"easyvqa": {"test": docs}}
                reqs = requests_for(docs, 16)
                lm.generate_until(reqs[:8])  # warm-up
                if record:  # its rows go to their own folder, not the timed trace
                    lm.writer.close()
                    lm.writer = TraceWriter(timed := Path(tmp) / f"timed-{batch}", overwrite=True, prefix="part-r0")
                started = time.perf_counter()
                lm.generate_until(reqs)
                lm.clean()
                seconds = time.perf_counter() - started
                if record:
                    keys = pq.read_table(timed, columns=["doc_id", "placement", "layer", "position"]).to_pandas()
                    if set(keys["doc_id"]) != set(range(len(docs))) or keys.duplicated().any():
                        sys.exit(f"the timed trace should hold each of documents 0..{len(docs) - 1} once: "
                                 f"{keys.duplicated().sum()} repeated rows")
                row = {"batch_size": batch, "record_experts": record, "docs": len(docs),
                       "docs_per_s": round(len(docs) / seconds, 2)}
                rows.append(row)
                if not args.json:
                    print(f"batch {batch}  record_experts={record!s:<5}  {row['docs_per_s']:7.2f} docs/s", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
