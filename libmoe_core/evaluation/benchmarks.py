"""The LibMoE benchmark suite as lmms-eval 0.7.3 task names, task-list expansion, judge checks.

``libmoe12`` is the twelve benchmarks of the LibMoE seed. Every name below was checked
against lmms-eval 0.7.3's task YAMLs (``lmms_eval/tasks/**``). MathVista is
``mathvista_testmini_format``: ``mathvista_testmini`` is a *group* there of three prompt
variants (``_cot``, ``_solution``, ``_format``) with no combined score, while LibMoE's own
``mathvista_testmini`` is the format-prompt variant alone (its lmms-eval fork's YAML; it
generates up to 1024 tokens where 0.7.3's asks for 16384: pass ``max_new_tokens=1024`` for parity).

Some tasks score answers with a GPT judge through the OpenAI (or Azure) API. lmms-eval
does not stop when the key is missing: it retries every request against the API and
then scores ``0`` or a random option. :func:`check_judge_requirements` catches that up
front.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "JUDGE_GROUPS",
    "JUDGE_TASKS",
    "LIBMOE12",
    "LOCAL_TASKS",
    "TASK_ALIASES",
    "JudgeInfo",
    "JudgeRequirementError",
    "check_judge_requirements",
    "expand_tasks",
    "judge_tasks",
]

#: Seed benchmark -> lmms-eval 0.7.3 task (or group) name, in the LibMoE table order.
LIBMOE12: dict[str, str] = {
    "AI2D": "ai2d",
    "ChartQA": "chartqa",
    "TextVQA (val)": "textvqa_val",
    "GQA (testdev balanced)": "gqa",
    "HallusionBench (image)": "hallusion_bench_image",
    "MathVista (testmini)": "mathvista_testmini_format",
    "MMBench-EN (dev)": "mmbench_en_dev",
    "MME": "mme",
    "MMMU (val)": "mmmu_val",
    "MMStar": "mmstar",
    "POPE": "pope",
    "ScienceQA-IMG": "scienceqa_img",
}

#: Tasks shipped with libmoe-kit (prepared locally, no hub access).
LOCAL_TASKS = ("easyvqa",)


@dataclass(frozen=True)
class JudgeInfo:
    """How a task uses an API judge (read from lmms-eval 0.7.3's task utils)."""

    use: str  # "every sample" or "fallback"
    where: str  # the lmms-eval source that calls the judge
    alternative: str | None = None  # a judge-free lmms-eval task, when there is one


#: Tasks (and groups) of lmms-eval 0.7.3 that call an OpenAI/Azure judge while scoring: the
#: suite's judge tasks and their close variants (lmms-eval has many more judge tasks; this
#: list is not exhaustive).
JUDGE_TASKS: dict[str, JudgeInfo] = {
    "hallusion_bench_image": JudgeInfo("every sample", "tasks/hallusion_bench/utils.py (evaluate_by_chatgpt)"),
    "mathvista_testmini_format": JudgeInfo(
        "fallback", "tasks/mathvista/mathvista_evals.py (GPT extracts the answer unless it is a listed choice or a number)"
    ),
    "mathvista_testmini_cot": JudgeInfo("fallback", "tasks/mathvista/mathvista_evals.py"),
    "mathvista_testmini_solution": JudgeInfo("fallback", "tasks/mathvista/mathvista_evals.py"),
    "mathvista_test": JudgeInfo("fallback", "tasks/mathvista/mathvista_evals.py"),
    "mmbench_en_dev": JudgeInfo(
        "fallback",
        "tasks/mmbench/mmbench_evals.py (GPT extracts the option when the answer letter cannot be parsed)",
        alternative="mmbench_en_dev_static",
    ),
    "mmbench_cn_dev": JudgeInfo("fallback", "tasks/mmbench/mmbench_evals.py"),
    "mmmu_val_reasoning": JudgeInfo("every sample", "tasks/mmmu/utils.py (OpenAIVerifier)"),
}

#: Names that ``--tasks`` expands to several lmms-eval tasks.
TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "libmoe12": tuple(LIBMOE12.values()),
    # the suite without the tasks that need an API judge
    "libmoe12_nojudge": tuple(t for t in LIBMOE12.values() if t not in JUDGE_TASKS),
}

#: lmms-eval 0.7.3 groups and tags -> their judge tasks above (a test checks this against
#: lmms-eval's own task index): ``--tasks mmbench_en`` (LibMoE's own script's name) is the judge
#: task mmbench_en_dev.
JUDGE_GROUPS: dict[str, tuple[str, ...]] = {
    "public_eval_qwen3_5_family": ("hallusion_bench_image", "mathvista_testmini_solution", "mathvista_testmini_cot",
                                   "mathvista_testmini_format", "mmbench_en_dev"),
    "visual_reasoning_collection": ("mathvista_testmini_cot", "mmmu_val_reasoning"),
    "mathvista": ("mathvista_testmini_cot", "mathvista_testmini_solution", "mathvista_testmini_format",
                  "mathvista_test"),
    "mathvista_testmini": ("mathvista_testmini_cot", "mathvista_testmini_solution", "mathvista_testmini_format"),
    "mmbench": ("mmbench_en_dev", "mmbench_cn_dev"),
    "mmbench_cn": ("mmbench_cn_dev",),
    "mmbench_en": ("mmbench_en_dev",),
}

# API_TYPE (lmms-eval's switch) -> the variables its providers read.
_JUDGE_ENV = {
    "openai": ("OPENAI_API_KEY",),
    "azure": ("AZURE_API_KEY", "AZURE_ENDPOINT"),
}


class JudgeRequirementError(RuntimeError):
    """Raised when tasks need an API judge and its credentials are not in the environment."""


def expand_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Split comma/space separated task names, expand aliases (``libmoe12``), drop duplicates.

    >>> expand_tasks("easyvqa,pope libmoe12")[:3]
    ['easyvqa', 'pope', 'ai2d']
    """
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        for name in item.replace(",", " ").split():
            names.extend(TASK_ALIASES.get(name, (name,)))
    seen: set[str] = set()
    out = []
    for name in names:
        if name not in seen:
            seen.add(name)
            out.append(name)
    if not out:
        raise ValueError("no task given: pass --tasks, e.g. --tasks easyvqa or --tasks libmoe12")
    return out


def judge_tasks(tasks: Iterable[str]) -> list[str]:
    """The tasks among ``tasks`` that call an API judge, groups resolved to theirs."""
    out: list[str] = []
    for task in tasks:
        for leaf in JUDGE_GROUPS.get(task, (task,)):
            if leaf in JUDGE_TASKS and leaf not in out:
                out.append(leaf)
    return out


def check_judge_requirements(tasks: Iterable[str], env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`JudgeRequirementError` if a judge task is asked for without judge credentials.

    lmms-eval picks the judge backend with ``API_TYPE`` (default ``openai``: needs
    ``OPENAI_API_KEY``; ``azure``: ``AZURE_API_KEY`` and ``AZURE_ENDPOINT``). Other backends
    (a local judge server, ...) are not checked.
    """
    env = os.environ if env is None else env
    needing = judge_tasks(tasks)
    if not needing:
        return
    api_type = env.get("API_TYPE", "openai")  # as lmms-eval reads it: set but empty is not "openai"
    required = _JUDGE_ENV.get(api_type)
    if required is None and api_type.strip().lower() in (*_JUDGE_ENV, ""):  # lmms-eval compares it as it is
        raise JudgeRequirementError(f"API_TYPE={api_type!r}: lmms-eval's judges know only {sorted(_JUDGE_ENV)}, "
                                    f"exactly so (with {api_type!r} they call no API and score every answer "
                                    f"'unclear'); set API_TYPE={api_type.strip().lower() or 'openai'} or unset it")
    if required is None:
        return
    missing = [var for var in required if not env.get(var)]
    if not missing:
        return
    lines = [
        (
            f"these tasks score answers with a GPT judge (API_TYPE={api_type}) but {', '.join(missing)} "
            "is not set; lmms-eval would not stop but score them wrongly:"
        )
    ]
    for task in needing:
        info = JUDGE_TASKS[task]
        alt = f"; judge-free alternative: {info.alternative}" if info.alternative else ""
        lines.append(f"  {task}: judge on {info.use} ({info.where}){alt}")
    lines.append(
        f"Set {' and '.join(missing)} (and API_TYPE / MODEL_VERSION if needed), or drop these tasks "
        "(--tasks libmoe12_nojudge runs the suite without them)."
    )
    raise JudgeRequirementError("\n".join(lines))
