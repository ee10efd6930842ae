"""Dataset manifests: shipped YAMLs, verify on a fake local layout, prepare offline."""

import json
from pathlib import Path

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
    half = load_manifest("llava-v1.5-mix665k-half")  # LibMoE's LLaVA-332K (its published v1 numbers)
    assert (half.downloads[0]["repo_id"], half.downloads[0]["filename"]) == (
        "DavidNguyen/LLAVA-LibMoE", "llava_v1_5_mix665k_half.json")
    assert half.requires == mix.requires and half.image_folder == mix.image_folder
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
    assert "record 'r2' (#2): image not found: a/2.png" in text
    assert "record 'r1' (#1): unreadable image" in text
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


def _fake_zip(path, members):
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for m in members:
            z.writestr(m, b"x")


def test_prepare_unzips_each_archive_into_its_own_folder_only(tmp_path, monkeypatch):
    """All archives were staged in one shared .downloads folder, never emptied; ALLaVA's pattern download
    unzipped every zip found there: LLaVA-Pretrain's images (and COCO, VG, ...) landed in ALLaVA's folder."""
    import urllib.request

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def hf_hub_download(repo_id, filename, repo_type=None, local_dir=None):
        path = Path(local_dir) / filename
        if filename.endswith(".zip"):
            _fake_zip(path, ["00453/004539375.jpg"])  # LLaVA-Pretrain's images.zip
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[]")
        return str(path)

    def snapshot_download(repo_id, repo_type=None, allow_patterns=None, local_dir=None):
        _fake_zip(Path(local_dir) / "allava_laion/image_chunks/images_0.zip", ["images/100277305.jpeg"])
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, dest: _fake_zip(Path(dest), ["x/y.jpg"]))
    root = tmp_path / "data"
    prepare_manifest(load_manifest("llava-pretrain-558k"), root)
    with pytest.raises(PrepareError, match="manual step"):  # ALLaVA's Vision-FLAN part is fetched by hand
        prepare_manifest(load_manifest("allava-4v-pft"), root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert files == ["ALLaVA/allava_laion/images/100277305.jpeg", "jsons/cumo_pft_allava.json",
                     "llava_pretrain/blip_laion_cc_sbu_558k.json", "llava_pretrain/images/00453/004539375.jpg"]
    assert not [p for p in root.iterdir() if p.name.startswith(".download")]  # the archives are gone


def test_a_users_manifest_may_require_a_shipped_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mine = tmp_path / "my665k-half.yaml"
    mine.write_text(yaml.safe_dump({"name": "my665k-half", "requires": ["coco-train2017"],
                                    "downloads": [{"manual": "put my.json into jsons/"}]}))
    with pytest.raises(PrepareError) as e:  # offline: names what to fetch, the shipped requirement included
        prepare_manifest(load_manifest(mine), tmp_path / "data")
    assert "coco-train2017:" in str(e.value) and "train2017.zip" in str(e.value)


def test_verify_decodes_images_and_checks_records_as_training_does(fake, capsys):
    """A truncated JPEG passed verify's header check and stopped training at its first read; records
    training refuses (empty answer, no <image> for an image) passed verify."""
    import io

    root, path = fake
    buf = io.BytesIO()
    noise = __import__("numpy").random.default_rng(0).integers(0, 255, (64, 64, 3), dtype="uint8")
    Image.fromarray(noise).save(buf, "JPEG")
    (root / "imgs" / "a" / "0.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # half written
    recs = json.loads((root / "ann.json").read_text())
    recs[1]["conversations"][1]["value"] = " "  # empty answer
    recs[2]["conversations"][0]["value"] = "what is it?"  # an image but no placeholder
    recs[3]["image"] = 5  # malformed: reported once, no crash
    (root / "ann.json").write_text(json.dumps(recs))
    text = "\n".join(verify_manifest(load_manifest(path), root).problems)
    assert "record 'r0' (#0): unreadable image" in text and "truncated" in text.lower()
    assert "'r1'" in text and "empty answer" in text
    assert "'r2'" in text and "0 <image> placeholders but 1 images" in text
    assert text.count("'image' must be a string or a list of strings, got 5") == 1
    quick = "\n".join(verify_manifest(load_manifest(path), root, decode=False).problems)
    assert "unreadable image" not in quick  # the header check passes it: why decoding is the default
    assert main(["data", "verify", "--manifest", str(path), "--root", str(root), "--no-decode"]) == 1


def test_skip_that_drops_every_record_is_an_error(tmp_path):
    from libmoe_core.data.dataset import LLaVADataset
    from libmoe_core.data.validate import DataValidationError

    recs = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                   {"from": "gpt", "value": "x"}]} for i in range(2)]
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    (tmp_path / "imgs").mkdir()  # the wrong folder: no image is found
    with pytest.raises(DataValidationError, match="dropped every record: nothing is left to train on"):
        LLaVADataset.from_files(tmp_path / "ann.json", tmp_path / "imgs", policy="skip")


def test_verify_counts_the_records_of_a_missing_image(fake):
    """Only the first record using a missing image was named (LLaVA ids repeat; OCR-VQA misses images
    that several records share): how many use it, and their positions."""
    root, path = fake
    recs = json.loads((root / "ann.json").read_text())
    for r in recs[:3]:
        r["image"] = "a/gone.png"
    (root / "ann.json").write_text(json.dumps(recs))
    text = "\n".join(verify_manifest(load_manifest(path), root).problems)
    assert "ann.json 3 records ('r0' (#0), 'r1' (#1), 'r2' (#2)): image not found: a/gone.png" in text
    assert text.count("image not found") == 1


# -- the manifest's structure is checked on load: a misspelt key or a mistyped count is an error naming
# the manifest file, the entry and the key (`annotation:` verified no annotation file and printed OK;
# `path:` for `file:` was a KeyError traceback; `records: "3"` gave "3 records, expected 3").


def test_every_shipped_manifest_loads():
    """The schema is derived from these: each must pass it (a guard against a check too strict)."""
    for name in list_manifests():
        assert load_manifest(name).name == name


def _manifest_file(tmp_path, text):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needles", [
    ("name: mine\nannotation:\n  - file: ann.json\n    records: 3\n",
     ["unknown key 'annotation' (did you mean 'annotations'?)", "known keys: name, title,", "annotations, layout"]),
    ("name: mine\nimage_dir: imgs\n", ["unknown key 'image_dir' (did you mean 'image_folder'?)"]),
    ("name: mine\nannotations:\n  - path: ann.json\n",
     ["annotations[0]: unknown key 'path'; known keys: file, records", "annotations[0]: missing required key 'file'"]),
    ("name: mine\nlayout:\n  - dir: imgs\n",
     ["layout[0]: unknown key 'dir'; known keys: path, kind, files, min_files", "layout[0]: missing required key 'path'"]),
    ("name: mine\nannotations:\n  - file: a.json\n  - file: ann.json\n    records: \"3\"\n",
     ["annotations[1] (file 'ann.json'): 'records' must be an integer >= 0 or null, got '3' (a string)"]),
    ("name: mine\nannotations:\n  - file: ann.json\n    records: true\n", ["'records' must be an integer", "True (a boolean)"]),
    ("name: mine\nlayout:\n  - path: imgs\n    files: \"1\"\n",
     ["layout[0] (path 'imgs'): 'files' must be an integer >= 0, got '1' (a string)"]),
    ("name: mine\nlayout:\n  - path: imgs\n    min_files: -1\n", ["layout[0] (path 'imgs'): 'min_files' must be an integer >= 0"]),
    ("name: mine\nlayout:\n  - path: imgs\n    kind: folder\n", ["'kind' must be one of 'dir', 'file', got 'folder'"]),
    ("name: mine\nlayout:\n  - path: a.json\n    kind: file\n    files: 1\n", ["layout[0] (path 'a.json'): 'files'/'min_files'"]),
    ("name: mine\nannotations: ann.json\n", ["'annotations' must be a list of mappings, got 'ann.json' (a string)"]),
    ("name: mine\nannotations:\n  - ann.json\n", ["annotations[0]: must be a mapping with 'file', got 'ann.json'"]),
    ("name: mine\nannotations:\n  - file: 3\n", ["annotations[0]: 'file' must be a non-empty string, got 3 (an integer)"]),
    ("name: 2017\n", ["'name' must be a non-empty string, got 2017 (an integer)"]),
    ("name: mine\nrequires: coco-train2017\n", ["'requires' must be a list of non-empty strings"]),
    ("name: mine\nbuilder: easy-vqa\n", ["'builder' must be one of 'easyvqa'"]),
    ("name: mine\ndownloads:\n  - repo: me/data\n    filename: a.json\n",
     ["downloads[0]: unknown key 'repo' (did you mean 'repo_id'?)", "give exactly one source key (repo_id, url or manual), got none"]),
    ("name: mine\ndownloads:\n  - repo_id: me/data\n", ["downloads[0] (repo_id 'me/data'): give exactly one of 'filename' or 'allow_patterns'"]),
    ("name: mine\ndownloads:\n  - url: http://x/a.zip\n    filename: a.zip\n",
     ["downloads[0] (url 'http://x/a.zip'): unknown key 'filename'; known keys: url, target_dir, unpack_to"]),
])
def test_manifest_structure_errors_name_the_file_the_entry_and_the_key(tmp_path, text, needles):
    from libmoe_core.data.manifests import ManifestError

    path = _manifest_file(tmp_path, text)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    msg = str(e.value)
    assert msg.startswith(str(path))
    for needle in needles:
        assert needle in msg, msg


def test_manifest_nulls_the_code_accepts_still_load(tmp_path):
    m = load_manifest(_manifest_file(tmp_path, "name: mine\nannotations:\n  - file: a.json\n    records: null\n"
                                               "downloads:\nlayout:\n  - path: imgs\n    min_files: 0\n"))
    assert m.annotations == [{"file": "a.json", "records": None}] and m.downloads == []


@pytest.mark.parametrize("text,needle", [
    ("name: mine\nimage_folder: imgs\nannotation:\n  - file: ann.json\n    records: 3\nlayout:\n  - path: imgs\n",
     "unknown key 'annotation'"),
    ("name: mine\nimage_folder: imgs\nannotations:\n  - path: ann.json\n", "annotations[0]: unknown key 'path'"),
    ("name: mine\nimage_folder: imgs\nlayout:\n  - dir: imgs\n", "layout[0]: unknown key 'dir'"),
    ("name: mine\nimage_folder: imgs\nannotations:\n  - file: ann.json\n    records: \"3\"\n",
     "'records' must be an integer >= 0 or null, got '3' (a string)"),
])
def test_data_verify_refuses_a_misspelt_manifest_without_a_traceback(fake, capsys, text, needle):
    root, _ = fake
    path = _manifest_file(root.parent, text)
    assert main(["data", "verify", "--manifest", str(path), "--root", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out and "Traceback" not in err
    assert err.startswith(f"error: {path}: ") and needle in err, err


def test_training_refuses_a_misspelt_manifest(tmp_path):
    from libmoe_core.train.config import resolve_config

    path = _manifest_file(tmp_path, "name: mine\nannotations:\n  - path: ann.json\n")
    with pytest.raises(ValueError, match="(?s)dataset: .*mine.yaml: .*annotations\\[0\\]: unknown key 'path'"):
        resolve_config("sft", overrides={"dataset": str(path), "data_root": str(tmp_path)})
