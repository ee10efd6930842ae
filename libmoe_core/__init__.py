"""libmoe-kit: a notebook-first research kit for Mixture-of-Experts vision-language models."""

__version__ = "0.1.0"


def _check_torchvision() -> None:
    """Fail clearly when an installed torchvision cannot be imported (e.g. PyPI's wheel next to another torch
    build): transformers would then break with an error that does not name it. The kit does not need torchvision."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as err:
        try:
            import torch

            torch_version = torch.__version__
        except (ImportError, OSError, RuntimeError) as torch_err:
            torch_version = f"(torch does not import either: {type(torch_err).__name__}: {torch_err})"
        raise ImportError(
            f"libmoe-kit: torchvision is installed but does not import next to torch {torch_version} "
            f"({type(err).__name__}: {err}); transformers fails to import while it is there. libmoe-kit does not "
            "need torchvision: remove it (`pip uninstall torchvision`) or install the torchvision release built "
            f"for torch {torch_version}") from err


_check_torchvision()

from . import model  # noqa: F401  (registers libmoe_vlm with AutoConfig / AutoModelForCausalLM)
from .moe import ROUTERS, MoELayer, build_moe, register_router  # noqa: F401
