"""The MoE vision-language model: config, towers, projector, placements, processor, presets.

Importing this package registers ``libmoe_vlm`` with ``AutoConfig`` and
``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import ATTN_IMPLEMENTATIONS, resolve_attn_implementation
from .config import PLACEMENTS, PROJECTOR_TYPES, LibMoEVLMConfig
from .modeling import ImageTokenMismatchError, LibMoEVLMForCausalLM, LibMoEVLMOutput
from .placement import LAYER_SHORTCUTS, normalize_placement, placed_moe_layers, resolve_layers

AutoConfig.register(LibMoEVLMConfig.model_type, LibMoEVLMConfig, exist_ok=True)
AutoModelForCausalLM.register(LibMoEVLMConfig, LibMoEVLMForCausalLM, exist_ok=True)

__all__ = [
    "ATTN_IMPLEMENTATIONS", "LAYER_SHORTCUTS", "PLACEMENTS", "PROJECTOR_TYPES", "ImageTokenMismatchError",
    "LibMoEVLMConfig", "LibMoEVLMForCausalLM", "LibMoEVLMOutput", "normalize_placement", "placed_moe_layers",
    "resolve_attn_implementation", "resolve_layers",
]
