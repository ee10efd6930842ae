"""Dataset, collator and modality-length grouped sampler."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from libmoe_core.data.collator import VLMCollator
from libmoe_core.data.dataset import LLaVADataset
from libmoe_core.data.sampler import ModalityLengthGroupedSampler
from libmoe_core.data.templates import get_template
from libmoe_core.data.tiny_tokenizer import build_tiny_tokenizer
from libmoe_core.tokens import IGNORE_INDEX

N_IMG_TOK = 5
COLORS = {"r.png": (255, 0, 0), "g.png": (0, 255, 0), "b.png": (0, 0, 255)}


def colour_transform(im):
    """PIL -> [3, 2, 2] tensor holding the image's top-left colour (identifies the image)."""
    r, g, b = im.getpixel((0, 0))
    return torch.tensor([r, g, b], dtype=torch.float32)[:, None, None].expand(3, 2, 2).clone()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def dataset(tmp_path):
    for name, rgb in COLORS.items():
        Image.new("RGB", (6, 6), rgb).save(tmp_path / name)
    records = [
        {"id": "one", "image": "g.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"},
                                                          {"from": "gpt", "value": "green"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."},
                                         {"from": "human", "value": "Again, at more length please?"},
                                         {"from": "gpt", "value": "Yes, yes, yes."}]},
        {"id": "two", "image": ["r.png", "b.png"],
         "conversations": [{"from": "human", "value": "<image> and <image>: which is red?"},
                           {"from": "gpt", "value": "the first"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    return LLaVADataset.from_files(tmp_path / "d.json", tmp_path, num_image_tokens=N_IMG_TOK)


def make_collator(tok, **kw):
    return VLMCollator(tok, "qwen2", colour_transform, tok.convert_tokens_to_ids("<image>"), N_IMG_TOK, **kw)


def test_dataset_is_lazy_and_loads_rgb(dataset):
    assert len(dataset) == 3
    s = dataset[2]
    assert s["id"] == "two" and [im.getpixel((0, 0)) for im in s["images"]] == [(255, 0, 0), (0, 0, 255)]
    assert dataset[1]["images"] == []
    ml = dataset.modality_lengths
    assert ml[0] > 0 and ml[1] < 0 and ml[2] > 0 and ml[2] > ml[0]


def test_collator_pads_right_and_expands_images(tok, dataset):
    samples = [dataset[i] for i in range(3)]
    batch = make_collator(tok)(samples)
    image_id = tok.convert_tokens_to_ids("<image>")
    tpl = get_template("qwen2")
    lengths = []
    for b, s in enumerate(samples):
        ids, labels = tpl.render(s["conversations"], tok)
        n_img = len(s["images"])
        # expected: each <image> repeated N_IMG_TOK times, labels -100 there
        exp_ids, exp_lab = [], []
        for i, lab in zip(ids, labels):
            exp_ids += [i] * (N_IMG_TOK if i == image_id else 1)
            exp_lab += [IGNORE_INDEX] * N_IMG_TOK if i == image_id else [lab]
        n = len(exp_ids)
        lengths.append(n)
        assert batch["input_ids"][b, :n].tolist() == exp_ids
        assert batch["labels"][b, :n].tolist() == exp_lab
        assert batch["attention_mask"][b, :n].tolist() == [1] * n
        assert (batch["attention_mask"][b, n:] == 0).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert int((batch["input_ids"][b] == image_id).sum()) == n_img * N_IMG_TOK
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["image_counts"].tolist() == [1, 0, 2]
    assert batch["ids"] == ["one", "text", "two"]
    # all images of the batch, in sample order: green, red, blue
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[0, 255, 0], [255, 0, 0], [0, 0, 255]]


def test_collator_left_padding_text_only_and_errors(tok, dataset):
    batch = make_collator(tok, padding_side="left")([dataset[0], dataset[1]])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert make_collator(tok)([dataset[1]])["pixel_values"] is None
    too_long = make_collator(tok, max_length=10)
    with pytest.raises(ValueError, match="record 'text'.*max_length 10"):
        too_long([dataset[1]])
    sample = dict(dataset[0], images=[])  # placeholder without an image
    with pytest.raises(ValueError, match="record 'one': 1 image tokens .* but 0 images"):
        make_collator(tok)([sample])


def test_dataloader_end_to_end(tok, dataset):
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=2)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=make_collator(tok))
    seen = [i for batch in loader for i in batch["ids"]]
    assert sorted(seen) == ["one", "text", "two"]


def fake_lengths(n_image=37, n_text=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = (torch.randint(1, 500, (n_image,), generator=g)).tolist()
    txt = (-torch.randint(1, 500, (n_text,), generator=g)).tolist()
    mixed = img + txt
    order = torch.randperm(len(mixed), generator=g).tolist()
    return [mixed[i] for i in order]


@pytest.mark.parametrize("batch_size,world_size", [(4, 1), (2, 3)])
def test_sampler_groups_modalities_and_sorts(batch_size, world_size):
    lengths = fake_lengths()
    s = ModalityLengthGroupedSampler(lengths, batch_size, world_size, seed=3)
    order = list(s)
    assert sorted(order) == list(range(len(lengths))) and len(s) == len(lengths)
    mbs = s.megabatches()
    size = batch_size * world_size
    *full, last = mbs
    for mb in full:
        assert len(mb) == size
        signs = {lengths[i] > 0 for i in mb}
        assert len(signs) == 1  # one modality per mega-batch
        mags = [abs(lengths[i]) for i in mb]
        assert mags == sorted(mags, reverse=True)
    # only the final (remainder) mega-batch may mix, and it holds fewer than one mega-batch per modality
    n_img, n_txt = sum(n > 0 for n in lengths), sum(n < 0 for n in lengths)
    assert len(last) == n_img % size + n_txt % size
    # consecutive DataLoader batches inside full mega-batches are single-modality
    flat_full = [i for mb in full for i in mb]
    for k in range(0, len(flat_full), batch_size):
        assert len({lengths[i] > 0 for i in flat_full[k:k + batch_size]}) == 1


def test_sampler_deterministic_per_seed_and_epoch():
    lengths = fake_lengths()
    a, b = ModalityLengthGroupedSampler(lengths, 4, seed=1), ModalityLengthGroupedSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="non-zero"):
        list(ModalityLengthGroupedSampler([3, 0, -2], 2))
