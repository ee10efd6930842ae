"""libmoe-kit: a notebook-first research kit for Mixture-of-Experts vision-language models."""

__version__ = "0.1.0"

from . import model  # noqa: F401  (registers libmoe_vlm with AutoConfig / AutoModelForCausalLM)
from .moe import ROUTERS, MoELayer, build_moe, register_router  # noqa: F401
