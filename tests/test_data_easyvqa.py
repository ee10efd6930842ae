"""The embedded easyvqa dataset, checked against the easy-vqa package's own QA pairs and pixels."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from easy_vqa import get_answers, get_test_questions, get_train_questions
from PIL import Image

from libmoe_core.cli import main
from libmoe_core.data.easyvqa import COLORS, SHAPES, build_easyvqa, image_attributes, question_type
from libmoe_core.data.validate import check_file

N = 40


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("easyvqa")
    meta = build_easyvqa(out, max_images=N)
    return out, meta


def load(out, name):
    return json.loads((Path(out) / name).read_text())


def package_pairs(split):
    qs, ans, ids = get_train_questions() if split == "train" else get_test_questions()
    per = defaultdict(list)
    for q, a, i in zip(qs, ans, ids):
        per[int(i)].append((q, a))
    return per


def test_answer_sets_cover_the_package():
    assert set(get_answers()) == set(COLORS) | set(SHAPES) | {"yes", "no"}
    assert {question_type(a) for a in get_answers()} == {"color", "shape", "yes_no"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_agree_with_every_qa_pair(built, split):
    out, meta = built
    caps = load(out, f"easyvqa_caption_{split}.json")
    per = package_pairs(split)
    assert meta["splits"][split]["caption_records"] == len(caps) > N * 0.8
    for rec in caps:
        img = int(rec["id"].rsplit("-", 1)[1])
        assert rec["image"] == f"{split}/{img}.png"
        human, gpt = rec["conversations"]
        assert human["value"].endswith("\n<image>")  # 558K pretrain style
        color, shape = rec["color"], rec["shape"]
        assert gpt["value"] == " ".join(["a"] + [color] * bool(color) + [shape or "shape"])
        for q, a in per[img]:  # independent oracle: every open question of this image
            if q.startswith(("what color", "what is the color")):
                assert color in (a, None)
            if q in ("what shape is in the image?", "what shape does the image contain?", "what shape is present?"):
                assert shape in (a, None)
            if color and q in (f"is there a {color} shape?", f"is a {color} shape present?"):
                assert a == "yes"
            if shape and q in (f"is there a {shape}?", f"does the image contain a {shape}?"):
                assert a == "yes"


def test_caption_colour_matches_pixels(built):
    out, _ = built
    channel = {"red": 0, "green": 1, "blue": 2}
    checked = 0
    for rec in load(out, "easyvqa_caption_train.json"):
        if rec["color"] not in channel:
            continue
        px = np.asarray(Image.open(out / "images" / rec["image"]).convert("RGB")).reshape(-1, 3)
        vals, counts = np.unique(px, axis=0, return_counts=True)
        shape_rgb = vals[counts.argsort()[::-1][1]]  # most common colour after the background
        assert int(np.argmax(shape_rgb)) == channel[rec["color"]], (rec["id"], shape_rgb)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("split", ["train", "test"])
def test_qa_records_one_per_question_with_types(built, split):
    out, meta = built
    qa = load(out, f"easyvqa_qa_{split}.json")
    per = package_pairs(split)
    expected = [(img, q, a) for img in sorted(per)[:N] for q, a in per[img]]
    assert len(qa) == len(expected) == meta["splits"][split]["qa_records"]
    for rec, (img, q, a) in zip(qa, expected):
        assert rec["image"] == f"{split}/{img}.png"
        assert rec["question"] == q and rec["answer"] == a
        assert rec["conversations"][0]["value"].startswith("<image>\n")  # 665K style
        assert rec["conversations"][1] == {"from": "gpt", "value": a}
        words = q.split()
        if q.startswith(("what color", "what is the color")):
            assert rec["question_type"] == "color"
        elif words[0] in ("is", "does"):
            assert rec["question_type"] == "yes_no"
        else:
            assert rec["question_type"] == "shape"


def test_splits_disjoint_and_output_valid(built):
    out, _ = built
    train = {r["image"] for r in load(out, "easyvqa_qa_train.json")}
    test = {r["image"] for r in load(out, "easyvqa_qa_test.json")}
    assert train and test and not train & test
    assert len(list((out / "images" / "train").iterdir())) == N
    for name in ("caption_train", "caption_test", "qa_train", "qa_test"):
        _, report = check_file(out / f"easyvqa_{name}.json", out / "images")
        assert report.ok, report.format()


def test_build_is_deterministic_and_multi_turn(built, tmp_path):
    out, _ = built
    assert main(["data", "build-easyvqa", str(tmp_path / "again"), "--max-images", str(N)]) == 0
    for name in ("easyvqa_caption_train.json", "easyvqa_qa_test.json", "easyvqa_meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes()
    meta = build_easyvqa(tmp_path / "multi", max_images=3, qa_per_record=4)
    recs = load(tmp_path / "multi", "easyvqa_qa_train.json")
    assert sum(len(r["question"]) for r in recs) == meta["splits"]["train"]["questions"]
    first = recs[0]["conversations"]
    assert len(first) == 8 and first[0]["value"].startswith("<image>\n")
    assert all("<image>" not in t["value"] for t in first[1:])


def test_contradictions_are_refused():
    assert image_attributes(["what color is the shape?"], ["red"]) == {"color": "red", "shape": None}
    with pytest.raises(ValueError, match="contradictory color"):
        image_attributes(["what color is the shape?", "is there a red shape?"], ["red", "no"])
