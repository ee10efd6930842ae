"""A training config names a dataset manifest and the folder it was prepared in (data_root)."""

import json

import pytest
from PIL import Image

from libmoe_core.data.dataset import LLaVADataset
from libmoe_core.pipeline.stage import stage_config
from libmoe_core.train.config import resolve_config
from libmoe_core.train.stages import dataset_files


def _records():
    return [
        {"id": "coco-1", "image": "coco/train2017/000000000001.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "sharegpt-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]


@pytest.fixture
def prepared(tmp_path):
    """A data root laid out as `libmoe data prepare llava-v1.5-mix665k --root ROOT` leaves it (two records)."""
    root = tmp_path / "llava"
    (root / "jsons").mkdir(parents=True)
    (root / "jsons" / "llava_v1_5_mix665k.json").write_text(json.dumps(_records()))
    (root / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "coco" / "train2017" / "000000000001.png")
    return root


def test_a_manifest_name_trains_on_its_annotation_file_and_image_folder(prepared):
    cfg = resolve_config("sft", overrides={"dataset": "llava-v1.5-mix665k", "data_root": str(prepared)})
    annotations, images = dataset_files(cfg)
    assert annotations == prepared / "jsons" / "llava_v1_5_mix665k.json" and images == prepared / "."
    dataset = LLaVADataset.from_files(annotations, images)  # as runners/train.py reads it
    assert [r.id for r in dataset.records] == ["coco-1", "sharegpt-1"]
    assert dataset[0]["images"][0].size == (8, 8)
    # the notebooks' parameter of the same name
    nb_cfg = stage_config("sft", dataset="llava-v1.5-mix665k", data_root=str(prepared), run_name="t",
                          runs_root=str(prepared.parent))
    assert dataset_files(nb_cfg) == (annotations, images)


def test_image_folder_overrides_the_manifests(prepared, tmp_path):
    cfg = resolve_config("sft", overrides={"dataset": "llava-v1.5-mix665k", "data_root": str(prepared),
                                           "image_folder": str(tmp_path / "elsewhere")})
    assert dataset_files(cfg)[1] == tmp_path / "elsewhere"


def test_a_manifest_file_of_ones_own(prepared, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\nstage: sft\nannotations:\n  - file: jsons/llava_v1_5_mix665k.json\nimage_folder: coco\n")
    cfg = resolve_config("sft", overrides={"dataset": str(mine), "data_root": str(prepared)})
    assert dataset_files(cfg) == (prepared / "jsons" / "llava_v1_5_mix665k.json", prepared / "coco")


@pytest.mark.parametrize("overrides,error,message", [
    ({"dataset": "llava-v1.5-mix665k"}, ValueError, "is a manifest: set data_root .*`libmoe data prepare llava-v1.5-mix665k --root DIR`"),
    ({"dataset": "data.json", "data_root": "/data"}, ValueError, "data_root is for a prepared manifest .*data.json. is a file: give image_folder"),
    ({"dataset": "coco-train2017", "data_root": "/data"}, ValueError, "has 0 annotation files \\(images only\\)"),
    ({"dataset": "llava-v1.5-mix665k", "data_root": "/nowhere"}, FileNotFoundError,
     "no /nowhere/jsons/llava_v1_5_mix665k.json; fetch it with `libmoe data prepare llava-v1.5-mix665k --root /nowhere`"),
])
def test_manifest_mistakes_are_named(overrides, error, message):
    with pytest.raises(error, match=message):
        dataset_files(resolve_config("sft", overrides=overrides))


def test_a_yaml_that_is_not_a_manifest_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="dataset: .*bad.yaml: a manifest is a mapping"):
        resolve_config("sft", overrides={"dataset": str(bad), "data_root": str(tmp_path)})


def test_data_root_with_the_built_in_dataset_says_it_is_built_in():
    with pytest.raises(ValueError, match="dataset 'easyvqa' is built in"):
        resolve_config("sft", overrides={"dataset": "easyvqa", "data_root": "/data"})
