"""TraceWriter: schema, row counts, round-trip values, part flushing, input checks."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from libmoe_core.evaluation.traces import TOKEN_KINDS, TRACE_SCHEMA, TraceWriter, read_traces


def _block(n, k=2, e=8, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.random((n, e)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1)[:, :k].astype(np.int64)
    weights = np.take_along_axis(probs, experts, axis=-1)
    return np.arange(n) + 10, experts, weights, probs


def test_schema_is_exactly_the_documented_one(tmp_path):
    with TraceWriter(tmp_path) as w:
        pos, exp, wts, prb = _block(3)
        w.add_block("easyvqa", 5, "ckpt", "llm", 2, pos, "text", exp, wts, prb)
    part = pq.read_table(tmp_path / "part-00000.parquet")
    expected = [
        ("task", pa.string()), ("doc_id", pa.int64()), ("checkpoint", pa.string()), ("placement", pa.string()),
        ("layer", pa.int32()), ("image", pa.int32()), ("crop", pa.int32()), ("position", pa.int32()),
        ("token_kind", pa.string()),
        ("experts", pa.list_(pa.int32())), ("weights", pa.list_(pa.float32())), ("probs", pa.list_(pa.float32())),
        ("num_experts", pa.int32()),
    ]
    assert part.schema.names == [name for name, _ in expected]
    for name, typ in expected:
        got = part.schema.field(name).type
        if pa.types.is_list(typ):
            assert pa.types.is_list(got) and got.value_type == typ.value_type, name
        else:
            assert got == typ, name
    assert read_traces(tmp_path).schema.equals(TRACE_SCHEMA)


def test_round_trip_values_numpy_and_torch(tmp_path):
    pos, exp, wts, prb = _block(6, k=2, e=4, seed=1)
    kinds = np.array(["image", "image", "text", "text", "text", "generated"])
    with TraceWriter(tmp_path) as w:
        w.add_block("t1", 3, "ck", "vision", 0, pos, kinds, exp, wts, prb, images=[0, 0, 0, 1, 1, 1], crops=[0, 1] * 3)
        w.add_block("t1", 4, "ck", "projector", 1, torch.tensor(pos[:2]), torch.tensor([1, 2]),
                    torch.tensor(exp[:2]), torch.tensor(wts[:2]).to(torch.bfloat16), torch.tensor(prb[:2]),
                    images=torch.tensor([-1, 2]))
    table = read_traces(tmp_path).to_pydict()
    assert table["task"] == ["t1"] * 8
    assert table["doc_id"] == [3] * 6 + [4] * 2
    assert table["placement"] == ["vision"] * 6 + ["projector"] * 2
    assert table["layer"] == [0] * 6 + [1] * 2
    assert table["position"] == list(pos) + list(pos[:2])
    assert table["image"] == [0, 0, 0, 1, 1, 1, -1, 2]
    assert table["crop"] == [0, 1] * 3 + [0, 0]  # one value for the block by default
    assert table["token_kind"] == list(kinds) + ["text", "generated"]
    assert table["experts"][:6] == exp.tolist()
    np.testing.assert_allclose(np.array(table["weights"][:6]), wts, rtol=0, atol=0)
    np.testing.assert_allclose(np.array(table["weights"][6:]), wts[:2], rtol=1e-2)  # bf16 input
    np.testing.assert_array_equal(np.array(table["probs"][:6], dtype=np.float32), prb)
    assert table["num_experts"] == [4] * 8


def test_parts_have_exactly_rows_per_part_rows(tmp_path):
    w = TraceWriter(tmp_path, rows_per_part=10)
    sizes = [4, 7, 25, 3]
    for i, n in enumerate(sizes):
        pos, exp, wts, prb = _block(n, seed=i)
        w.add_block("t", i, "ck", "llm", 0, pos, "text", exp, wts, prb)
        assert w.buffered_rows < 10  # never holds a full part in memory
    assert w.rows_written == 30 and w.buffered_rows == 9
    w.close()
    w.close()  # idempotent
    counts = [pq.read_metadata(p).num_rows for p in sorted(tmp_path.glob("part-*.parquet"))]
    assert counts == [10, 10, 10, 9]
    assert [p.name for p in w.parts] == [f"part-{i:05d}.parquet" for i in range(4)]
    # rows keep their order across part boundaries
    assert read_traces(tmp_path, columns=["doc_id"])["doc_id"].to_pylist() == [i for i, n in enumerate(sizes) for _ in range(n)]


def test_probs_may_be_omitted_and_kinds_as_codes(tmp_path):
    pos, exp, wts, _ = _block(3, e=16)
    with TraceWriter(tmp_path) as w:
        w.add_block("t", 0, "ck", "llm", 5, pos, np.array([0, 1, 2]), exp, wts, None, num_experts=16)
    t = read_traces(tmp_path).to_pydict()
    assert t["probs"] == [None] * 3
    assert t["token_kind"] == list(TOKEN_KINDS)
    assert t["num_experts"] == [16] * 3


def test_existing_parts_are_refused_unless_overwrite(tmp_path):
    pos, exp, wts, prb = _block(2)
    with TraceWriter(tmp_path) as w:
        w.add_block("t", 0, "ck", "llm", 0, pos, "text", exp, wts, prb)
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        TraceWriter(tmp_path)
    with TraceWriter(tmp_path, overwrite=True):
        pass
    assert not list(tmp_path.glob("part-*.parquet"))
    # another prefix (a second process) coexists
    with TraceWriter(tmp_path, prefix="part-r1") as w:
        w.add_block("t", 0, "ck", "llm", 0, pos, "text", exp, wts, prb)
    assert (tmp_path / "part-r1-00000.parquet").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"placement": "decoder"}, "placement"),
        ({"experts": np.zeros((3, 2), dtype=np.int64)}, "shape"),
        ({"weights": np.zeros((2, 3), dtype=np.float32)}, "weights"),
        ({"token_kinds": np.array(["text", "audio"])}, "token kinds"),
        ({"token_kinds": "video"}, "token kind"),
        ({"experts": np.full((2, 2), 9)}, r"\[0, 8\)"),
        ({"probs": None}, "num_experts"),
    ],
)
def test_bad_blocks_are_rejected_with_the_field_named(tmp_path, change, match):
    pos, exp, wts, prb = _block(2)
    kwargs = {"task": "t", "doc_id": 0, "checkpoint": "ck", "placement": "llm", "layer": 0, "positions": pos,
              "token_kinds": "text", "experts": exp, "weights": wts, "probs": prb}
    kwargs.update(change)
    with TraceWriter(tmp_path) as w, pytest.raises(ValueError, match=match):
        w.add_block(**kwargs)


def test_closed_writer_refuses_rows(tmp_path):
    w = TraceWriter(tmp_path)
    w.close()
    pos, exp, wts, prb = _block(1)
    with pytest.raises(RuntimeError, match="closed"):
        w.add_block("t", 0, "ck", "llm", 0, pos, "text", exp, wts, prb)
    with pytest.raises(FileNotFoundError):
        read_traces(tmp_path)


def test_image_and_crop_values_are_checked(tmp_path):
    pos, exp, wts, prb = _block(3)
    with TraceWriter(tmp_path) as w, pytest.raises(ValueError, match="images must be one value or 3 values, got 2"):
        w.add_block("t", 0, "ck", "vision", 0, pos, "image", exp, wts, prb, images=[0, 1])


def test_traces_written_before_image_and_crop_read_with_zeros(tmp_path):
    # A part written by an earlier version (no image / crop columns) reads back with 0 / 0,
    # beside a current part, and a column selection gets them too.
    with TraceWriter(tmp_path) as w:
        pos, exp, wts, prb = _block(2)
        w.add_block("t", 1, "ck", "llm", 0, pos, "text", exp, wts, prb, images=-1)
    old = pq.read_table(tmp_path / "part-00000.parquet").drop_columns(["image", "crop"])
    pq.write_table(old, tmp_path / "part-00001.parquet")
    table = read_traces(tmp_path)
    assert table.schema.equals(TRACE_SCHEMA)
    assert table.column("image").to_pylist() == [-1, -1, -1, -1]  # text tokens: -1 in both
    assert table.column("crop").to_pylist() == [0, 0, 0, 0]
    assert read_traces(tmp_path, columns=["crop", "doc_id"]).column_names == ["crop", "doc_id"]
    with pytest.raises(ValueError, match="no column"):
        read_traces(tmp_path, columns=["nope"])
