"""Task-list expansion, the libmoe12 mapping against lmms-eval's YAMLs, and the judge check."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from libmoe_core.evaluation.benchmarks import (
    JUDGE_GROUPS,
    JUDGE_TASKS,
    LIBMOE12,
    TASK_ALIASES,
    JudgeRequirementError,
    check_judge_requirements,
    expand_tasks,
)

SUITE = [
    "ai2d", "chartqa", "textvqa_val", "gqa", "hallusion_bench_image", "mathvista_testmini_format",
    "mmbench_en_dev", "mme", "mmmu_val", "mmstar", "pope", "scienceqa_img",
]


def test_libmoe12_expands_to_the_twelve_in_order():
    assert expand_tasks("libmoe12") == SUITE
    assert list(LIBMOE12.values()) == SUITE


def test_expansion_splits_dedupes_and_keeps_unknown_names():
    assert expand_tasks(["easyvqa,pope", "libmoe12", "my_task"]) == ["easyvqa", "pope"] + [
        t for t in SUITE if t != "pope"
    ] + ["my_task"]
    assert expand_tasks("easyvqa  mme, mme") == ["easyvqa", "mme"]
    with pytest.raises(ValueError, match="--tasks"):
        expand_tasks(" , ")


def test_nojudge_alias_has_no_judge_task():
    names = expand_tasks("libmoe12_nojudge")
    assert len(names) == 9 and not set(names) & set(JUDGE_TASKS)
    check_judge_requirements(names, env={})  # no key needed


def test_judge_check_names_tasks_and_missing_variable():
    with pytest.raises(JudgeRequirementError) as info:
        check_judge_requirements(expand_tasks("libmoe12"), env={})
    msg = str(info.value)
    for task in ("hallusion_bench_image", "mathvista_testmini_format", "mmbench_en_dev"):
        assert task in msg
    assert "OPENAI_API_KEY" in msg and "mmbench_en_dev_static" in msg
    assert "pope:" not in msg


def test_judge_check_passes_with_credentials():
    check_judge_requirements(["hallusion_bench_image"], env={"OPENAI_API_KEY": "sk-test"})
    check_judge_requirements(["mathvista_testmini"], env={"API_TYPE": "azure", "AZURE_API_KEY": "k", "AZURE_ENDPOINT": "e"})
    check_judge_requirements(["mathvista_testmini"], env={"API_TYPE": "local"})  # not checkable: trusted
    with pytest.raises(JudgeRequirementError, match="AZURE_ENDPOINT"):
        check_judge_requirements(["mathvista_testmini"], env={"API_TYPE": "azure", "AZURE_API_KEY": "k"})
    check_judge_requirements(["easyvqa", "pope"], env={})
    # lmms-eval compares API_TYPE as it is: "Azure" calls no API and scores every answer "unclear"
    with pytest.raises(JudgeRequirementError, match="API_TYPE='Azure'.*set API_TYPE=azure"):
        check_judge_requirements(["mmbench_en_dev"], env={"API_TYPE": "Azure", "AZURE_API_KEY": "k", "AZURE_ENDPOINT": "e"})
    with pytest.raises(JudgeRequirementError, match="API_TYPE='': .*set API_TYPE=openai or unset it"):  # not "openai"
        check_judge_requirements(["mmbench_en_dev"], env={"API_TYPE": "", "OPENAI_API_KEY": "sk"})


@pytest.mark.parametrize("group", ["mmbench_en", "mmbench", "mathvista", "mathvista_testmini", "public_eval_qwen3_5_family"])
def test_judge_check_sees_the_judge_tasks_of_a_group(group):
    """``--tasks mmbench_en`` (what LibMoE's own script passes) ran without a key and scored wrongly."""
    with pytest.raises(JudgeRequirementError, match=JUDGE_GROUPS[group][0]):
        check_judge_requirements([group], env={})


def _lmms_eval_task_names() -> set[str]:
    """task/group names declared by lmms-eval's installed task YAMLs (read without importing it)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    root = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks"
    names = set()
    for path in root.rglob("*.yaml"):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
        except yaml.YAMLError:
            continue
        if not isinstance(config, dict):
            continue
        for key in ("task", "group"):
            if isinstance(config.get(key), str):
                names.add(config[key])
    return names


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
def test_suite_and_judge_names_exist_in_installed_lmms_eval():
    names = _lmms_eval_task_names()
    missing = [t for t in [*SUITE, *JUDGE_TASKS, "mmbench_en_dev_static"] if t not in names]
    assert not missing
    assert set(TASK_ALIASES["libmoe12"]) == set(SUITE)


@pytest.fixture(scope="module")
def task_manager():
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR")


def _leaves(manager, name: str) -> list[str]:
    """The tasks of an lmms-eval task, group or tag, from its own index and configs."""
    entry = manager.task_index[name]
    if entry["type"] not in ("group", "tag"):
        return [name]
    members = entry["task"] if entry["type"] == "tag" else manager._get_config(name)["task"]
    out = []
    for member in members if isinstance(members, list) else [members]:
        member = member if isinstance(member, str) else member.get("task")
        if member in manager.task_index:
            out += _leaves(manager, member)
    return out


def test_every_suite_task_loads_with_its_scorer(task_manager, monkeypatch):
    """Loading a task imports its scoring code: MathVista's needs Levenshtein (an lmms-eval extra),
    and without it every libmoe12 run stopped at task loading."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-used")  # judge tasks' code makes an API client on import
    for name in SUITE:
        for leaf in _leaves(task_manager, name):
            assert isinstance(task_manager._get_config(leaf), dict), leaf


def test_judge_groups_are_every_group_holding_a_judge_task(task_manager, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-used")
    found, unreadable = {}, {}
    for name, entry in task_manager.task_index.items():
        if entry["type"] not in ("group", "tag"):  # a tag names tasks too (public_eval_qwen3_5_family)
            continue
        try:
            leaves = _leaves(task_manager, name)
        except Exception as err:  # noqa: BLE001 (a scorer needing a package the kit does not install)
            unreadable[name] = repr(err)
            continue
        judged = tuple(dict.fromkeys(leaf for leaf in leaves if leaf in JUDGE_TASKS))
        if judged:
            found[name] = judged
    assert found == JUDGE_GROUPS
    assert not [name for name in unreadable if name.startswith(("mmbench", "mathvista", "hallusion"))], unreadable
