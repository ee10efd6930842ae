"""``libmoe analyze``: JSON and table output on small synthetic traces."""

import json
import math
from pathlib import Path

import pytest

from libmoe_core.analysis import JSON_KEYS, trace_table, write_synthetic_trace, write_trace
from libmoe_core.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_json_on_uniform_trace(tmp_path, capsys):
    path = write_synthetic_trace(tmp_path / "u.parquet", num_docs=4, tokens_per_doc=8, num_experts=4, top_k=2,
                                 pattern="uniform")
    out = _json(capsys, ["analyze", str(path), "--json"])
    assert [(o["placement"], o["layer"]) for o in out] == [
        ("vision", 0), ("vision", 1), ("projector", 0), ("projector", 1), ("llm", 0), ("llm", 1)]
    for o in out:
        assert set(JSON_KEYS) <= set(o)
        assert not {"switch_rate", "overlap", "saturation"} & set(o)
        assert o["tokens"] == 32 and o["load"] == [0.25] * 4 and o["dead_experts"] == 0
        assert o["load_cv"] == 0 and o["max_load_ratio"] == 1 and o["gini"] == pytest.approx(0, abs=1e-12)
        assert o["router_entropy"] == pytest.approx(math.log(4), rel=1e-6)
        assert o["topk_weight_entropy"] == pytest.approx(math.log(2), rel=1e-6)
        assert o["margin"] == pytest.approx(0, abs=1e-6) and o["top1_entropy_norm"] == pytest.approx(1)


def test_json_with_two_checkpoints_and_by(tmp_path, capsys):
    a = write_trace(trace_table([[0, 1], [2, 3]], num_experts=4, checkpoint="s1", task=["t1", "t2"]), tmp_path / "a.parquet")
    b = write_trace(trace_table([[1, 0], [2, 3]], num_experts=4, checkpoint="s2", task=["t1", "t2"]), tmp_path / "b.parquet")
    out = _json(capsys, ["analyze", str(a), str(b), "--json"])
    assert [o["checkpoint"] for o in out] == ["s1", "s2"]
    assert out[0]["switch_rate"] is None and out[0]["saturation"] == 1.0
    assert out[1]["switch_rate"] == pytest.approx(0.5) and out[1]["overlap"] == 1.0 and out[1]["saturation"] == 1.0
    out = _json(capsys, ["analyze", str(a), str(b), "--json", "--by", "task"])
    by = {(o["checkpoint"], o["task"]): o["switch_rate"] for o in out}
    assert by == {("s1", "t1"): None, ("s1", "t2"): None, ("s2", "t1"): 1.0, ("s2", "t2"): 0.0}


def test_table_alarms_and_errors(tmp_path, capsys):
    path = write_synthetic_trace(tmp_path / "c.parquet", num_docs=2, tokens_per_doc=4, top_k=1, pattern="collapsed")
    assert main(["analyze", str(path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["checkpoint", "placement", "layer"]
    assert len(lines) == 7 and all("! max_load_ratio 4.00 >= 2" in line for line in lines[1:])
    assert "6 layer(s) flagged" in captured.err
    assert main(["analyze", str(path), "--fail-on-alarm"]) == 1
    assert main(["analyze", str(path), "--fail-on-alarm", "--max-load-ratio", "5", "--dead-experts", "4"]) == 0
    assert main(["analyze", str(path), "--fail-on-alarm", "--max-load-ratio", "auto", "--dead-experts", "4"]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["analyze", str(path), "--max-load-ratio", "high"])
    assert "expected 'auto' or a number > 0, got 'high'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a usage error (2), not a traceback with --fail-on-alarm's 1
        main(["analyze", str(path), "--dead-experts", "0"])
    assert exit_.value.code == 2 and "expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "trace not found" in capsys.readouterr().err
    cut = tmp_path / "cut.parquet"  # a copy cut short, as a killed writer or a partial download leaves it
    data = Path(path).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert main(["analyze", str(cut)]) == 2
    assert f"trace file {cut} is unreadable (truncated or corrupt?)" in capsys.readouterr().err
    assert main(["analyze", str(path), "--batch-rows", "0"]) == 2
    assert "batch_rows must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(path), "--by", "doc"])
    assert "choose from 'task', 'token_kind'" in capsys.readouterr().err


def test_table_prints_no_negative_zero():
    """A value that rounds to zero prints ``0.000``, not ``-0.000`` (e.g. a top-1 entropy of -1e-9)."""
    import pandas as pd

    from libmoe_core.analysis import format_table

    table = pd.DataFrame([{"trace": "t.parquet", "checkpoint": "c", "placement": "vision", "layer": 0, "tokens": 8,
                           "dead_experts": 0, "load_cv": -0.0, "max_load_ratio": -0.001, "gini": -1e-9,
                           "top1_entropy_norm": -0.0004, "margin": -0.25, "alarm": []}])
    row = format_table(table).splitlines()[1].split()
    assert row[3:] == ["8", "0", "0.000", "0.00", "0.000", "0.000", "-0.250"]  # a real negative keeps its sign
