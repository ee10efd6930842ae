"""``LibMoEVLMConfig``: vision tower + projector + language model + MoE placements."""

from __future__ import annotations

import operator

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
PLACEMENTS = ("vision", "projector", "llm")


def _is_int(value) -> bool:
    """An int-like value (int, numpy integer), not a float."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


class LibMoEVLMConfig(PretrainedConfig):
    """Configuration of :class:`~libmoe_core.model.LibMoEVLMForCausalLM`.

    Fields:
        vision_config: the FULL vision tower config (any transformers vision model; SigLIP
            and CLIP tested). Layers after ``vision_feature_layer`` are not built.
        text_config: the language model config (any ``AutoModelForCausalLM`` family).
        vision_feature_layer: index into the tower's hidden states (0 = embeddings,
            -1 = last layer, -2 = penultimate, LLaVA/LibMoE's default).
        vision_scales: S^2 multi-scale features (LibMoE ``--scales 1,3``): for each scale
            s > 1 the image is upsampled s times, cut into s*s tiles, encoded, merged back
            and area-pooled to the base grid; features are concatenated channel-wise.
        image_pool: average-pool the patch grid by this factor before the projector
            (1 = all patches, as LLaVA/LibMoE; 2 on an 8x8 grid gives 16 image tokens).
        projector_type: ``linear`` or ``mlp2x_gelu``.
        image_token_id: id of the ``<image>`` token in the tokenizer.
        moe: the MoE placements, ``{"vision"|"projector"|"llm": spec}``; each spec holds
            router, num_experts, top_k, layers, balance_coef, z_coef, capacity_factor,
            router_options, seed, noise (see :mod:`libmoe_core.model.placement`). None: dense.
            Specs are checked on construction (unknown fields, layer indices: distinct ints
            in range) and missing fields filled with the defaults, as ``upcycle`` does.
    """

    model_type = "libmoe_vlm"
    sub_configs_defaults = {  # noqa: RUF012 (transformers ClassVar)
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    vision_feature_layer: int = -2
    vision_scales: list[int] | None = None
    image_pool: int = 1
    projector_type: str = "mlp2x_gelu"
    image_token_id: int | None = None
    moe: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_scales is None:
            self.vision_scales = [1]
        scales = self.vision_scales
        if not (isinstance(scales, (list, tuple)) and scales
                and all(not isinstance(s, bool) and _is_int(s) and int(s) >= 1 for s in scales) and int(scales[0]) == 1):
            raise ValueError(f"vision_scales must start with 1 and hold positive integers, got {scales!r}")
        self.vision_scales = [int(s) for s in scales]
        if len(set(self.vision_scales)) != len(self.vision_scales):
            raise ValueError(f"vision_scales must not repeat a scale, got {self.vision_scales}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if isinstance(self.image_pool, bool) or not isinstance(self.image_pool, int) or self.image_pool < 1:
            raise ValueError(f"image_pool must be a positive integer, got {self.image_pool!r}")
        layer = self.vision_feature_layer
        if isinstance(layer, bool) or not _is_int(layer):
            raise ValueError(f"vision_feature_layer must be an integer layer index, got {layer!r}")
        _ = self.kept_vision_layers  # raises for a vision_feature_layer outside the tower
        grid = self.patch_grid
        if grid % self.image_pool:
            raise ValueError(f"image_pool={self.image_pool} must divide the {grid}x{grid} patch grid")
        unknown = sorted(set(self.moe or {}) - set(PLACEMENTS))
        if unknown:
            raise ValueError(f"unknown MoE placement(s) {unknown}; choose from {PLACEMENTS}")
        if self.moe:
            self.moe = self._normalized_moe()

    def _normalized_moe(self) -> dict | None:
        """``moe`` with every spec checked (fields, layer indices in range) and completed with defaults,
        as ``upcycle`` stores them: a spec from a hand-written config or config.json gets the same checks."""
        from .placement import normalize_placement  # placement imports this module

        sizes = {"vision": self.kept_vision_layers, "projector": 1, "llm": self.text_config.num_hidden_layers}
        moe = {p: normalize_placement(spec, p, sizes[p]) for p, spec in self.moe.items()}
        return {p: spec for p, spec in moe.items() if spec is not None} or None

    # ---- derived sizes
    @property
    def patch_grid(self) -> int:
        """Patches per side of the vision tower."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in the language model's sequence."""
        return (self.patch_grid // self.image_pool) ** 2

    @property
    def vision_feature_width(self) -> int:
        """Projector input width: tower hidden size times the number of scales."""
        return self.vision_config.hidden_size * len(self.vision_scales)

    @property
    def kept_vision_layers(self) -> int:
        """Encoder layers computed: those up to ``vision_feature_layer``."""
        total = self.vision_config.num_hidden_layers
        layer = self.vision_feature_layer
        kept = layer if layer >= 0 else total + 1 + layer
        if not 0 <= kept <= total:
            raise ValueError(
                f"vision_feature_layer={layer} is outside the tower's hidden states "
                f"(0..{total} or -{total + 1}..-1)"
            )
        return kept
