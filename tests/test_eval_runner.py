"""libmoe eval without running lmms-eval: command building, results parsing, CLI checks."""

import json
import os
import sys
import time

import pytest

from libmoe_core.cli import main as cli_main
from libmoe_core.evaluation.registration import MODEL_CLASSES
from libmoe_core.evaluation.results import find_results_file, format_table, load_results, results_rows
from libmoe_core.evaluation.runner import OFFLINE_ENV, EvalConfig, build_command, build_env, run_evaluation

# the shape lmms-eval 0.7.3 writes (taken from a real easyvqa run, plus a filtered metric)
RESULTS = {
    "results": {
        "easyvqa": {
            "alias": "easyvqa",
            "exact_match,none": 0.375,
            "exact_match_stderr,none": 0.183,
            "exact_match_stderr_clt,none": 0.183,
            "exact_match_stderr_clustered,none": "N/A",
            "exact_match_colour,none": 1.0,
            "exact_match_colour_stderr,none": "N/A",
        },
        "ai2d": {"alias": "ai2d", "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.1},
        "mmmu_val": {"alias": "mmmu_val", "submission,none": {"a": 1}, "mmmu_acc,none": 0.25},
    },
    "n-samples": {"easyvqa": {"original": 9673, "effective": 8}},
}


def _cfg(tmp_path, **kw):
    base = {"model_path": "/ck/pt", "tasks": ["easyvqa", "pope"], "output_path": tmp_path / "out"}
    base.update(kw)
    return EvalConfig(**base)


def _value(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_build_command(tmp_path):
    cfg = _cfg(tmp_path, model="libmoe", batch_size=4, limit=8, conv_template="phi35", return_id_experts=True,
               layers=[1, 2], placements=("llm",), log_samples=True)
    cmd = build_command(cfg, include_path=tmp_path / "inc", module="lmms_eval")
    assert cmd[:3] == [sys.executable, "-m", "lmms_eval"]
    assert _value(cmd, "--model") == "libmoe"
    assert _value(cmd, "--model_args") == (
        "pretrained=/ck/pt,conv_template=phi35,return_id_experts=True,layers_expert_selection=1;2,"
        f"placements=llm,trace_dir={tmp_path / 'out' / 'traces'}")
    assert _value(cmd, "--tasks") == "easyvqa,pope"
    assert _value(cmd, "--batch_size") == "4" and _value(cmd, "--limit") == "8"
    assert _value(cmd, "--output_path") == str(tmp_path / "out")
    assert _value(cmd, "--include_path") == str(tmp_path / "inc")
    assert "--log_samples" in cmd
    plain = build_command(_cfg(tmp_path, tasks=["pope"]), module="lmms_eval")
    assert "--include_path" not in plain and "--limit" not in plain and "--log_samples" not in plain
    assert _value(plain, "--model_args") == "pretrained=/ck/pt"


def test_launcher_is_lmms_eval_for_foreign_models(tmp_path):
    assert build_command(_cfg(tmp_path, model="llava"))[2] == "lmms_eval"
    assert build_command(_cfg(tmp_path, model="libmoe"))[2] in ("lmms_eval", "libmoe_core.evaluation.launch")
    assert set(MODEL_CLASSES) == {"libmoe", "libmoe_toy"}


def test_env_offline_only_when_asked():
    env = build_env({"PATH": "/bin"}, offline=True)
    assert env["PATH"] == "/bin" and all(env[k] == v for k, v in OFFLINE_ENV.items())
    assert "HF_HUB_OFFLINE" not in build_env({"PATH": "/bin"}, offline=False)


def test_results_rows_and_table(tmp_path):
    rows = results_rows(RESULTS)
    got = [(r.task, r.metric, r.value, r.stderr) for r in rows]
    assert got == [
        ("easyvqa", "exact_match", 0.375, 0.183),
        ("easyvqa", "exact_match_colour", 1.0, None),
        ("ai2d", "exact_match (flexible-extract)", 0.5, 0.1),
        ("mmmu_val", "mmmu_acc", 0.25, None),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["task", "metric", "value", "stderr"]
    assert table[2].split() == ["easyvqa", "exact_match", "0.3750", "0.1830"]
    assert len(table) == 2 + len(rows)


def test_mme_gets_the_perception_plus_cognition_total_libmoe_reports():
    data = {"results": {"mme": {"alias": "mme", "mme_perception_score,none": 1403.25, "mme_perception_score_stderr,none": "N/A",
                                "mme_cognition_score,none": 312.5, "mme_cognition_score_stderr,none": "N/A"},
                        "pope": {"pope_accuracy,none": 0.8}}}
    got = [(r.task, r.metric, r.value) for r in results_rows(data)]
    assert got == [("mme", "mme_perception_score", 1403.25), ("mme", "mme_cognition_score", 312.5),
                   ("mme", "mme_total_score (perception + cognition)", 1715.75), ("pope", "pope_accuracy", 0.8)]
    partial = {"results": {"mme": {"mme_perception_score,none": 1403.25}}}
    assert [r.metric for r in results_rows(partial)] == ["mme_perception_score"]  # no total from one part


def test_find_results_file_takes_the_newest_fresh_one(tmp_path):
    assert find_results_file(tmp_path / "missing") is None
    old = tmp_path / "m" / "20250101_000000_results.json"
    old.parent.mkdir()
    old.write_text(json.dumps(RESULTS))
    os.utime(old, (time.time() - 100, time.time() - 100))
    new = tmp_path / "m" / "20250102_000000_results.json"
    new.write_text(json.dumps(RESULTS))
    (tmp_path / "m" / "samples.jsonl").write_text("{}")
    assert find_results_file(tmp_path) == new
    assert find_results_file(tmp_path, newer_than=time.time() - 50) == new
    assert find_results_file(tmp_path, newer_than=time.time() + 50) is None
    bad = tmp_path / "x_results.json"
    bad.write_text("[]")
    with pytest.raises(ValueError, match="x_results.json"):
        load_results(bad)


def test_run_refuses_judge_tasks_before_doing_anything(tmp_path):
    from libmoe_core.evaluation import JudgeRequirementError

    cfg = _cfg(tmp_path, tasks=["pope", "hallusion_bench_image"])
    with pytest.raises(JudgeRequirementError, match="hallusion_bench_image"):
        run_evaluation(cfg, env={"PATH": os.environ.get("PATH", "")})
    assert not cfg.output_path.exists()


def test_run_refuses_an_output_path_holding_an_earlier_runs_judge_answers(tmp_path, monkeypatch):
    """lmms-eval's HallusionBench reads gpt_response/hallusion_output_*_model.json back from its
    output path and judges only the samples past its length: a second model scored 100 with the
    first model's answers."""
    from libmoe_core.evaluation import runner

    monkeypatch.setattr(runner, "build_command", lambda cfg, include: pytest.fail("lmms-eval was started"))
    cfg = _cfg(tmp_path, tasks=["hallusion_bench_image"])
    cache = cfg.output_path / "gpt_response" / "hallusion_output_vd_model.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("[]")
    with pytest.raises(runner.EvalRunError, match=f"judge answers of an earlier run.*{cache}"):
        run_evaluation(cfg, env={"OPENAI_API_KEY": "sk-not-used", "PATH": os.environ.get("PATH", "")})
    tagged = _cfg(tmp_path, tasks=["public_eval_qwen3_5_family"])  # an lmms-eval tag holding it
    with pytest.raises(runner.EvalRunError, match="judge answers of an earlier run"):
        run_evaluation(tagged, env={"OPENAI_API_KEY": "sk-not-used", "PATH": os.environ.get("PATH", "")})


def test_a_failed_run_keeps_the_earlier_runs_traces(tmp_path, monkeypatch):
    """The earlier run's parts were deleted before lmms-eval ran; a run that then failed (a bad
    placement, an unknown task) left none, its summary still pointing at them."""
    from libmoe_core.evaluation import runner

    cfg = _cfg(tmp_path, tasks=["pope"], return_id_experts=True)
    cfg.trace_dir.mkdir(parents=True)
    (cfg.trace_dir / "part-r0-00000.parquet").write_bytes(b"earlier run")
    code = f"open({str(cfg.trace_dir / 'part-r0-00001.parquet')!r}, 'w').write('failed run'); raise SystemExit(3)"
    monkeypatch.setattr(runner, "build_command", lambda cfg, include: [sys.executable, "-c", code])
    with pytest.raises(runner.EvalRunError, match="exited with status 3"):
        run_evaluation(cfg, overwrite_traces=True, stream=None, env=dict(os.environ))
    assert [p.name for p in cfg.trace_dir.iterdir()] == ["part-r0-00000.parquet"]
    assert (cfg.trace_dir / "part-r0-00000.parquet").read_bytes() == b"earlier run"
    assert not (cfg.output_path / "traces.previous").exists()


def test_interrupted_run_stops_lmms_eval(tmp_path, monkeypatch):
    # A notebook interrupt (KeyboardInterrupt) while the output streams: the evaluation process
    # is killed, not left running with nobody reading its output.
    from libmoe_core.evaluation import runner

    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('evaluating', flush=True); "
    fake = [sys.executable, "-c", code + "time.sleep(600)"]
    monkeypatch.setattr(runner, "build_command", lambda cfg, include: fake)

    class InterruptingStream:
        def write(self, text):
            raise KeyboardInterrupt

        def flush(self):
            pass

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(_cfg(tmp_path, tasks=["pope"]), stream=InterruptingStream(), env=dict(os.environ))
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cli_dry_run_prints_the_command(tmp_path, capsys):
    rc = cli_main(["eval", "--model-path", "/ck", "--tasks", "libmoe12", "easyvqa", "--limit", "8",
                   "--output-path", str(tmp_path), "--return-id-experts", "--layers-expert-selection", "0", "3",
                   "--placements", "vision,llm", "--model-arg", "max_new_tokens=4", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--tasks ai2d,chartqa,textvqa_val,gqa,hallusion_bench_image,mathvista_testmini_format,mmbench_en_dev," in out
    assert "layers_expert_selection=0;3,placements=vision;llm" in out and "max_new_tokens=4" in out
    assert "--limit 8 " in out and f"--include_path {tmp_path / 'lmms_tasks'}" in out
    assert not (tmp_path / "lmms_tasks").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "hallusion_bench_image"], "OPENAI_API_KEY"),
        (["--tasks", "pope", "--placements", "llm"], "--return-id-experts"),
        (["--tasks", "pope", "--return-id-experts", "--placements", "decoder"], "decoder"),
        (["--tasks", "pope", "--model-arg", "novalue"], "KEY=VALUE"),
    ],
)
def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    rc = cli_main(["eval", "--model-path", "/ck", "--output-path", str(tmp_path / "o"), *argv])
    assert rc in (1, 2)
    assert message in capsys.readouterr().err
