"""Routing metrics on synthetic traces with closed-form answers."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from libmoe_core.analysis import (
    CollapseThresholds,
    RoutingAccumulator,
    TraceError,
    accumulate_trace,
    analyze,
    collapse_alarms,
    over_represented,
    specialisation_table,
    synthetic_trace,
    trace_table,
    write_synthetic_trace,
    write_trace,
)
from libmoe_core.analysis import metrics as M
from libmoe_core.analysis.schema import METRIC_COLUMNS, TRACE_SCHEMA


def _row(table, **key):
    sel = np.ones(len(table), bool)
    for k, v in key.items():
        sel &= (table[k] == v).to_numpy()
    assert sel.sum() == 1, key
    return table[sel].iloc[0]


# --------------------------------------------------------------------------- pure functions


def test_per_layer_functions_closed_form():
    e = 8
    uniform, onehot = np.full(e, 5), np.eye(e)[0] * 40
    assert M.load_cv(uniform) == 0 and M.gini(uniform) == pytest.approx(0) and M.max_load_ratio(uniform) == 1
    assert M.load_cv(onehot) == pytest.approx(math.sqrt(e - 1))
    assert M.gini(onehot) == pytest.approx((e - 1) / e)
    assert M.max_load_ratio(onehot) == pytest.approx(e)
    assert M.normalised_entropy(uniform) == pytest.approx(1) and M.normalised_entropy(onehot) == 0
    # gini of loads (1, 3): sorted x = (1, 3): 2*(1*1 + 2*3)/(2*4) - 3/2 = 0.25
    assert M.gini(np.array([3, 1])) == pytest.approx(0.25)


def test_per_token_functions_closed_form():
    w = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]], np.float32)
    assert M.margin(w) == pytest.approx([0.5, 0.0, 1.0])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert M.topk_weight_entropy(w) == pytest.approx([h, math.log(2), 0.0], abs=1e-6)
    # weights that do not sum to 1 are renormalised first (shared-expert router: 0.5 * w)
    assert M.margin(w * 0.5) == pytest.approx([0.5, 0.0, 1.0])
    assert M.margin(np.array([[0.2, 0.5, 0.3]])) == pytest.approx([0.2])
    assert M.margin(np.ones((2, 1))) == pytest.approx([1, 1])
    p = np.full((3, 4), 0.25, np.float32)
    assert M.row_entropy(p) == pytest.approx([math.log(4)] * 3)


def test_mutual_information_closed_form():
    # expert determined by task (2 tasks, equiprobable): I = ln 2, normalised 1
    assert M.mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(math.log(2))
    assert M.normalised_mutual_information(np.array([[10, 0], [0, 10]])) == pytest.approx(1)
    # independent
    assert M.mutual_information(np.array([[3, 6], [1, 2]])) == pytest.approx(0, abs=1e-12)
    assert M.mutual_information(np.array([[4, 2, 0]])) == 0


# --------------------------------------------------------------------------- traces


@pytest.mark.parametrize("e,k", [(4, 2), (8, 1), (6, 3)])
def test_uniform_routing(tmp_path, e, k):
    path = write_synthetic_trace(tmp_path / "u.parquet", num_docs=6, tokens_per_doc=4 * e, num_experts=e, top_k=k,
                                 pattern="uniform", docs_per_chunk=4)
    table = analyze(path)
    assert len(table) == 6  # 3 placements x 2 layers
    for _, row in table.iterrows():
        assert row["tokens"] == 6 * 4 * e
        assert row["load"] == pytest.approx([1 / e] * e)
        assert row["dead_experts"] == 0
        assert row["load_cv"] == pytest.approx(0, abs=1e-12)
        assert row["max_load_ratio"] == pytest.approx(1)
        assert row["gini"] == pytest.approx(0, abs=1e-12)
        assert row["top1_entropy_norm"] == pytest.approx(1)
        assert row["router_entropy"] == pytest.approx(math.log(e), rel=1e-6)
        assert row["topk_weight_entropy"] == pytest.approx(math.log(k), abs=1e-6)
        assert row["margin"] == pytest.approx(1.0 if k == 1 else 0.0, abs=1e-6)
        assert row["alarm"] == []


def test_all_tokens_on_one_expert(tmp_path):
    e = 5
    path = write_synthetic_trace(tmp_path / "c", num_docs=3, tokens_per_doc=7, num_experts=e, top_k=1, pattern="collapsed")
    table = analyze(path)
    for _, row in table.iterrows():
        assert row["dead_experts"] == e - 1
        assert row["max_load_ratio"] == pytest.approx(e)
        assert row["load_cv"] == pytest.approx(math.sqrt(e - 1))
        assert row["gini"] == pytest.approx((e - 1) / e)
        assert row["top1_entropy_norm"] == 0
        assert row["router_entropy"] == pytest.approx(0, abs=1e-6)
        assert row["margin"] == 1
        assert row["alarm"]
    flagged = collapse_alarms(table, CollapseThresholds(max_load_ratio=None, dead_experts=e))
    assert flagged.empty
    assert len(collapse_alarms(table, CollapseThresholds(max_load_ratio=e, dead_experts=None))) == len(table)


def test_hand_made_trace_metrics_and_specialisation(tmp_path):
    # 4 tokens, E=3, k=2. Task a routes to {0,1}, task b to {2,1}.
    experts = [[0, 1], [0, 1], [2, 1], [2, 1]]
    weights = [[0.75, 0.25]] * 4
    probs = [[0.6, 0.2, 0.2]] * 2 + [[0.2, 0.2, 0.6]] * 2
    tbl = trace_table(experts, weights, probs, task=["a", "a", "b", "b"], token_kind=["image", "text", "image", "text"])
    path = write_trace(tbl, tmp_path / "h.parquet")
    row = analyze(path).iloc[0]
    assert row["load"] == pytest.approx([0.25, 0.5, 0.25])
    assert row["dead_experts"] == 0
    assert row["max_load_ratio"] == pytest.approx(1.5)
    assert row["top1_entropy_norm"] == pytest.approx(math.log(2) / math.log(3))
    h = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    assert row["router_entropy"] == pytest.approx(h, rel=1e-6)
    assert row["margin"] == pytest.approx(0.5)
    # slots: joint(task, expert) = a:{0:2, 1:2}, b:{1:2, 2:2} -> I = H(E) - H(E|T) = H(.25,.5,.25) - ln 2
    assert row["mi_task"] == pytest.approx(1.5 * math.log(2) - math.log(2))
    assert row["mi_token_kind"] == pytest.approx(0, abs=1e-12)
    stats = accumulate_trace(path)
    spec = specialisation_table(stats).iloc[0]
    assert spec["mi_task"] == pytest.approx(0.5 * math.log(2))
    only = specialisation_table(stats, placement="llm", layer=0)  # filtering by the table's own keys
    assert len(only) == 1 and only.iloc[0]["mi_task"] == spec["mi_task"]
    assert specialisation_table(stats, placement="vision").empty
    top = over_represented(stats, "llm", 0, top=1)
    assert top.set_index("task")["expert"].to_dict() == {"a": 0, "b": 2}
    assert top["lift"].tolist() == pytest.approx([2.0, 2.0])


def test_group_by_task_and_token_kind(tmp_path):
    path = write_synthetic_trace(tmp_path / "r.parquet", num_docs=6, tokens_per_doc=16, tasks=("x", "y"))
    base = analyze(path)
    by_task = analyze(path, by="task")
    by_kind = analyze(path, by="token_kind")
    assert set(by_task["task"]) == {"x", "y"}
    assert set(by_kind[by_kind.placement == "llm"]["token_kind"]) == {"image", "text", "generated"}
    for by, table in (("task", by_task), ("token_kind", by_kind)):
        summed = table.groupby(["placement", "layer"])["tokens"].sum()
        assert summed.to_dict() == base.set_index(["placement", "layer"])["tokens"].to_dict()
        assert by in table.columns
    with pytest.raises(ValueError, match="task, token_kind"):
        analyze(path, by="doc")


def test_streaming_is_batch_invariant_and_matches_one_shot(tmp_path):
    path = write_synthetic_trace(tmp_path / "d", num_docs=10, tokens_per_doc=12, docs_per_chunk=3, files=2,
                                 collapse={("llm", 1): 4.0})
    one = analyze(path, batch_rows=1 << 20).drop(columns=["trace"])
    small = analyze(path, batch_rows=37).drop(columns=["trace"])
    numeric = one.select_dtypes("number").columns
    assert list(one["layer"]) == list(small["layer"]) and list(one["placement"]) == list(small["placement"])
    np.testing.assert_allclose(one[numeric].to_numpy(float), small[numeric].to_numpy(float), rtol=1e-9)
    # oracle: direct numpy on the whole table
    full = pq.read_table(path).to_pandas()
    part = full[(full.placement == "llm") & (full.layer == 1)]
    ex = np.stack(part.experts.to_numpy())
    counts = np.bincount(ex.ravel(), minlength=4)
    row = _row(one, placement="llm", layer=1)
    assert row["load"] == pytest.approx(counts / counts.sum())
    assert row["router_entropy"] == pytest.approx(M.row_entropy(np.stack(part.probs.to_numpy())).mean(), rel=1e-5)
    assert row["max_load_ratio"] > _row(one, placement="llm", layer=0)["max_load_ratio"]


def test_mixed_list_lengths_in_one_batch():
    # vision layer: E=4, k=2; llm layer: E=8, k=1, in the same batch
    a = trace_table([[0, 1], [2, 3]], num_experts=4, placement="vision")
    b = trace_table([[5], [5], [7]], num_experts=8, placement="llm")
    batch = pa.concat_tables([a, b]).combine_chunks().to_batches()[0].select(list(METRIC_COLUMNS))
    acc = RoutingAccumulator()
    acc.update(batch)
    table = acc.result().table().set_index("placement")
    assert table.loc["vision", "load"] == pytest.approx([0.25] * 4)
    assert table.loc["llm", "num_experts"] == 8 and table.loc["llm", "dead_experts"] == 6
    assert table.loc["llm", "load"][5] == pytest.approx(2 / 3)


def test_inconsistent_experts_per_layer_is_an_error():
    a = trace_table([[0, 1]], [[0.5, 0.5]], [[0.5, 0.5, 0, 0, 0, 0]], num_experts=4)
    b = trace_table([[0, 1]], [[0.5, 0.5]], [[0.5, 0.5, 0, 0, 0, 0]], num_experts=6)
    acc = RoutingAccumulator(source="x")
    acc.update(a.to_batches()[0].select(list(METRIC_COLUMNS)))
    with pytest.raises(TraceError, match="num_experts 4 and 6"):
        acc.update(b.to_batches()[0].select(list(METRIC_COLUMNS)))


def test_missing_column_names_file_and_column(tmp_path):
    d = tmp_path / "trace"
    write_trace([synthetic_trace(2, 4), synthetic_trace(2, 4, doc_offset=2)], d, files=2)
    bad = d / "part-00001.parquet"
    pq.write_table(pq.read_table(bad).drop_columns(["probs"]), bad)
    with pytest.raises(TraceError, match=r"part-00001\.parquet.*probs"):
        analyze(d)
    with pytest.raises(FileNotFoundError):
        analyze(tmp_path / "nope")


def test_synthetic_trace_follows_schema():
    t = synthetic_trace(2, 8, num_experts=6, top_k=3)
    assert t.schema.equals(TRACE_SCHEMA)
    assert t.num_rows == 2 * 8 * 3 * 2
    ex = np.stack(t.column("experts").to_numpy(zero_copy_only=False))
    w = np.stack(t.column("weights").to_numpy(zero_copy_only=False))
    assert ex.shape == (96, 3) and np.allclose(w.sum(1), 1, atol=1e-6)
    assert all(len(set(r)) == 3 for r in ex.tolist())
    with pytest.raises(ValueError, match="uniform, collapsed, random"):
        synthetic_trace(pattern="nope")


def test_null_probs_count_for_load_only(tmp_path):
    t = trace_table([[0, 1], [2, 3], [1, 0]], num_experts=4, placement="llm")
    probs = pa.array([[0.25] * 4, None, [1.0, 0, 0, 0]], pa.list_(pa.float32()))
    t = t.set_column(t.schema.get_field_index("probs"), "probs", probs)
    u = trace_table([[0, 1]], num_experts=4, placement="vision")
    u = u.set_column(u.schema.get_field_index("probs"), "probs", pa.nulls(1, pa.list_(pa.float32())))
    table = analyze(write_trace(pa.concat_tables([t, u]), tmp_path / "n.parquet")).set_index("placement")
    assert table.loc["llm", "tokens"] == 3
    assert table.loc["llm", "load"] == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert table.loc["llm", "router_entropy"] == pytest.approx(math.log(4) / 2)  # mean over the 2 recorded rows
    assert table.loc["vision", "tokens"] == 1 and math.isnan(table.loc["vision", "router_entropy"])


def test_reads_traces_of_the_evaluation_writer(tmp_path):
    traces = pytest.importorskip("libmoe_core.evaluation.traces")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=6).astype(np.float32)
    experts = np.argsort(-probs, axis=1)[:, :2]
    weights = np.take_along_axis(probs, experts, 1)
    weights /= weights.sum(1, keepdims=True)
    with traces.TraceWriter(tmp_path / "t", rows_per_part=4) as w:
        w.add_block("vqa", 0, "ck", "llm", 0, positions=np.arange(6), token_kinds="text", experts=experts,
                    weights=weights, probs=probs)
        w.add_block("vqa", 0, "ck", "vision", 1, positions=np.arange(6), token_kinds="image", experts=experts,
                    weights=weights, num_experts=4)
    table = analyze(tmp_path / "t").set_index("placement")
    counts = np.bincount(experts.ravel(), minlength=4)
    for place in ("llm", "vision"):
        assert table.loc[place, "load"] == pytest.approx(counts / counts.sum())
    assert table.loc["llm", "router_entropy"] == pytest.approx(M.row_entropy(probs).mean(), rel=1e-6)
    assert math.isnan(table.loc["vision", "router_entropy"])


def test_iter_batches_can_stop_early(tmp_path):
    from libmoe_core.analysis import iter_batches

    path = write_synthetic_trace(tmp_path / "s", num_docs=4, tokens_per_doc=8, docs_per_chunk=1, files=2)
    it = iter_batches(path, ["layer"], batch_rows=5)
    first = next(it)
    assert first.num_rows == 5
    it.close()  # the reader thread stops; nothing hangs
    assert sum(b.num_rows for b in iter_batches(path, ["layer"], batch_rows=7, prefetch=0)) == 4 * 8 * 6


def test_plots_of_a_table_grouped_by_task_show_token_weighted_layer_values(tmp_path):
    """Task a: 90 tokens of uniform routing (entropy 1); task b: 10 one-hot tokens (entropy 0). The
    layer's value is 0.9; an unweighted mean over the two task rows would plot 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import pyarrow as pa

    from libmoe_core.analysis import analyze_stats, plots

    uniform = trace_table([[i % 2] for i in range(90)], [[1.0]] * 90, [[0.25] * 4] * 90, num_experts=4, task="a")
    onehot = trace_table([[2]] * 10, [[1.0]] * 10, [[0.0, 0.0, 1.0, 0.0]] * 10, num_experts=4, task="b",
                         position=list(range(90, 100)))
    path = write_trace(pa.concat_tables([uniform, onehot]), tmp_path / "two_tasks.parquet")
    assert analyze(path).iloc[0]["router_entropy_norm"] == pytest.approx(0.9)
    by_task = analyze(path, by="task", compare=False)
    assert sorted(by_task["router_entropy_norm"].round(6)) == [0.0, 1.0]
    fig = plots.entropy_curves(by_task, metrics=("router_entropy_norm",))
    assert fig.axes[0].lines[0].get_ydata().tolist() == pytest.approx([0.9])
    fig = plots.entropy_distribution(analyze_stats([path], by="task")[0], "llm")
    shares = fig.axes[0].collections[0].get_array().ravel()
    assert (shares[0], shares[-1], shares.sum()) == pytest.approx((0.1, 0.9, 1.0))  # shares of all the layer's tokens


@pytest.mark.parametrize("e,k,expected", [(4, 2, 1.5), (4, 1, 2.0), (8, 2, 2.0), (3, 2, 1.25), (2, 1, 1.5),
                                          (2, 2, None), (64, 1, 2.0)])
def test_auto_max_load_threshold_is_halfway_to_the_most_top_k_allows(e, k, expected):
    from libmoe_core.analysis.alarms import auto_max_load_ratio

    assert auto_max_load_ratio(e, k) == expected
    assert CollapseThresholds().max_load_threshold(e, k) == expected  # the default
    assert CollapseThresholds(1.8).max_load_threshold(e, k) == 1.8  # a number is used as given


def test_default_alarm_flags_a_top2_layer_short_of_total_collapse(tmp_path):
    # E=4, k=2 (LibMoE's runs): expert 0 in 8 of 10 tokens' pairs, share 8/20, ratio 1.6; the most
    # top-2 allows is 2.0 (every token), so a fixed threshold of 2.0 fired only on total collapse.
    pairs = [[0, 1]] * 3 + [[0, 2]] * 3 + [[0, 3]] * 2 + [[1, 2], [1, 3]]
    path = write_trace(trace_table(pairs, num_experts=4), tmp_path / "t.parquet")
    table = analyze(path)
    assert table["max_load_ratio"].tolist() == [pytest.approx(1.6)] and table["dead_experts"].tolist() == [0]
    assert table["alarm"].tolist() == [["max_load_ratio 1.60 >= 1.5"]]
    assert collapse_alarms(table, CollapseThresholds(max_load_ratio=2.0)).empty
    # k = E: every expert in every token, the ratio is 1 and cannot signal collapse: no test
    everything = write_trace(trace_table([[0, 1]] * 4, num_experts=2), tmp_path / "all.parquet")
    assert analyze(everything)["alarm"].tolist() == [[]]


@pytest.mark.parametrize("kwargs,match", [({"max_load_ratio": "high"}, "max_load_ratio must be"),
                                          ({"max_load_ratio": 0}, "max_load_ratio must be"),
                                          ({"dead_experts": 0}, "dead_experts must be"),
                                          ({"dead_experts": 1.5}, "dead_experts must be")])
def test_bad_thresholds_are_errors_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollapseThresholds(**kwargs)


def test_max_load_bars_mark_each_layers_threshold(tmp_path):
    import matplotlib.pyplot as plt

    from libmoe_core.analysis import plots

    top2 = trace_table([[0, 1], [0, 2], [0, 3], [1, 2]], num_experts=4, layer=0)  # auto threshold 1.5
    top1 = trace_table([[0], [1], [2], [0]], num_experts=4, layer=1)  # auto threshold 2.0
    table = analyze(write_trace(pa.concat_tables([top2, top1]), tmp_path / "t.parquet"))
    fig = plots.max_load_bars(table, CollapseThresholds())
    marks = fig.axes[0].collections[0].get_segments()
    assert [(float(s[0][1]), float(s[1][1])) for s in marks] == [(1.5, 1.5), (2.0, 2.0)]
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "alarm at (per layer)"
    fig = plots.max_load_bars(table, 1.8)
    assert [float(s[0][1]) for s in fig.axes[0].collections[0].get_segments()] == [1.8, 1.8]
    plt.close("all")


def _plotted(ax) -> dict:
    """{x: y} of the first line of ``ax``."""
    line = ax.lines[0]
    return {float(x): float(y) for x, y in zip(line.get_xdata(), line.get_ydata())}


def test_plots_of_a_grouped_table_show_the_layers_own_values_or_refuse(tmp_path):
    """Before: the plotted layer value of a table grouped by task averaged the tasks' values: by
    tokens for router entropy (counting a task without probs as 0), unweighted for the switch
    rate, and for distribution metrics (top-1 entropy, max load) that cannot be averaged at all."""
    import matplotlib

    matplotlib.use("Agg")

    from libmoe_core.analysis import plots

    # one checkpoint, layer 0, E=4, k=1: task a uniform probs, task b no probs, task c one-hot probs
    a = trace_table([[0]] * 10, probs=[[0.25] * 4] * 10, num_experts=4, task="a")
    b = trace_table([[1]] * 10, probs=[[0.25] * 4] * 10, num_experts=4, task="b")
    b = b.set_column(b.schema.get_field_index("probs"), "probs", pa.nulls(10, pa.list_(pa.float32())))
    c = trace_table([[2]] * 20, probs=[[0, 0, 1, 0]] * 20, num_experts=4, task="c")
    path = write_trace(pa.concat_tables([a, b, c]), tmp_path / "t.parquet")
    entropies = [-sum(p * math.log(p) for p in row if p > 0) / math.log(4)
                 for part in (a, c) for row in part.column("probs").to_pylist()]
    by_task = analyze(path, by="task")
    fig = plots.entropy_curves(by_task, metrics=("router_entropy_norm", "margin"))
    assert _plotted(fig.axes[0]) == pytest.approx({0.0: sum(entropies) / len(entropies)})  # 1/3
    assert _plotted(fig.axes[1]) == pytest.approx({0.0: 1.0})
    with pytest.raises(ValueError, match="top1_entropy_norm .* by=None"):
        plots.entropy_curves(by_task)
    with pytest.raises(ValueError, match="max_load_ratio"):
        plots.metric_over_checkpoints(by_task, "max_load_ratio")
    assert _plotted(plots.entropy_curves(analyze(path), metrics=("top1_entropy_norm",)).axes[0]) == pytest.approx(
        {0.0: -sum(p * math.log(p) for p in (0.25, 0.25, 0.5)) / math.log(4)})  # a by=None table plots as before

    # three checkpoints, {(task, position): expert}; the final lacks most tokens
    runs = {"c0": {**{("a", p): 0 for p in range(10)}, **{("b", p): 2 for p in range(30)}},
            "c1": {**{("a", p): 1 for p in range(10)}, **{("b", p): 2 for p in range(30)}},
            "c2": {**{("a", p): 1 for p in range(5)}, **{("b", p): 3 for p in range(10)}}}
    paths = []
    for name, rows in runs.items():
        keys = list(rows)
        table = trace_table([[rows[k]] for k in keys], num_experts=4, checkpoint=name, task=[k[0] for k in keys],
                            position=[k[1] for k in keys])
        paths.append(write_trace(table, tmp_path / f"{name}.parquet"))

    def agreement(x, y):  # share of the tokens of both x and y routed alike (k = 1)
        common = [key for key in y if key in x]
        return sum(x[key] == y[key] for key in common) / len(common)

    names = list(runs)
    fig = plots.switch_rate_curves(analyze(paths, by="task"))
    switch = {float(i): 1 - agreement(runs[names[i - 1]], runs[names[i]]) for i in (1, 2)}
    saturation = {float(i): agreement(runs[n], runs["c2"]) for i, n in enumerate(names)}
    assert {x: y for x, y in _plotted(fig.axes[0]).items() if not math.isnan(y)} == pytest.approx(switch)
    assert _plotted(fig.axes[1]) == pytest.approx(saturation)  # c1: 1/3 (weighting by `matched` gives 1/4)


def test_per_layer_plots_of_a_trace_holding_several_checkpoints_draw_one_line_each(tmp_path):
    """One trace folder may hold several checkpoints; its by=None table has a row per checkpoint and
    layer, which entropy_curves / router_comparison refused as "grouped" (top-1 entropy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from libmoe_core.analysis import plots

    one = trace_table([[0]] * 6 + [[1]] * 2, num_experts=4, checkpoint="c0")  # top-1 shares 3/4, 1/4
    two = trace_table([[0]] * 4 + [[1]] * 4, num_experts=4, checkpoint="c1")  # 1/2, 1/2
    folder = tmp_path / "trace"
    folder.mkdir()
    write_trace(one, folder / "part-0.parquet"), write_trace(two, folder / "part-1.parquet")
    table = analyze(str(folder), compare=False)
    entropy = {c: -sum(p * math.log(p) for p in shares) / math.log(4) for c, shares in
               (("c0", (0.75, 0.25)), ("c1", (0.5, 0.5)))}
    for fig in (plots.entropy_curves(table, metrics=("top1_entropy_norm",)),
                plots.router_comparison({"run": table}, "top1_entropy_norm")):
        lines = sorted(float(line.get_ydata()[0]) for line in fig.axes[0].lines if len(line.get_ydata()))
        assert lines == pytest.approx(sorted(entropy.values()))
    plt.close("all")
