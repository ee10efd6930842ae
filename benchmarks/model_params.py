"""Parameter counts (total / active per token) of the tiny preset and the seed presets.

Seed presets are built on the meta device from their embedded configs: nothing is
downloaded. MoE rows use LibMoE's SFT setting (vision + projector MoE, 4 experts,
top-2) and an MoE-LLaVA-style LLM variant (every other decoder layer).

    python benchmarks/model_params.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from libmoe_core.model.presets import PRESETS, build_model
from libmoe_core.model.stats import parameter_counts

VARIANTS = {
    "dense": {},
    "moe vision+projector (E4 k2)": {"moe_vision": True, "moe_projector": True},
    "moe llm every_other (E4 k2)": {"moe_llm_layers": "every_other"},
    "moe all three (E4 k2)": {"moe_vision": True, "moe_projector": True, "moe_llm_layers": "every_other"},
}


def rows():
    for preset in PRESETS:
        for variant, kwargs in VARIANTS.items():
            with torch.device("meta"):
                model = build_model(preset, load_weights=False, num_experts=4, top_k=2, **kwargs)
            yield {"preset": preset, "variant": variant, **parameter_counts(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = list(rows())
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print("| preset | variant | total | active/token | vision | projector | llm |\n|---|---|---:|---:|---:|---:|---:|")
    for r in table:
        fmt = (lambda n: f"{n / 1e6:,.2f}M") if r["preset"] == "tiny" else (lambda n: f"{n / 1e9:,.3f}B")
        print(f"| {r['preset']} | {r['variant']} | {fmt(r['total'])} | {fmt(r['active'])} | {fmt(r['vision'])} | "
              f"{fmt(r['projector'])} | {fmt(r['llm'])} |")


if __name__ == "__main__":
    main()
