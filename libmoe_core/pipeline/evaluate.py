"""The evaluation stage: run lmms-eval on a trained model, score easy-VQA per question type
with standard errors, and compare with baselines that never look at the image."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

QUESTION_TYPES = ("colour", "shape", "yesno")


def eval_dir(run_dir: str | Path, router: str) -> Path:
    """The evaluation folder of ``router`` (a LibMoE alias names the same folder) in a run."""
    from ..moe import resolve_router_name

    return Path(run_dir) / f"eval-{resolve_router_name(router)}"


def sft_model_dir(run_dir: str | Path, router: str) -> Path:
    """The final model the sft stage trained with ``router`` (its folder has our router name)."""
    from ..moe import resolve_router_name

    return Path(run_dir) / f"sft-{resolve_router_name(router)}" / "final"


def run_eval_stage(model_path: str | Path, out_dir: str | Path, *, tasks=("easyvqa",), limit: int | None = None,
                   batch_size: int = 8, record_experts: bool = True, layers=None, placements=None,
                   checkpoint: str | None = None) -> dict:
    """Evaluate ``model_path``; writes ``eval_summary.json`` in ``out_dir`` and returns it."""
    from ..evaluation.benchmarks import expand_tasks
    from ..evaluation.model_args import parse_int_list, parse_placements
    from ..evaluation.runner import EvalConfig, run_evaluation
    from .notebook_params import as_list

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"model_path: no saved model in {model_path}; run the sft stage first")
    if not isinstance(record_experts, bool):  # papermill -p keeps "false" a (true) string
        raise ValueError(f"record_experts must be True or False, got {record_experts!r}")  # noqa: TRY004 (a parameter error)
    try:  # -p placements llm / -p layers 1 arrive as a string / an int; -y gives lists
        placements = parse_placements(",".join(as_list(placements))) if placements else None
        layers = parse_int_list(layers)
    except (TypeError, ValueError) as err:
        raise ValueError(f"placements / layers: {err} (e.g. -p placements vision,llm -p layers '1 3')") from None
    task_list = expand_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    cfg = EvalConfig(
        model_path=str(model_path), tasks=task_list, output_path=Path(out_dir), batch_size=batch_size, limit=limit,
        return_id_experts=record_experts, layers=layers, placements=placements,
        log_samples=True, extra_model_args={"checkpoint": checkpoint or checkpoint_label(model_path)},
    )
    outcome = run_evaluation(cfg, overwrite_traces=True, stream=None)
    summary = {
        "model_path": str(model_path), "results_file": str(outcome.results_path), "tasks": task_list,
        "metrics": [dataclasses.asdict(row) for row in outcome.rows],
        "traces": str(outcome.trace_dir) if outcome.trace_dir else None,
    }
    if "easyvqa" in task_list:
        scores = easyvqa_scores(outcome.results_path)
        summary["easyvqa"] = accuracy_by_type(scores)
        summary["easyvqa_doc_ids"] = sorted(d for d, _, _ in scores)
    (Path(out_dir) / "eval_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def checkpoint_label(model_path: str | Path) -> str:
    """The traces' checkpoint name of a model: ``sft-smoe`` for ``.../sft-smoe/final``,
    ``sft-smoe/checkpoint-500`` for ``.../sft-smoe/checkpoints/checkpoint-500``, else the folder name."""
    path = Path(model_path).resolve()
    if path.name == "final":
        return path.parent.name
    return f"{path.parents[1].name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def easyvqa_scores(results_path: str | Path) -> list[tuple[int, str, float]]:
    """(doc_id, question_type, score) of every easyvqa document in the sample log of the lmms-eval run
    that wrote ``results_path`` (``<date>_results.json``: the log is ``<date>_samples_easyvqa.jsonl`` beside it)."""
    results_path = Path(results_path)
    samples = results_path.with_name(results_path.name.removesuffix("_results.json") + "_samples_easyvqa.jsonl")
    if not samples.is_file():
        raise FileNotFoundError(f"no easyvqa sample log {samples.name} beside {results_path} (was --log_samples on?)")
    rows = []
    for line in samples.read_text().splitlines():
        if line.strip():
            sample = json.loads(line)
            typed = sample["exact_match_colour"]  # {"question_type", "score"} for every document
            rows.append((int(sample["doc_id"]), typed["question_type"], float(typed["score"])))
    return rows


def accuracy_by_type(scores) -> dict:
    """{"overall" | type: {"accuracy", "stderr", "n"}}; stderr = sqrt(p (1 - p) / n)."""
    groups = defaultdict(list)
    for _, qtype, score in scores:
        groups["overall"].append(score)
        groups[qtype].append(score)
    out = {}
    for name in ("overall", *QUESTION_TYPES):
        values = groups.get(name, [])
        n = len(values)
        p = sum(values) / n if n else math.nan
        out[name] = {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n) if n else math.nan, "n": n}
    return out


def _normalise(question: str) -> str:
    return " ".join(question.lower().strip().rstrip("?").split())


def easyvqa_baselines(doc_ids: list[int] | None = None) -> dict:
    """Majority-answer and question-only baselines on the given test documents.

    majority: the most frequent training answer for every question. question-only: the
    most frequent training answer of the same question string (never looks at the image;
    unseen questions fall back to the majority answer).
    """
    from easy_vqa import get_train_questions

    from ..evaluation.local_tasks import easyvqa_records
    from ..evaluation.tasks.easyvqa.utils import normalize_answer

    train_q, train_a, _ = get_train_questions()
    majority = Counter(train_a).most_common(1)[0][0]
    by_question = defaultdict(Counter)
    for q, a in zip(train_q, train_a):
        by_question[_normalise(q)][a] += 1
    docs = easyvqa_records()
    chosen = [docs[i] for i in doc_ids] if doc_ids is not None else docs
    out = {}
    for name, answer in (("majority answer", lambda d: majority),
                         ("question only", lambda d: (by_question.get(_normalise(d["question"])) or Counter({majority: 1})).most_common(1)[0][0])):
        scores = [(d["doc_id"], d["question_type"], float(normalize_answer(answer(d)) == normalize_answer(d["answer"])))
                  for d in chosen]
        out[name] = accuracy_by_type(scores)
    return out


def accuracy_table(rows: dict[str, dict]):
    """DataFrame: one row per system, columns overall / colour / shape / yes-no as 'acc ± se'."""
    import pandas as pd

    labels = {"overall": "overall", "colour": "colour", "shape": "shape", "yesno": "yes/no"}
    table = {
        system: {labels[k]: f"{v[k]['accuracy']:.3f} ± {v[k]['stderr']:.3f}" for k in labels if k in v}
        for system, v in rows.items()
    }
    frame = pd.DataFrame(table).T
    frame.index.name = "system"
    return frame
