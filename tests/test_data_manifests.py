"""Dataset manifests: shipped YAMLs, verify on a fake local layout, prepare offline."""

import json

import pytest
import yaml
from PIL import Image

from libmoe_core.cli import main
from libmoe_core.data.manifests import PrepareError, list_manifests, load_manifest, prepare_manifest, verify_manifest


def test_shipped_manifests():
    names = set(list_manifests())
    assert {"llava-pretrain-558k", "allava-4v-pft", "llava-v1.5-mix665k", "coco-train2017", "gqa-images",
            "ocr-vqa-images", "textvqa-train-images", "vg-images", "easyvqa"} <= names
    pre = load_manifest("llava-pretrain-558k")
    assert {(d["repo_id"], d["filename"]) for d in pre.downloads} == {
        ("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json"), ("liuhaotian/LLaVA-Pretrain", "images.zip")}
    assert pre.annotations[0]["records"] == 558128
    mix = load_manifest("llava-v1.5-mix665k")
    assert mix.downloads[0]["repo_id"] == "liuhaotian/LLaVA-Instruct-150K"
    assert mix.annotations[0] == {"file": "jsons/llava_v1_5_mix665k.json", "records": 665298}
    assert {e["path"] for e in mix.layout} >= {"coco/train2017", "gqa/images", "ocr_vqa/images",
                                               "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2"}
    for req in mix.requires:
        assert req in names
    allava = load_manifest("allava-4v-pft")
    assert any(d.get("repo_id") == "FreedomIntelligence/ALLaVA-4V" for d in allava.downloads)
    assert allava.annotations[0]["file"].endswith("cumo_pft_allava.json")


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "root"
    (root / "imgs" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / "imgs" / "a" / f"{i}.png")
    recs = [{"id": f"r{i}", "image": f"a/{i}.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                     {"from": "gpt", "value": "x"}]}
            for i in range(3)]
    recs.append({"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
    (root / "ann.json").write_text(json.dumps(recs))
    manifest = {"name": "fake", "image_folder": "imgs",
                "downloads": [{"repo_id": "someone/fake-data", "repo_type": "dataset", "filename": "ann.json"}],
                "annotations": [{"file": "ann.json", "records": 4}],
                "layout": [{"path": "ann.json", "kind": "file"}, {"path": "imgs/a", "files": 3}]}
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return root, path


def test_verify_good_copy(fake):
    root, path = fake
    rep = verify_manifest(load_manifest(path), root)
    assert rep.ok, rep.format()
    assert main(["data", "verify", "--manifest", str(path), "--root", str(root)]) == 0


def test_verify_reports_each_problem(fake, capsys):
    root, path = fake
    (root / "imgs" / "a" / "1.png").write_bytes(b"garbage")
    (root / "imgs" / "a" / "2.png").unlink()
    with open(root / "ann.json") as f:
        recs = json.load(f)
    (root / "ann.json").write_text(json.dumps(recs[:3]))  # 3 records, 4 expected
    rep = verify_manifest(load_manifest(path), root)
    text = "\n".join(rep.problems)
    assert "imgs/a: 2 files, expected 3" in text
    assert "ann.json: 3 records, expected 4" in text
    assert "record 'r2': image not found: a/2.png" in text
    assert "record 'r1': unreadable image" in text
    assert len(rep.problems) == 4
    assert main(["data", "verify", "--manifest", str(path), "--root", str(root)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["data", "verify", "--manifest", str(path), "--root", str(root / "nowhere")]) == 1


def test_prepare_offline_names_what_to_fetch(fake, monkeypatch, capsys):
    root, path = fake
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrepareError) as e:
        prepare_manifest(load_manifest(path), root)
    assert "someone/fake-data" in str(e.value) and "ann.json" in str(e.value)
    assert main(["data", "prepare", "llava-v1.5-mix665k", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    for needle in ("liuhaotian/LLaVA-Instruct-150K", "llava_v1_5_mix665k.json", "train2017.zip", "ocr_vqa/images"):
        assert needle in err


def test_prepare_builds_easyvqa_offline_and_verify_checks_it(tmp_path, monkeypatch):
    # the shipped easyvqa manifest expects the full build; check a small build against a copy with small counts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from libmoe_core.data.easyvqa import build_easyvqa

    meta = build_easyvqa(tmp_path, max_images=5)
    m = load_manifest("easyvqa")
    data = dict(m.data)
    data["annotations"] = [dict(a, records=meta["splits"][a["file"].split("_")[-1][:-5]][
        "caption_records" if "caption" in a["file"] else "qa_records"]) for a in m.annotations]
    data["layout"] = [dict(e, files=5) if "files" in e else e for e in m.layout]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(data))
    rep = verify_manifest(load_manifest(small), tmp_path)
    assert rep.ok, rep.format()
