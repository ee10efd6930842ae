"""Tiny-preset forward+backward time, dense vs each MoE placement, on this machine (fp32).

Batch: 8 samples of 16 image tokens + 48 text tokens (the easy-VQA shape), smoe router,
4 experts, top-2. Median (and min) of ``--repeats`` timed steps after 3 warm-up rounds,
variants interleaved round-robin.

    python benchmarks/model_fwd_bwd.py [--repeats 10] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from libmoe_core.model.presets import build_model

VARIANTS = {
    "dense": {},
    "vision (all 2 kept layers)": {"moe_vision": True},
    "projector": {"moe_projector": True},
    "llm every_other (2 of 4)": {"moe_llm_layers": "every_other"},
    "llm all (4 of 4)": {"moe_llm_layers": "all"},
    "vision+projector (LibMoE)": {"moe_vision": True, "moe_projector": True},
    "all three": {"moe_vision": True, "moe_projector": True, "moe_llm_layers": "every_other"},
}


def make_batch(model, batch=8, text=48):
    t = model.config.num_image_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 400, (batch, t + text), generator=g)
    ids[:, 2:2 + t] = model.config.image_token_id
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    return dict(input_ids=ids, labels=labels, pixel_values=torch.randn(batch, 3, 64, 64, generator=g))


def step_seconds(model, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: build_model("tiny", **kwargs).train() for name, kwargs in VARIANTS.items()}
    batches = {name: make_batch(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(3 + args.repeats):  # round-robin, so load changes on a shared machine hit every variant
        for name, model in models.items():
            seconds = step_seconds(model, batches[name])
            if i >= 3:
                times[name].append(seconds)
    results = [{"variant": n, "seconds": statistics.median(t), "min_seconds": min(t)} for n, t in times.items()]
    base = results[0]["seconds"]
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    print(f"tiny preset, batch 8 x 64 tokens, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| variant | fwd+bwd ms (median) | min ms | vs dense |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['min_seconds'] * 1e3:.1f} | {r['seconds'] / base:.2f}x |")


if __name__ == "__main__":
    main()
