"""Trace columns of the wrong type, and NaN/inf router values, are errors naming the file and column."""

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from libmoe_core.analysis import TraceError, analyze, iter_batches, trace_table, write_trace
from libmoe_core.analysis.schema import METRIC_COLUMNS
from libmoe_core.cli import main


def _good() -> pa.Table:
    return trace_table([[0, 1], [1, 2], [2, 3], [3, 0]], np.full((4, 2), 0.5), np.full((4, 4), 0.25), num_experts=4)


def _with(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _write(tmp_path, name: str, table: pa.Table) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)  # pyarrow's own writer: the column keeps the given type
    return str(path)


@pytest.mark.parametrize(
    ("column", "array", "found", "expected"),
    [
        ("layer", pa.array(["a"] * 4), "string", "integer"),
        ("layer", pa.array([0.0] * 4), "double", "integer"),
        ("doc_id", pa.array(["0"] * 4), "string", "integer"),
        ("experts", pa.array([[0.0, 1.5]] * 4), "list<element: double>", "list<integer>"),
        ("experts", pa.array([["0", "1"]] * 4), "list<element: string>", "list<integer>"),
        ("probs", pa.array([[1, 0, 0, 0]] * 4), "list<element: int64>", "list<float>"),
        ("weights", pa.array([0.5] * 4), "double", "list<float>"),
        ("task", pa.array([1] * 4), "int64", "string"),
    ],
)
def test_mistyped_column_is_a_trace_error_naming_file_and_column(tmp_path, column, array, found, expected):
    path = _write(tmp_path, f"bad_{column}", _with(_good(), column, array))
    with pytest.raises(TraceError) as err:
        analyze(path)
    message = str(err.value)
    assert path in message and f"column {column} has type {found}, expected {expected}" in message


def test_string_layer_is_not_a_bare_value_error(tmp_path):
    """Before: ``ValueError: invalid literal for int()`` from deep in the accumulator."""
    path = _write(tmp_path, "layer_str", _with(_good(), "layer", pa.array(["a"] * 4)))
    with pytest.raises(TraceError, match=rf"{re.escape(path)}: column layer has type string"):
        analyze(path)


def test_float_experts_are_not_truncated(tmp_path):
    """Before: experts [0.0, 1.5] were read as experts 0 and 1."""
    path = _write(tmp_path, "experts_float", _with(_good(), "experts", pa.array([[0.0, 1.5]] * 4)))
    with pytest.raises(TraceError, match=rf"{re.escape(path)}: column experts has type list<element: double>"):
        analyze(path)


@pytest.mark.parametrize(
    ("column", "rows", "count"),
    [
        ("probs", [[math.nan] * 4] * 4, 4),
        ("probs", [[0.25] * 4, [0.25] * 4, [math.inf, 0, 0, 0], None], 1),
        ("weights", [[math.nan, 0.5]] * 4, 4),
        ("weights", [[0.5, 0.5], [0.5, -math.inf], [0.5, 0.5], [0.5, None]], 2),
    ],
)
def test_nonfinite_router_values_are_a_trace_error_with_a_row_count(tmp_path, column, rows, count):
    """Before: NaN probs/weights gave a null entropy or margin, shown like 'not recorded'."""
    path = _write(tmp_path, f"{column}_nan", _with(_good(), column, pa.array(rows, pa.list_(pa.float32()))))
    with pytest.raises(TraceError) as err:
        analyze(path)
    message = str(err.value)
    what = "NaN, inf, negative or null" if column == "probs" else "NaN, inf or null"
    assert path in message and f"column {column} has {what} values in {count} of 4 row(s)" in message


def test_negative_probabilities_and_null_ids_are_refused_negative_weights_kept(tmp_path):
    """Negative probs gave a router entropy of -70; a null expert id inside a list counted as expert
    0. TC-MoE's negative slots have negative weights: those are fine."""
    probs = [[0.5, 0.5, 0.0, 0.0], [0.25] * 4, [1.2, -0.2, 0.0, 0.0], [0.25] * 4]
    path = _write(tmp_path, "probs_negative", _with(_good(), "probs", pa.array(probs, pa.list_(pa.float32()))))
    with pytest.raises(TraceError, match=r"probs has NaN, inf, negative or null values in 1 of 4 row\(s\) \(first at row 2\)"):
        analyze(path)
    experts = pa.array([[0, 1], [0, None], [2, 3], [1, 0]], pa.list_(pa.int16()))
    path = _write(tmp_path, "experts_null_item", _with(_good(), "experts", experts))
    with pytest.raises(TraceError, match="column experts has 1 null item"):
        analyze(path)
    weights = pa.array([[0.7, -0.3]] * 4, pa.list_(pa.float32()))
    assert analyze(_write(tmp_path, "weights_negative", _with(_good(), "weights", weights)))["tokens"].iloc[0] == 4


def test_nonfinite_row_count_covers_the_whole_file(tmp_path):
    table = pa.concat_tables([_good()] * 5)  # 20 rows, read in several row groups and batches
    probs = table.column("probs").to_pylist()
    probs[7][1], probs[13][0], probs[13][2] = math.nan, math.nan, math.inf
    path = tmp_path / "t.parquet"
    pq.write_table(_with(table, "probs", pa.array(probs, pa.list_(pa.float32()))), path, row_group_size=6)
    with pytest.raises(TraceError, match=r"column probs has NaN, inf, negative or null values in 2 of 20 row\(s\) \(first at row 7\)"):
        list(iter_batches(path, METRIC_COLUMNS, batch_rows=3))
    assert sum(b.num_rows for b in iter_batches(path, ["layer", "weights"], batch_rows=3)) == 20  # probs not read


def test_bad_part_of_a_directory_is_named(tmp_path):
    d = tmp_path / "trace"
    d.mkdir()
    pq.write_table(_good(), d / "part-00000.parquet")
    pq.write_table(_with(_good(), "layer", pa.array(["a"] * 4)), d / "part-00001.parquet")
    with pytest.raises(TraceError, match=r"part-00001\.parquet: column layer has type string"):
        analyze(d)


def test_compare_checks_types_too(tmp_path):
    a = _write(tmp_path, "a", _good())
    b = _write(tmp_path, "b", _with(_good(), "experts", pa.array([[0.0, 1.5]] * 4)))
    with pytest.raises(TraceError, match=r"b\.parquet: column experts has type"):
        analyze([a, b], method="join")


def test_other_widths_and_layouts_of_the_schema_types_are_read(tmp_path):
    """Any integer / float width, string and list layout reads, and a probs column of type null
    (no distribution recorded) is not recorded, as null lists are."""
    good = _good()
    variants = {
        "int64_layer": _with(good, "layer", pa.array([0] * 4, pa.int64())),
        "fixed_size_experts": _with(good, "experts", pa.array([[0, 1], [1, 2], [2, 3], [3, 0]], pa.list_(pa.int16(), 2))),
        "float64_probs": _with(good, "probs", pa.array([[0.25] * 4] * 4, pa.large_list(pa.float64()))),
        "dictionary_task": _with(good, "task", pa.array(["task"] * 4).dictionary_encode()),
        "large_string_placement": _with(good, "placement", pa.array(["llm"] * 4, pa.large_string())),
    }
    for name, table in variants.items():
        out = analyze(_write(tmp_path, name, table))
        assert out["load"].iloc[0] == pytest.approx([0.25] * 4), name
        assert out["router_entropy"].iloc[0] == pytest.approx(math.log(4)), name
    out = analyze(_write(tmp_path, "null_probs", _with(good, "probs", pa.nulls(4))))
    assert out["tokens"].iloc[0] == 4 and math.isnan(out["router_entropy"].iloc[0])


def test_traces_of_write_trace_still_read(tmp_path):
    # (the evaluation's TraceWriter, probs recorded or not: test_analysis_metrics.py)
    assert analyze(write_trace(_good(), tmp_path / "s.parquet"))["tokens"].iloc[0] == 4


@pytest.mark.parametrize(
    ("column", "array", "message"),
    [
        ("layer", pa.array(["a"] * 4), "column layer has type string, expected integer"),
        ("experts", pa.array([[0.0, 1.5]] * 4), "column experts has type list<element: double>, expected list<integer>"),
        ("probs", pa.array([[math.nan] * 4] * 4, pa.list_(pa.float32())), "column probs has NaN, inf, negative or null values"),
    ],
)
def test_cli_reports_bad_traces_as_usage_errors(tmp_path, capsys, column, array, message):
    path = _write(tmp_path, f"bad_{column}", _with(_good(), column, array))
    assert main(["analyze", path, "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("libmoe analyze: error: trace file ") and path in err and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("column", "array", "message"),
    [
        ("experts", pa.array([[0, 1], [1, None], [2, 3], [3, 0]], pa.list_(pa.int32())), "column experts has 1 null item"),
        ("experts", pa.array([[0, 1], None, [2, 3], [3, 0]], pa.list_(pa.int32())), "column experts has 1 null value"),
        ("weights", pa.array([[0.5, 0.5], None, None, [0.5, 0.5]], pa.list_(pa.float32())), "column weights has 2 null value"),
        ("task", pa.array(["a", None, "a", "a"]), "column task has 1 null value"),
        ("num_experts", pa.array([4, 4, None, 4], pa.int32()), "column num_experts has 1 null value"),
        ("layer", pa.array([0, None, 0, 0], pa.int32()), "column layer has 1 null value"),
    ],
)
def test_null_values_are_a_trace_error_naming_the_part_file(tmp_path, column, array, message):
    """Before: the error came from the column helpers and named the column but not the file."""
    d = tmp_path / "trace"
    d.mkdir()
    for j in range(3):
        pq.write_table(_with(_good(), column, array) if j == 1 else _good(), d / f"part-{j}.parquet")
    with pytest.raises(TraceError, match=message) as err:
        analyze(d)
    assert str(d / "part-1.parquet") in str(err.value)
    if column != "weights":  # the comparison does not read the weights
        with pytest.raises(TraceError, match=message) as err:
            analyze([str(d / "part-0.parquet"), str(d)], method="join")
        assert str(d / "part-1.parquet") in str(err.value)
