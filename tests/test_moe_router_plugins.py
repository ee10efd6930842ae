"""Routers from outside the kit: entry points and $LIBMOE_ROUTER_MODULES, in fresh processes
(as a DeepSpeed worker or lmms-eval would be), without touching this process's registry."""

import os
import subprocess
import sys

ROUTER_MODULE = '''
from libmoe_core.moe import register_router
from libmoe_core.moe.routers import SMoERouter


@register_router("{name}")
class PluginRouter(SMoERouter):
    """A user's router living in a package of their own."""
'''

LOOKUP = """
import sys
from libmoe_core.moe import get_router_class, build_moe
import torch
from torch import nn
cls = get_router_class(sys.argv[1])
moe = build_moe(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), sys.argv[1], num_experts=4, top_k=2)
print(cls.__module__, type(moe.router).__name__)
"""


def run_python(code, *args, path, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "LIBMOE_ROUTER_MODULES"}
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)


def test_router_module_named_in_the_environment(tmp_path):
    (tmp_path / "my_routers.py").write_text(ROUTER_MODULE.format(name="env_plugin"))
    proc = run_python(LOOKUP, "env_plugin", path=tmp_path, env_extra={"LIBMOE_ROUTER_MODULES": "my_routers"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["my_routers", "PluginRouter"]
    # without the variable the name is unknown, and the error lists the known routers
    proc = run_python(LOOKUP, "env_plugin", path=tmp_path)
    assert proc.returncode != 0 and "unknown router 'env_plugin'" in proc.stderr and "smoe" in proc.stderr


def test_router_from_an_installed_packages_entry_point(tmp_path):
    (tmp_path / "toy_router_pkg.py").write_text(ROUTER_MODULE.format(name="entry_point_plugin"))
    dist = tmp_path / "toy_router_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-router-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[libmoe.routers]\ntoy = toy_router_pkg\n")
    proc = run_python(LOOKUP, "entry_point_plugin", path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["toy_router_pkg", "PluginRouter"]
    listed = subprocess.run([sys.executable, "-m", "libmoe_core.cli", "routers"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, check=True)
    assert "entry_point_plugin" in listed.stdout


def test_a_broken_router_module_is_named(tmp_path):
    (tmp_path / "broken_routers.py").write_text("raise RuntimeError('typo in my router')\n")
    proc = run_python(LOOKUP, "whatever", path=tmp_path, env_extra={"LIBMOE_ROUTER_MODULES": "broken_routers"})
    assert proc.returncode != 0
    assert "router module 'broken_routers' (from $LIBMOE_ROUTER_MODULES) failed to import" in proc.stderr
    assert "typo in my router" in proc.stderr
    # the CLI says it in one line (it printed a chained traceback of 25-30 lines)
    cli = subprocess.run([sys.executable, "-m", "libmoe_core.cli", "routers"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "LIBMOE_ROUTER_MODULES": "broken_routers"},
                         check=False)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [("libmoe routers: error: router module 'broken_routers' "
                                               "(from $LIBMOE_ROUTER_MODULES) failed to import: typo in my router")]


def test_routers_lists_a_plugin_without_a_docstring(tmp_path):
    # `libmoe routers` took each class's first docstring line and crashed (IndexError) without one
    (tmp_path / "bare_routers.py").write_text(ROUTER_MODULE.format(name="bare_plugin").replace(
        '    """A user\'s router living in a package of their own."""', "    pass"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "LIBMOE_ROUTER_MODULES": "bare_routers"}
    listed = subprocess.run([sys.executable, "-m", "libmoe_core.cli", "routers"], capture_output=True, text=True,
                            env=env, check=False)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert any(line.split()[0] == "bare_plugin" for line in listed.stdout.splitlines() if line.strip())
    assert any(line.startswith("smoe") for line in listed.stdout.splitlines())
