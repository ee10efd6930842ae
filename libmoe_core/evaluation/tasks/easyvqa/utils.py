"""Functions of the ``easyvqa`` lmms-eval task: prompt, image, scoring.

A document (one line of the generated JSONL) has the fields ``doc_id``, ``image_id``,
``image_path``, ``question``, ``answer`` and ``question_type`` (``colour``, ``shape`` or
``yesno``). The score is exact match after :func:`normalize_answer`, overall and per
question type.
"""

from __future__ import annotations

import math
import re
import string

QUESTION_TYPES = ("colour", "shape", "yesno")

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_YESNO_START = ("is ", "are ", "does ", "do ", "can ")


def question_type(question: str) -> str:
    """``yesno`` for is/does questions, ``colour`` when it asks for a colour, else ``shape``.

    easy-VQA's questions follow a handful of templates ("what color is the shape?",
    "what is the red shape?", "is there a circle?", "does the image not contain ...?").
    """
    q = question.strip().lower()
    if q.startswith(_YESNO_START):
        return "yesno"
    if "color" in q or "colour" in q:
        return "colour"
    return "shape"


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, collapse whitespace: ``" Red."`` -> ``"red"``."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def easyvqa_doc_to_visual(doc: dict) -> list:
    """The document's image as a one-element list of RGB PIL images."""
    from PIL import Image

    with Image.open(doc["image_path"]) as img:
        return [img.convert("RGB")]


def easyvqa_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """``pre_prompt + Question + post_prompt`` (no image placeholder: the model adds its own).

    The question's first letter is capitalised, as in the kit's easy-VQA training records.
    """
    kwargs = lmms_eval_specific_kwargs or {}
    question = doc["question"].strip()
    question = question[:1].upper() + question[1:]
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


def easyvqa_process_results(doc: dict, results: list) -> dict:
    """Exact match of the first generation against the answer, plus its question type."""
    score = float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))
    typed = {"question_type": doc["question_type"], "score": score}
    return {
        "exact_match": score,
        "exact_match_colour": typed,
        "exact_match_shape": typed,
        "exact_match_yesno": typed,
    }


def _typed_mean(results: list, qtype: str) -> float:
    scores = [r["score"] for r in results if r["question_type"] == qtype]
    return sum(scores) / len(scores) if scores else math.nan


def easyvqa_aggregate_colour(results: list) -> float:
    """Accuracy on colour questions (NaN when there are none)."""
    return _typed_mean(results, "colour")


def easyvqa_aggregate_shape(results: list) -> float:
    """Accuracy on shape questions (NaN when there are none)."""
    return _typed_mean(results, "shape")


def easyvqa_aggregate_yesno(results: list) -> float:
    """Accuracy on yes/no questions (NaN when there are none)."""
    return _typed_mean(results, "yesno")
