"""Switch rate, overlap and saturation between hand-made checkpoint traces."""

import math

import numpy as np
import pyarrow as pa
import pytest

from libmoe_core.analysis import TraceError, compare_checkpoints, trace_table, write_synthetic_trace, write_trace

A = [[0, 1], [2, 3], [1, 0], [3, 2]]
B = [[0, 1], [2, 1], [0, 1], [0, 2]]
# rank-wise changed slots A->B: 0 + 1 + 2 + 1 = 4 of 8  -> switch rate 0.5
# shared experts |A ∩ B|: 2 + 1 + 2 + 1 = 6 of 8         -> overlap 0.75


def _write(tmp_path, name, experts, order=None, **kw):
    experts = np.asarray(experts)
    pos = np.arange(len(experts))
    if order is not None:
        experts, pos = experts[order], pos[order]
    return write_trace(trace_table(experts, num_experts=4, position=pos, checkpoint=name, **kw), tmp_path / f"{name}.parquet")


@pytest.mark.parametrize("method", ["zip", "join", "auto"])
def test_hand_made_switch_rates(tmp_path, method):
    paths = [_write(tmp_path, "s1", A), _write(tmp_path, "s2", B), _write(tmp_path, "s3", B)]
    df = compare_checkpoints(paths, method=method).set_index("checkpoint")
    assert list(df.index) == ["s1", "s2", "s3"]
    assert np.isnan(df.loc["s1", "switch_rate"]) and np.isnan(df.loc["s1", "overlap"])
    assert df.loc["s2", "switch_rate"] == pytest.approx(0.5)
    assert df.loc["s2", "overlap"] == pytest.approx(0.75)
    assert df.loc["s3", "switch_rate"] == 0 and df.loc["s3", "overlap"] == 1
    assert df["saturation"].tolist() == pytest.approx([0.75, 1.0, 1.0])
    assert df["matched"].tolist() == [4, 4, 4]


def test_unaligned_rows_fall_back_to_the_join(tmp_path):
    paths = [_write(tmp_path, "s1", A), _write(tmp_path, "s2", B, order=[3, 1, 0, 2])]
    df = compare_checkpoints(paths).set_index("checkpoint")  # auto
    assert df.loc["s2", "switch_rate"] == pytest.approx(0.5)
    assert df.loc["s1", "saturation"] == pytest.approx(0.75)
    with pytest.raises(TraceError, match="not row-aligned"):
        compare_checkpoints(paths, method="zip")


def test_partial_overlap_counts_matched_tokens(tmp_path):
    paths = [_write(tmp_path, "s1", A), _write(tmp_path, "s2", np.asarray(B)[[0, 1]], order=None)]
    df = compare_checkpoints(paths).set_index("checkpoint")
    assert df.loc["s2", "matched"] == 2
    assert df.loc["s2", "switch_rate"] == pytest.approx(1 / 4)  # rows 0, 1: 0 + 1 of 4 slots


def test_zip_and_join_agree_on_generated_traces(tmp_path):
    paths = [
        write_synthetic_trace(tmp_path / f"c{i}", num_docs=7, tokens_per_doc=10, checkpoint=f"c{i}", progress=p,
                              docs_per_chunk=3 + i, files=1 + i)
        for i, p in enumerate([0.0, 0.8, 1.0])
    ]
    for by in (None, "task"):
        z = compare_checkpoints(paths, by=by, method="zip", batch_rows=50)
        j = compare_checkpoints(paths, by=by, method="join", batch_rows=64)
        num = ["matched", "switch_rate", "overlap", "saturation"]
        assert z.drop(columns=num).equals(j.drop(columns=num))
        np.testing.assert_allclose(z[num].to_numpy(float), j[num].to_numpy(float))
    # less drift -> higher agreement with the final checkpoint
    sat = z.groupby("checkpoint", sort=False)["saturation"].mean()
    assert sat["c0"] < sat["c1"] < sat["c2"] == 1


def test_errors(tmp_path):
    p = _write(tmp_path, "s1", A)
    with pytest.raises(ValueError, match="two or more"):
        compare_checkpoints([p])
    dup = write_trace(trace_table(A, num_experts=4, position=0, checkpoint="d"), tmp_path / "dup.parquet")
    with pytest.raises(TraceError, match="several rows share"):
        compare_checkpoints([p, dup])
    k3 = write_trace(trace_table([[0, 1, 2]] * 4, num_experts=4, checkpoint="k3"), tmp_path / "k3.parquet")
    with pytest.raises(TraceError, match="top-k differs"):
        compare_checkpoints([p, k3])
    with pytest.raises(ValueError, match="auto, zip, join"):
        compare_checkpoints([p, p], method="x")
    e8 = write_trace(trace_table(A, num_experts=8, checkpoint="e8"), tmp_path / "e8.parquet")  # same ids, 8 experts
    for method in ("zip", "join"):
        with pytest.raises(TraceError, match=r"layer=0: .*s1.* routes over \[4\] experts, .*e8.parquet over \[8\]"):
            compare_checkpoints([p, e8], method=method)


def test_tokens_of_several_images_and_crops_are_matched_by_image_and_crop(tmp_path):
    # One document, two images, each with a whole-image pass and one tile: the vision rows
    # repeat (doc, placement, layer, position) and differ only by (image, crop).
    image, crop, position = [0, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]
    first = write_trace(trace_table(A, num_experts=4, placement="vision", image=image, crop=crop, position=position,
                                    checkpoint="s1"), tmp_path / "s1.parquet")
    order = [3, 1, 0, 2]  # the later trace lists them in another order
    second = write_trace(trace_table(np.asarray(B)[order], num_experts=4, placement="vision",
                                     image=np.asarray(image)[order], crop=np.asarray(crop)[order],
                                     position=0, checkpoint="s2"), tmp_path / "s2.parquet")
    for method in ("auto", "join"):
        df = compare_checkpoints([first, second], method=method).set_index("checkpoint")
        assert df.loc["s2", "matched"] == 4
        assert df.loc["s2", "switch_rate"] == pytest.approx(0.5) and df.loc["s2", "overlap"] == pytest.approx(0.75)


def test_traces_without_image_and_crop_columns_still_compare(tmp_path):
    import pyarrow.parquet as pq

    paths = [_write(tmp_path, "s1", A), _write(tmp_path, "s2", B, order=[3, 1, 0, 2])]
    for p in paths:  # as written before those columns existed
        pq.write_table(pq.read_table(p).drop_columns(["image", "crop"]), p)
    df = compare_checkpoints(paths, method="join").set_index("checkpoint")
    assert df.loc["s2", "switch_rate"] == pytest.approx(0.5) and df.loc["s2", "matched"] == 4


def test_a_trace_without_image_and_crop_matches_a_new_one(tmp_path):
    # the legacy fill follows the token kind: text tokens get image -1, as the capture writes them
    import pyarrow.parquet as pq

    old = _write(tmp_path, "s1", A)  # text tokens (trace_table's default kind)
    pq.write_table(pq.read_table(old).drop_columns(["image", "crop"]), old)
    new = _write(tmp_path, "s2", B, image=-1)
    for method in ("zip", "join"):
        df = compare_checkpoints([old, new], method=method).set_index("checkpoint")
        assert df.loc["s2", "matched"] == 4 and df.loc["s2", "switch_rate"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- against a plain-loop oracle


def _random_trace(rng, name, layers, positions, tmp_path, task="t"):
    """A shuffled trace of k=2 random choices over 4 experts; returns (path, {(layer, position): experts})."""
    rows = {(layer, p): [int(x) for x in rng.permutation(4)[:2]] for layer in layers for p in positions}
    keys = list(rows)
    order = rng.permutation(len(keys))
    keys = [keys[i] for i in order]
    table = pa.concat_tables([trace_table([rows[key]], num_experts=4, checkpoint=name, layer=key[0], position=key[1],
                                          task=task) for key in keys])
    return write_trace(table, tmp_path / f"{name}.parquet"), rows


def _oracle(a: dict, b: dict, layer: int) -> tuple[int, float, float]:
    """(matched, switch rate, overlap) of the tokens of ``layer`` in both ``a`` and ``b``, by plain loops."""
    matched = switched = shared = slots = 0
    for key, later in b.items():
        if key[0] != layer or key not in a:
            continue
        earlier = a[key]
        matched += 1
        slots += len(later)
        switched += sum(x != y for x, y in zip(earlier, later))
        shared += len(set(earlier) & set(later))
    return (matched, switched / slots, shared / slots) if matched else (0, math.nan, math.nan)


def _check_against_oracle(df, names, rows):
    for i, name in enumerate(names):
        for layer in sorted({key[0] for r in rows for key in r}):
            got = _row_of(df, name, layer)
            if i:
                matched, sw, ov = _oracle(rows[i - 1], rows[i], layer)
                assert got["matched"] == matched, (name, layer)
                assert got["switch_rate"] == pytest.approx(sw, nan_ok=True), (name, layer)
                assert got["overlap"] == pytest.approx(ov, nan_ok=True), (name, layer)
            n_final, _, sat = _oracle(rows[i], rows[-1], layer)
            assert got["matched_final"] == n_final, (name, layer)
            assert got["saturation"] == pytest.approx(sat, nan_ok=True), (name, layer)


def _row_of(df, checkpoint, layer):
    sel = df[(df["checkpoint"] == checkpoint) & (df["layer"] == layer)]
    assert len(sel) == 1, (checkpoint, layer)
    return sel.iloc[0]


@pytest.mark.parametrize("method", ["auto", "join"])
def test_switch_rate_between_earlier_traces_counts_the_tokens_the_final_lacks(tmp_path, method):
    """Before: each earlier trace was joined onto the final's rows, so c0 -> c1 counted only the
    tokens that the final trace (a shorter generation) also has."""
    rng = np.random.default_rng(0)
    names = ["c0", "c1", "c2"]
    positions = [range(30), range(5, 40), range(10, 20)]  # the final holds few of the tokens
    made = [_random_trace(rng, n, [0, 1], p, tmp_path) for n, p in zip(names, positions)]
    df = compare_checkpoints([p for p, _ in made], method=method)
    got, rows = _row_of(df, "c1", 0), [r for _, r in made]
    assert (got["matched"], got["switch_rate"]) == pytest.approx(_oracle(rows[0], rows[1], 0)[:2])
    assert got["matched"] == 25  # positions 5..29, not the 10 the final has
    _check_against_oracle(df, names, rows)


@pytest.mark.parametrize("method", ["auto", "join"])
def test_a_layer_the_final_trace_lacks_is_compared_not_dropped(tmp_path, method):
    """Before: only the final trace's (placement, layer) were compared; layer 1, missing from the
    final trace, vanished from the result without a word."""
    rng = np.random.default_rng(1)
    names = ["c0", "c1", "c2"]
    layers = [[0, 1], [0, 1], [0]]
    made = [_random_trace(rng, n, ls, range(12), tmp_path) for n, ls in zip(names, layers)]
    df = compare_checkpoints([p for p, _ in made], method=method)
    got = _row_of(df, "c1", 1)
    assert got["matched"] == 12 and not math.isnan(got["switch_rate"]) and math.isnan(got["saturation"])
    _check_against_oracle(df, names, [r for _, r in made])


@pytest.mark.parametrize("method", ["auto", "zip", "join"])
def test_duplicate_keys_are_errors_on_every_path(tmp_path, method):
    """Before: the zip path (the default's first try) compared a token written twice without a word."""
    paths = [write_trace(trace_table([[0], [c]], num_experts=4, checkpoint=f"s{c}", position=[0, 0]),
                         tmp_path / f"s{c}.parquet") for c in (1, 2)]
    with pytest.raises(TraceError, match="several rows share one") as err:
        compare_checkpoints(paths, method=method)
    assert paths[0] in str(err.value)


@pytest.mark.parametrize("method", ["zip", "join"])
def test_compare_errors_name_the_trace_files(tmp_path, method):
    a = write_trace(trace_table([[0, 1], [1, 2]], num_experts=4, checkpoint="s1"), tmp_path / "k2.parquet")
    b = write_trace(trace_table([[0], [1]], num_experts=4, checkpoint="s2"), tmp_path / "k1.parquet")
    with pytest.raises(TraceError, match="top-k differs") as err:
        compare_checkpoints([a, b], method=method)
    assert a in str(err.value) and b in str(err.value)
