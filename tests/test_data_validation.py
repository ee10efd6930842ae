"""Validation: hand-built records with known problems, reported by file, line and id."""

import json
import logging

import pytest
from PIL import Image

from libmoe_core.cli import main
from libmoe_core.data.dataset import LLaVADataset
from libmoe_core.data.records import read_records
from libmoe_core.data.tiny_tokenizer import build_tiny_tokenizer
from libmoe_core.data.validate import DataValidationError, apply_policy, check_file


def conv(q="<image>\nWhat is it?", a="a circle"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def folder(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img / "good.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(img / "good2.png")
    (img / "broken.jpg").write_bytes(b"this is not a jpeg")
    return tmp_path


GOOD = [
    {"id": "ok-image", "image": "good.png", "conversations": conv()},
    {"id": "ok-text", "conversations": conv("Hi", "Hello") + conv("More?", "No.")},
    {"id": "ok-two", "image": ["good.png", "good2.png"], "conversations": conv("<image> vs <image>: same?", "no")},
    {"id": "ok-pretrain", "image": "good.png", "conversations": conv("Describe.\n<image>", "a red square")},
]
BAD = {
    "missing-image": {"id": "missing-image", "image": "nope.png", "conversations": conv()},
    "broken-image": {"id": "broken-image", "image": "broken.jpg", "conversations": conv()},
    "wrong-role": {"id": "wrong-role", "image": "good.png",
                   "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "robot", "value": "a"}]},
    "wrong-order": {"id": "wrong-order", "conversations": [{"from": "gpt", "value": "a"},
                                                           {"from": "human", "value": "q"}]},
    "count-mismatch": {"id": "count-mismatch", "image": ["good.png", "good2.png"], "conversations": conv()},
    "placeholder-no-image": {"id": "placeholder-no-image", "conversations": conv()},
    "empty-answer": {"id": "empty-answer", "image": "good.png", "conversations": conv(a="  ")},
    "ends-with-human": {"id": "ends-with-human", "conversations": conv("a", "b") + [{"from": "human", "value": "c"}]},
}
EXPECT = {
    "missing-image": "image file not found",
    "broken-image": "unreadable image",
    "wrong-role": "unknown role 'robot'",
    "wrong-order": "role 'assistant' where 'user' was expected",
    "count-mismatch": "1 <image> placeholders but 2 images",
    "placeholder-no-image": "1 <image> placeholders but 0 images",
    "empty-answer": "empty answer",
    "ends-with-human": "last turn is not from gpt",
}


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_every_bad_record_is_named(folder):
    path = write_json(folder / "data.json", GOOD + list(BAD.values()))
    loaded, report = check_file(path, folder / "img")
    assert len(loaded.records) == len(GOOD) + len(BAD)
    assert not report.ok
    by_id = {}
    for p in report.problems:
        assert p.file == str(path)
        by_id.setdefault(p.record_id, []).append(str(p))
    assert set(by_id) == set(BAD)
    for rid, msg in EXPECT.items():
        assert any(msg in line and str(path) in line and repr(rid) in line for line in by_id[rid]), by_id[rid]
    text = report.format()
    for rid in BAD:
        assert repr(rid) in text


def test_jsonl_malformed_lines_report_line_numbers(folder):
    lines = [json.dumps(GOOD[0]), "{not json", json.dumps(GOOD[1]), "", "[1, 2]", json.dumps(BAD["empty-answer"])]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded, report = check_file(path, folder / "img")
    assert [r.id for r in loaded.records] == ["ok-image", "ok-text", "empty-answer"]
    assert [r.line for r in loaded.records] == [1, 3, 6]
    msgs = [str(p) for p in report.problems]
    assert any(m.startswith(f"{path}:2") and "malformed JSON" in m for m in msgs)
    assert any(m.startswith(f"{path}:5") and "not an object" in m for m in msgs)
    assert any(m.startswith(f"{path}:6 record 'empty-answer'") for m in msgs)
    assert len(msgs) == 3


def test_malformed_json_list_reports_line(folder):
    path = folder / "bad.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b",, }\n]')
    _, report = check_file(path)
    assert len(report.problems) == 1 and str(report.problems[0]).startswith(f"{path}:3")


def test_length_check_after_image_expansion(folder):
    tok = build_tiny_tokenizer()
    rec = {"id": "long", "image": "good.png", "conversations": conv()}
    path = write_json(folder / "len.json", [rec])
    from libmoe_core.data.templates import get_template

    n_text = len(get_template("chatml").render(rec["conversations"], tok)[0])
    kwargs = {"tokenizer": tok, "template": "chatml", "num_image_tokens": 10}
    _, ok = check_file(path, folder / "img", max_length=n_text + 9, **kwargs)  # <image> is 1 of the n_text
    assert ok.ok
    _, bad = check_file(path, folder / "img", max_length=n_text + 8, **kwargs)
    assert len(bad.problems) == 1
    assert f"{n_text + 9} tokens after image expansion > max length {n_text + 8}" in str(bad.problems[0])
    # template-specific structure problems are reported, not raised
    multi = write_json(folder / "multi.json", [{"id": "mt", "conversations": conv("a", "b") + conv("c", "d")}])
    _, rep = check_file(multi, None, tokenizer=tok, template="plain", max_length=100)
    assert "template 'plain'" in str(rep.problems[0]) and rep.problems[0].record_id == "mt"


def test_policy_error_and_skip(folder, caplog):
    path = write_json(folder / "data.json", GOOD + [BAD["empty-answer"], BAD["missing-image"]])
    with pytest.raises(DataValidationError, match="empty-answer"):
        LLaVADataset.from_files(path, folder / "img")
    with caplog.at_level(logging.WARNING):
        ds = LLaVADataset.from_files(path, folder / "img", policy="skip")
    assert [r.id for r in ds.records] == [r["id"] for r in GOOD]
    assert "dropped 2 of 6 records" in caplog.text
    assert "'missing-image'" in caplog.text
    loaded = read_records(path)
    with pytest.raises(ValueError, match="unknown data policy"):
        apply_policy(loaded, check_file(path)[1], policy="mask")


def test_cli_check_exit_codes(folder, capsys):
    good = write_json(folder / "good.json", GOOD)
    assert main(["data", "check", str(good), "--image-folder", str(folder / "img")]) == 0
    assert "no problems" in capsys.readouterr().out
    bad = write_json(folder / "bad.json", GOOD + list(BAD.values()))
    assert main(["data", "check", str(bad), "--image-folder", str(folder / "img")]) == 1
    out = capsys.readouterr().out
    for rid in BAD:
        assert repr(rid) in out
