"""The embedded ``easyvqa`` dataset, built offline from the ``easy-vqa`` package.

``build_easyvqa(out_dir)`` writes LLaVA-format JSON files and an image folder::

    OUT_DIR/images/{train,test}/<image_id>.png
    OUT_DIR/easyvqa_caption_{train,test}.json   # pretrain / PFT: "a blue circle"
    OUT_DIR/easyvqa_qa_{train,test}.json        # SFT: one record per question (or grouped)
    OUT_DIR/easyvqa_meta.json                   # counts, answers, question types

Captions come from the package's QA pairs of each image: open questions give the
colour/shape directly, yes/no questions say which colours/shapes are (not) present.
QA records carry ``question``, ``answer`` and ``question_type`` (``color``, ``shape`` or
``yes_no``, decided by the answer: the three answer sets are disjoint). Output is
deterministic; train and test images are disjoint (asserted by path and content).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

from ..tokens import IMAGE_PLACEHOLDER
from .records import write_records

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
QUESTION_TYPES = ("color", "shape", "yes_no")
# Version of the files build_easyvqa writes; a cached copy of another version is rebuilt.
# 2: questions without LLaVA's "Answer the question using a single word or phrase." suffix
#    (every easy-VQA answer is one word; the suffix was a quarter of each sample's tokens).
FORMAT_VERSION = 2
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short caption for the image.",
    "Summarize the visual content of the image.",
)


def question_type(answer: str) -> str:
    """``color``, ``shape`` or ``yes_no`` for an easy-VQA answer."""
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    if answer in YES_NO:
        return "yes_no"
    raise ValueError(f"unknown easy-VQA answer {answer!r}")


def _facts(question: str, answer: str) -> list[tuple[str, bool]]:
    """``(word, present)`` facts about colours/shapes that one QA pair states."""
    words = set(re.findall(r"[a-z]+", question.lower())) & set(COLORS + SHAPES)
    if answer in COLORS or answer in SHAPES:
        return [(w, True) for w in words | {answer}]
    negated = " not " in f" {question} " or question.startswith("is no ")
    present = (answer == "yes") != negated
    if len(words) == 1:
        return [(next(iter(words)), present)]
    return [(w, True) for w in words] if present else []


def image_attributes(questions: list[str], answers: list[str]) -> dict[str, str | None]:
    """Colour and shape of one image from its QA pairs (``None`` where they do not tell).

    Raises ``ValueError`` if the pairs contradict each other.
    """
    present, absent = defaultdict(set), defaultdict(set)
    for q, a in zip(questions, answers):
        for word, is_present in _facts(q, a):
            kind = "color" if word in COLORS else "shape"
            (present if is_present else absent)[kind].add(word)
    out: dict[str, str | None] = {}
    for kind, universe in (("color", COLORS), ("shape", SHAPES)):
        known = present[kind] or (set(universe) - absent[kind] if len(set(universe) - absent[kind]) == 1 else set())
        if len(known) > 1 or known & absent[kind]:
            raise ValueError(f"contradictory {kind} facts: present {sorted(present[kind])}, absent {sorted(absent[kind])}")
        out[kind] = next(iter(known)) if known else None
    return out


def caption_for(attrs: dict[str, str | None]) -> str | None:
    """``"a blue circle"``, ``"a blue shape"``, ``"a circle"`` or ``None`` if nothing is known."""
    if attrs["color"] is None and attrs["shape"] is None:
        return None
    return " ".join(["a", *([attrs["color"]] if attrs["color"] else []), attrs["shape"] or "shape"])


def _load_split(split: str):
    import easy_vqa

    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in zip(qs, ans, ids):
        per_image[int(i)].append((q, a))
    return per_image, {int(k): Path(v) for k, v in paths.items()}


def _split_records(split: str, per_image, image_ids: list[int], qa_per_record: int):
    captions, qa, skipped = [], [], []
    for img in image_ids:
        pairs = per_image[img]
        rel = f"{split}/{img}.png"
        attrs = image_attributes([q for q, _ in pairs], [a for _, a in pairs])
        cap = caption_for(attrs)
        if cap is None:
            skipped.append(img)
        else:
            prompt = CAPTION_PROMPTS[img % len(CAPTION_PROMPTS)]
            captions.append({
                "id": f"easyvqa-cap-{split}-{img}", "image": rel,
                "conversations": [{"from": "human", "value": f"{prompt}\n{IMAGE_PLACEHOLDER}"},
                                  {"from": "gpt", "value": cap}],
                "color": attrs["color"], "shape": attrs["shape"],
            })
        for start in range(0, len(pairs), qa_per_record):
            group = pairs[start:start + qa_per_record]
            conv = []
            for k, (q, a) in enumerate(group):
                text = f"{q[:1].upper()}{q[1:]}"
                conv += [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{text}" if k == 0 else text},
                         {"from": "gpt", "value": a}]
            rec = {"id": f"easyvqa-qa-{split}-{img}-{start}", "image": rel, "conversations": conv}
            if qa_per_record == 1:
                rec.update(question=group[0][0], answer=group[0][1], question_type=question_type(group[0][1]))
            else:
                rec.update(question=[q for q, _ in group], answer=[a for _, a in group],
                           question_type=[question_type(a) for _, a in group])
            qa.append(rec)
    return captions, qa, skipped


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_easyvqa(out_dir: str | Path, *, max_images: int | None = None, qa_per_record: int = 1) -> dict:
    """Write the easyvqa dataset under ``out_dir``; returns the metadata (also in ``easyvqa_meta.json``).

    ``max_images`` keeps the first N images (by id) of each split, for quick runs.
    ``qa_per_record`` > 1 groups that many questions of one image in a multi-turn record.
    """
    if qa_per_record < 1:
        raise ValueError("qa_per_record must be >= 1")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None (all images), got {max_images}")
    out = Path(out_dir)
    meta: dict = {"name": "easyvqa", "format_version": FORMAT_VERSION, "source": "easy-vqa==1.0 (pip)",
                  "qa_per_record": qa_per_record,
                  "question_types": list(QUESTION_TYPES), "answers": list(COLORS + SHAPES + YES_NO), "splits": {}}
    digests: dict[str, set[str]] = {}
    for split in ("train", "test"):
        per_image, paths = _load_split(split)
        image_ids = sorted(per_image)[:max_images]  # max_images None: all
        missing = [i for i in image_ids if i not in paths]
        if missing:
            raise FileNotFoundError(f"easy-vqa {split}: no image file for ids {missing[:10]}")
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        for i in image_ids:
            shutil.copyfile(paths[i], img_dir / f"{i}.png")
        digests[split] = {_digest(img_dir / f"{i}.png") for i in image_ids}
        captions, qa, skipped = _split_records(split, per_image, image_ids, qa_per_record)
        write_records(captions, out / f"easyvqa_caption_{split}.json")
        write_records(qa, out / f"easyvqa_qa_{split}.json")
        types = defaultdict(int)
        for q, a in (p for i in image_ids for p in per_image[i]):
            types[question_type(a)] += 1
        meta["splits"][split] = {"images": len(image_ids), "caption_records": len(captions),
                                 "images_without_caption": len(skipped), "qa_records": len(qa),
                                 "questions": sum(types.values()), "question_types": dict(sorted(types.items()))}
    overlap = digests["train"] & digests["test"]
    assert not overlap, f"{len(overlap)} images appear in both easyvqa train and test"
    meta["image_folder"] = "images"
    (out / "easyvqa_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
