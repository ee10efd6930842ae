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
    with pytest.raises(DataValidationError, match=r"would drop 2 of 6 records and lines \(33.3%\), more than "
                                                  r"max_skipped_fraction=0.1"):
        LLaVADataset.from_files(path, folder / "img", policy="skip")  # a third is not a few bad records
    with caplog.at_level(logging.WARNING):
        ds = LLaVADataset.from_files(path, folder / "img", policy="skip", max_skipped_fraction=0.34)
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


# ---------------------------------------------------------------- file encodings, roles, images


def test_role_content_turns_and_role_case_count_their_image_placeholders(folder):
    records = [
        {"id": "role-content", "image": "good.png",
         "conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
        {"id": "capital-human", "image": "good.png",
         "conversations": [{"from": "Human", "value": "<image>\nq"}, {"from": "GPT", "value": "a"}]},
        {"id": "stray", "conversations": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]},
    ]
    _, report = check_file(write_json(folder / "roles.json", records), folder / "img")
    assert [(p.record_id, p.field) for p in report.problems] == [("stray", "image")]
    assert "1 <image> placeholders but 0 images" in str(report.problems[0])


def test_jsonl_lines_end_at_newline_only_and_round_trip(tmp_path):
    from libmoe_core.data.records import write_records

    records = [{"id": f"r{i}", "conversations": conv("q", f"line one\u2028line two {i}\u0085end")} for i in range(4)]
    loaded = read_records(write_records(records, tmp_path / "sep.jsonl"))
    assert not loaded.problems and [r.data for r in loaded.records] == records


def test_non_utf8_line_is_a_problem_naming_the_line_and_the_rest_is_read(tmp_path):
    good = json.dumps({"id": "a", "conversations": conv("q", "x")}).encode()
    bad = json.dumps({"id": "b", "conversations": conv("q", "caf?")}).encode().replace(b"?", b"\xe9")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b'"a"', b'"c"') + b"\n")
    loaded = read_records(path)
    assert [r.id for r in loaded.records] == ["a", "c"]
    assert [str(p) for p in loaded.problems] == [f"{path}:2: not UTF-8: byte 0xe9 (save the file as UTF-8)"]
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]")
    assert [str(p) for p in read_records(whole).problems] == [f"{whole}:3: not UTF-8: byte 0xe9 (save the file as UTF-8)"]


def test_json_files_with_a_bom_or_not_a_list(tmp_path):
    records = [{"id": f"r{i}", "conversations": conv("q", "a")} for i in range(4)]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=2).encode())
    loaded = read_records(bom)
    assert not loaded.problems and len(loaded.records) == 4
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": records}, indent=2))
    assert [p.message for p in read_records(wrapped).problems] == ["expected a JSON list of records, got dict"]
    lines = tmp_path / "lines.json"  # JSONL under a .json name: one clear problem, not one per line
    lines.write_text("\n".join(json.dumps(r) for r in records))
    problems = read_records(lines).problems
    assert len(problems) == 1 and "name the file .jsonl" in problems[0].message


def test_a_bad_image_field_names_the_record_wherever_it_is_read(tmp_path):
    from libmoe_core.data.records import Record

    rec = Record({"id": "n", "image": 5, "conversations": conv()}, "f.json", 0)
    with pytest.raises(ValueError, match=r"f.json record 'n' \(#0\) \[image\]: 'image' must be a string"):
        _ = rec.images


def test_a_missing_annotation_file_stops_even_the_skip_policy(folder):
    good = write_json(folder / "good.json", GOOD)
    with pytest.raises(FileNotFoundError, match="annotation file.* not found: .*nope.json"):
        LLaVADataset.from_files([good, folder / "nope.json"], folder / "img", policy="skip")


def test_relative_image_paths_without_an_image_folder_stop_every_policy(folder, monkeypatch):
    # they passed validation unchecked and failed at the first sample read (or read a file
    # of the same name in the working directory)
    path = write_json(folder / "rel.json", GOOD)
    monkeypatch.chdir(folder / "img")  # where "good.png" would silently resolve
    for policy in ("error", "skip"):
        with pytest.raises(ValueError, match=rf"rel.json: record '{GOOD[0]['id']}' has the relative image path "
                                             r"'good.png' \(4 relative path\(s\) in all\) but no image folder"):
            LLaVADataset.from_files(path, None, policy=policy)
    assert len(LLaVADataset.from_files(path, folder / "img")) == len(GOOD)
    text_only = write_json(folder / "text.json", [{"id": "t", "conversations": conv("Hi", "Hello")}])
    assert len(LLaVADataset.from_files(text_only, None)) == 1
    # a malformed image field is the structure check's to report (skip drops it), not a crash here
    mixed = write_json(folder / "mixed.json", [{"id": "t", "conversations": conv("Hi", "Hello")},
                                               {"id": "bad", "image": 5, "conversations": conv()}])
    assert [r.id for r in LLaVADataset.from_files(mixed, None, policy="skip", max_skipped_fraction=1).records] == ["t"]
    with pytest.raises(DataValidationError, match="'bad'"):
        LLaVADataset.from_files(mixed, None)


def test_absolute_image_paths_are_checked_without_an_image_folder(folder):
    records = [{"id": "abs-missing", "image": str(folder / "img" / "gone.png"), "conversations": conv()},
               {"id": "abs-ok", "image": str(folder / "img" / "good.png"), "conversations": conv()}]
    _, report = check_file(write_json(folder / "abs.json", records))
    assert [p.record_id for p in report.problems] == ["abs-missing"]


def test_truncated_jpeg_passes_the_header_check_and_fails_the_decode_check(folder):
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "img" / "full.jpg", quality=90)
    data = (folder / "img" / "full.jpg").read_bytes()
    (folder / "img" / "cut.jpg").write_bytes(data[:-300])  # a download cut short
    path = write_json(folder / "cut.json", [{"id": "cut", "image": "cut.jpg", "conversations": conv()}])
    assert check_file(path, folder / "img")[1].ok  # the header is intact
    _, report = check_file(path, folder / "img", decode=True)
    assert [p.record_id for p in report.problems] == ["cut"] and "truncated" in report.problems[0].message


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    import numpy as np

    from libmoe_core.images import to_rgb

    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (1, 256, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[0, :, 0].astype(int) - np.arange(256)).max() <= 1  # PIL's own convert gives 255 from 1 on


def test_skip_limit_counts_unparsable_lines_and_is_checked(folder):
    path = folder / "data.jsonl"  # 9 good records and one line that is not JSON: 10 % dropped
    path.write_text("\n".join([json.dumps(dict(GOOD[0], id=f"g{i}")) for i in range(9)] + ["{not json"]) + "\n")
    assert len(LLaVADataset.from_files(path, folder / "img", policy="skip")) == 9  # 10 % is within the default
    with pytest.raises(DataValidationError, match=r"would drop 1 of 10 records and lines \(10.0%\)"):
        LLaVADataset.from_files(path, folder / "img", policy="skip", max_skipped_fraction=0.05)
    exact = folder / "exact.jsonl"  # 29 of 100 dropped at a limit of 0.29: allowed (0.29 * 100 is 28.999... in floats)
    exact.write_text("\n".join([json.dumps(dict(GOOD[0], id=f"g{i}")) for i in range(71)] + ["{x"] * 29) + "\n")
    assert len(LLaVADataset.from_files(exact, folder / "img", policy="skip", max_skipped_fraction=0.29)) == 71
    with pytest.raises(ValueError, match=r"max_skipped_fraction must be in \[0, 1\], got 1.5"):
        LLaVADataset.from_files(path, folder / "img", policy="skip", max_skipped_fraction=1.5)


@pytest.mark.parametrize("content, suffix", [("[]", ".json"), ("\n  \n", ".jsonl"), ("", ".jsonl")])
def test_an_annotation_file_without_records_is_an_error_under_every_policy(folder, content, suffix, capsys):
    """It trained a model on 0 samples and reported success; ``data check`` said "no problems"."""
    empty = folder / f"empty{suffix}"
    empty.write_text(content)
    good = write_json(folder / "good.json", GOOD)
    for policy in ("error", "skip"):
        with pytest.raises(DataValidationError, match=f"(?s)as a whole.*{empty}: no records: the file is empty"):
            LLaVADataset.from_files([good, empty], folder / "img", policy=policy)
    assert main(["data", "check", str(empty)]) == 1
    assert "no records" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["[" + json.dumps(GOOD[1]) + ", " + json.dumps(GOOD[1])[:20],  # cut short
                                     json.dumps({"data": [GOOD[1]]})])  # not a list
def test_a_json_list_that_cannot_be_read_is_not_one_skippable_line(folder, content):
    """The skip policy counted a truncated 20-record file as one unparsable line (1 of 21, under
    the 10 % limit) and trained on the other file alone."""
    good = folder / "good.jsonl"
    good.write_text("\n".join(json.dumps(dict(GOOD[1], id=f"g{i}")) for i in range(20)) + "\n")
    broken = folder / "broken.json"
    broken.write_text(content)
    with pytest.raises(DataValidationError, match=f"(?s)no data policy skips a whole file.*{broken}"):
        LLaVADataset.from_files([good, broken], folder / "img", policy="skip", max_skipped_fraction=1.0)


def test_wide_integer_and_float_images_are_scaled_or_refused(folder):
    """Mode I (a 16-bit PGM) turned 99.6 % white and mode F (a float TIFF in 0..1) 99.9 % black,
    and passed every check."""
    import numpy as np

    from libmoe_core.images import ImageModeError, to_rgb

    img = folder / "img"
    ramp16 = (np.arange(256) * 257).astype(">u2").reshape(1, 256)
    (img / "g16.pgm").write_bytes(b"P5\n256 1\n65535\n" + ramp16.tobytes())
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(1, 256)).save(img / "f01.tiff")
    for name in ("g16.pgm", "f01.tiff"):
        with Image.open(img / name) as im:
            assert im.mode in ("I", "F")
            gray = np.asarray(to_rgb(im))[0, :, 0].astype(int)
        assert np.abs(gray - np.arange(256)).max() <= 1, name
    Image.fromarray(np.full((4, 4), 3.5, dtype=np.float32)).save(img / "depth.tiff")  # range unknown
    with Image.open(img / "depth.tiff") as im, pytest.raises(ImageModeError, match=r"mode F\) with values 3.5..3.5"):
        to_rgb(im)
    records = [{"id": n, "image": n, "conversations": conv()} for n in ("g16.pgm", "f01.tiff", "depth.tiff")]
    _, report = check_file(write_json(folder / "modes.json", records), img, decode=True)
    assert [(p.record_id, "values 3.5..3.5" in p.message) for p in report.problems] == [("depth.tiff", True)]
