"""The easyvqa lmms-eval task: data file, prepared YAML, prompt and scoring functions."""

import importlib.util
import json
import math

import pytest

from libmoe_core.evaluation.local_tasks import easyvqa_records, prepare_local_tasks
from libmoe_core.evaluation.tasks.easyvqa import utils as task


@pytest.fixture(scope="module")
def records():
    return easyvqa_records()


def test_records_cover_the_test_split(records):
    from easy_vqa import get_test_questions

    questions, answers, _ = get_test_questions()
    assert len(records) == len(questions) == 9673
    assert [r["doc_id"] for r in records[:3]] == [0, 1, 2]
    assert records[5]["question"] == questions[5] and records[5]["answer"] == answers[5]
    assert set(records[0]) == {"doc_id", "image_id", "image_path", "question", "answer", "question_type"}


def test_question_type_agrees_with_the_answer_vocabulary(records):
    shapes = {"circle", "rectangle", "triangle"}
    for r in records:
        expected = "yesno" if r["answer"] in ("yes", "no") else "shape" if r["answer"] in shapes else "colour"
        assert r["question_type"] == expected, r
    assert {r["question_type"] for r in records} == set(task.QUESTION_TYPES)


def test_prepare_writes_a_concrete_yaml_next_to_the_data(tmp_path):
    root = prepare_local_tasks(["pope", "easyvqa"], tmp_path / "tasks")
    assert root == (tmp_path / "tasks").resolve()
    data = root / "easyvqa" / "easyvqa_test.jsonl"
    lines = data.read_text().splitlines()
    assert len(lines) == 9673 and json.loads(lines[0])["doc_id"] == 0
    yaml_text = (root / "easyvqa" / "easyvqa.yaml").read_text()
    assert f'test: "{data}"' in yaml_text
    assert prepare_local_tasks(["pope"], tmp_path / "other") is None
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
def test_prepared_yaml_loads_in_lmms_eval(tmp_path):
    from lmms_eval.utils import load_yaml_config

    root = prepare_local_tasks(["easyvqa"], tmp_path)
    config = load_yaml_config(str(root / "easyvqa" / "easyvqa.yaml"))
    assert config["task"] == "easyvqa" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(root / "easyvqa" / "easyvqa_test.jsonl")
    assert config["process_results"] is task.easyvqa_process_results
    assert [m["metric"] for m in config["metric_list"]] == [
        "exact_match", "exact_match_colour", "exact_match_shape", "exact_match_yesno"]


def test_prompt_and_image(records):
    doc = records[0]
    question = doc["question"][:1].upper() + doc["question"][1:]  # as in the training records
    text = task.easyvqa_doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": "\nShort answer."})
    assert text == f"Q: {question}\nShort answer."
    assert task.easyvqa_doc_to_text(doc) == question
    (image,) = task.easyvqa_doc_to_visual(doc)
    assert image.mode == "RGB" and image.size[0] > 0


def test_normalisation_and_scores():
    assert task.normalize_answer("  Red. ") == "red"
    assert task.normalize_answer("YES!") == "yes"
    assert task.normalize_answer("light  blue") == "light blue"
    doc = {"answer": "circle", "question_type": "shape"}
    out = task.easyvqa_process_results(doc, ["Circle."])
    assert out["exact_match"] == 1.0 and out["exact_match_shape"] == {"question_type": "shape", "score": 1.0}
    assert task.easyvqa_process_results(doc, ["a circle"])["exact_match"] == 0.0


def test_per_type_aggregation():
    results = [{"question_type": "yesno", "score": 1.0}, {"question_type": "yesno", "score": 0.0},
               {"question_type": "colour", "score": 1.0}]
    assert task.easyvqa_aggregate_yesno(results) == 0.5
    assert task.easyvqa_aggregate_colour(results) == 1.0
    assert math.isnan(task.easyvqa_aggregate_shape(results))
