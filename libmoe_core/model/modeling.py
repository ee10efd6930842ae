"""``LibMoEVLMForCausalLM``: vision tower -> projector -> language model, with MoE placements.

Image features are written into the positions of the (already expanded) ``<image>``
tokens, HF-LLaVA style, so KV-cache generation and left padding need nothing special.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..tokens import IGNORE_INDEX
from .attention import resolve_attn_implementation
from .config import PLACEMENTS, LibMoEVLMConfig
from .placement import apply_placement, freeze_fixed_router_parts, placed_moe_layers, restore_router_buffers
from .projector import build_projector
from .vision import VisionTower


@dataclass
class LibMoEVLMOutput(CausalLMOutputWithPast):
    """``loss = lm_loss + sum(aux_losses.values())``.

    ``aux_losses``: coefficient-weighted aux losses summed over each placement's layers,
    keyed ``"{placement}/{term}"`` (``vision/balance``, ``vision/z``, ``projector/balance``,
    ``llm/z``, ...). ``aux_terms``: the same terms unweighted, averaged over the layers
    (balance = 1.0 at perfect balance), for logging.
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    aux_losses: dict | None = None
    aux_terms: dict | None = None


class ImageTokenMismatchError(ValueError):
    """The number of ``<image>`` tokens does not match the images given."""


class LibMoEVLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LibMoEVLMConfig
    config: LibMoEVLMConfig
    base_model_prefix = "libmoe_vlm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: LibMoEVLMConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(
            config.vision_config, config.kept_vision_layers, config.vision_scales, config.image_pool
        )
        self.projector = build_projector(config.projector_type, config.vision_feature_width, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        # MoE layers are built after post_init so weight init never touches expert copies or routers.
        for placement in PLACEMENTS:
            spec = (config.moe or {}).get(placement)
            if spec:
                apply_placement(self, placement, spec, noise=False)
        text = config.text_config
        if getattr(text, "pad_token_id", None) is not None:
            self.generation_config.pad_token_id = text.pad_token_id
        if config.image_token_id is not None:
            self.generation_config.suppress_tokens = [config.image_token_id]

    # ---- HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.language_model.set_output_embeddings(new_embeddings)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """The language model's input and output embeddings and its config's ``vocab_size``
        (``config.text_config``), through its own resize."""
        return self.language_model.resize_token_embeddings(*args, **kwargs)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """transformers' checkpointing, non-reentrant by default, where a segment's recompute sees
        the padding masks of its own forward: every forward replaces the MoE layers' ``token_mask``,
        so with two forwards before one backward the first was recomputed with the second's
        (wrong gradients, or a shape error). A ``context_fn`` of your own still applies."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if not options["use_reentrant"]:
            options["context_fn"] = partial(_token_mask_contexts, self, options.get("context_fn"))
        super().activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """transformers' loader, strict by default: a local folder that does not exist, a checkpoint
        of another model type, and weights missing from or extra to the checkpoint's config are
        errors (transformers would warn and fill them with random values)."""
        path = os.fspath(pretrained_model_name_or_path)
        if path.startswith("~"):  # a local folder under a home directory, for the check and the load alike
            path = os.path.expanduser(path)
        if strict:
            _check_checkpoint(path, kwargs)
        # The attention kernel is not saved: the same default as build_model (flash-attn > sdpa > eager);
        # any other value is transformers' to accept or refuse ("paged|sdpa", a per-sub-config dict, ...).
        if kwargs.get("attn_implementation") in (None, "auto"):  # flash-attn only for fp16/bf16
            kwargs["attn_implementation"] = resolve_attn_implementation(None, _load_dtype(path, kwargs))
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        _copy_unaligned_router_tensors(model)
        restore_router_buffers(model)
        freeze_fixed_router_parts(model)  # loading made every parameter trainable
        mismatch = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if strict and any(mismatch.values()):
            details = "; ".join(f"{k}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for k, v in mismatch.items() if v)
            raise ValueError(f"{path}: the saved weights do not fit its config ({details}); "
                             "pass strict=False to load anyway with those weights random")
        return (model, info) if wants_info else model

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and ``num_return_sequences`` repeat every sample ``expand_size`` times; rows
        of ``pixel_values`` are images, not samples, so each sample's block of images is repeated
        (transformers' row-wise repeat gave a two-image sample's copies images (0, 0) and (1, 1))."""
        pixel_values = model_kwargs.pop("pixel_values", None)  # [N_images, 3, H, W]
        if expand_size > 1 and pixel_values is not None and input_ids is not None:
            mask = self.image_token_mask(input_ids, pixel_values.shape[0], model_kwargs.get("image_counts"))
            per_sample = (mask.sum(-1) // self.num_image_tokens).tolist()  # [B] images of each sample
            blocks = torch.split(pixel_values, per_sample)
            pixel_values = torch.cat([block for block in blocks for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    # ---- images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, H, W] -> projected image tokens [N, num_image_tokens, d_text]."""
        feats = self.vision_tower(pixel_values)  # [N, T, C * scales]
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(feats.to(proj_dtype))

    def _runs_dummy_image(self) -> bool:
        """Whether a training forward without images runs the image path on a dummy image: when the
        forward is differentiated and the vision tower or projector has a parameter that trains, or
        one that DeepSpeed ZeRO-3 partitions (``ds_id``: gathered collectively in forward even when
        frozen). Not in eval or under no_grad (generation, evaluation, routing traces)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        params = chain(self.vision_tower.parameters(), self.projector.parameters())
        return any(p.requires_grad or hasattr(p, "ds_id") for p in params)

    def _dummy_image_zero(self, moe, like: torch.Tensor) -> torch.Tensor:
        """A scalar exactly 0 (``like``'s dtype) in the autograd graph of one all-zeros image encoded
        by the vision tower and projector, for a training batch without images.

        Every rank of a multi-process run then runs the same modules (ZeRO-3 parameter gathers) and
        gives every trainable vision and projector parameter a gradient, zero here (DDP / ZeRO-2
        reductions), as LLaVA-NeXT and Qwen-VL do; a rank that skipped them desynchronised the
        collectives (gloo aborts, NCCL hangs). The image is routed like a real one (so the vision and
        projector MoE layers run their routers and experts as on every other rank), but it counts
        nowhere: those layers' ``last_routing`` is reset to None, so no aux loss, aux term, routing
        check or trace after the forward sees it, and their routers' buffers (auxfree's
        ``load_counts``) are put back as they were. The 0 is the sum of an empty slice, never NaN,
        and its backward gives the image embeddings an all-zero gradient."""
        vision = self.config.vision_config
        size = vision.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        pixels = torch.zeros(1, getattr(vision, "num_channels", 3), *size, dtype=self.vision_tower.model.dtype,
                             device=like.device)  # [1, C, H, W]
        layers = [layer for placement, _, layer in moe if placement != "llm"]
        saved = [(buf, buf.clone()) for layer in layers for buf in layer.router.buffers()]
        try:
            image_embeds = self.encode_images(pixels)  # [1, T, d]
        finally:
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)
            for layer in layers:
                layer.last_routing = None
        return image_embeds.reshape(-1)[:0].sum().to(like.dtype)

    def image_token_mask(self, input_ids: torch.Tensor, num_images: int, image_counts=None) -> torch.Tensor:
        """[B, L] bool mask of image positions; raises when it does not match the images."""
        token_id = self.config.image_token_id
        if token_id is None:
            raise ValueError("config.image_token_id is not set; the model cannot place image features")
        t = self.num_image_tokens
        mask = input_ids == token_id
        per_row = mask.sum(-1)  # [B]
        found = int(per_row.sum())
        if found != num_images * t:
            raise ImageTokenMismatchError(
                f"found {found} image tokens (id {token_id}) for {num_images} image(s) x {t} tokens = {num_images * t}; "
                f"each <image> placeholder must be expanded to {t} tokens and there must be one image per placeholder"
            )
        if image_counts is not None:
            expected = torch.as_tensor(image_counts, device=per_row.device).reshape(-1) * t
            if expected.shape != per_row.shape or not torch.equal(expected, per_row):
                raise ImageTokenMismatchError(
                    f"image tokens per sample {per_row.tolist()} != image_counts x {t} = {expected.tolist()}"
                )
        elif bool((per_row % t).any()):
            raise ImageTokenMismatchError(f"image tokens per sample {per_row.tolist()} are not multiples of {t}")
        return mask

    # ---- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # [B, L] with <image> tokens already expanded
        pixel_values: torch.Tensor | None = None,  # [N_images, 3, H, W], images in sample order
        attention_mask: torch.Tensor | None = None,  # [B, L_past + L]
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # [B, L], -100 = ignored
        image_counts: torch.Tensor | None = None,  # [B] images per sample (optional check)
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LibMoEVLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        decoding = cache is not None and cache.get_seq_length() > 0
        moe = placed_moe_layers(self)
        self._moe_layers_in_forward = [layer for _, _, layer in moe]  # for the checkpoint context_fn (no re-walk)
        llm_mask = real_token_mask(attention_mask, (input_ids if inputs_embeds is None else inputs_embeds).shape[1])
        for placement, _, layer in moe:
            layer.last_routing = None  # a placement that does not run (no images) reports nothing stale
            layer.token_mask = llm_mask if placement == "llm" else None  # padding is not routed
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, L, d]
            if pixel_values is not None:
                mask = self.image_token_mask(input_ids, pixel_values.shape[0], image_counts)
                image_embeds = self.encode_images(pixel_values)  # [N, T, d]
                inputs_embeds = inputs_embeds.masked_scatter(
                    mask.unsqueeze(-1), image_embeds.reshape(-1, image_embeds.shape[-1]).to(inputs_embeds.dtype)
                )
            elif not decoding and self.config.image_token_id is not None:
                self.image_token_mask(input_ids, 0, image_counts)  # image tokens without images: error
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (to find the <image> positions), not inputs_embeds")
        if pixel_values is None and self._runs_dummy_image():
            inputs_embeds = inputs_embeds + self._dummy_image_zero(moe, inputs_embeds)  # + exactly 0
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("logits_to_keep must be 0 when labels are given")
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        logits = out.logits  # [B, L', V]
        aux_loss, aux_losses, aux_terms = self.aux_losses(moe)
        if self.training and torch.is_grad_enabled():
            _check_aux_gradients(moe)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss if aux_loss is None else lm_loss + aux_loss
        return LibMoEVLMOutput(
            loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions,
            lm_loss=lm_loss, aux_loss=aux_loss, aux_losses=aux_losses, aux_terms=aux_terms,
        )

    def aux_losses(self, moe=None):
        """(total, weighted per placement/term, unweighted mean per placement/term) of the last forward."""
        weighted: dict[str, torch.Tensor] = {}
        sums: dict[str, list[torch.Tensor]] = {}
        for placement, _, layer in placed_moe_layers(self) if moe is None else moe:
            routing = layer.last_routing
            if routing is None:
                continue
            coefs = layer.router.coefs
            for term, value in routing.aux_terms.items():
                key = f"{placement}/{term}"
                coef = coefs[term]  # every term has one (Router.forward checks)
                contribution = coef * value if coef != 0 else torch.zeros_like(value)  # 0 * inf would be NaN
                weighted[key] = weighted[key] + contribution if key in weighted else contribution
                sums.setdefault(key, []).append(value.detach())
        if not weighted:
            return None, {}, {}
        total = torch.stack([v.float() for v in weighted.values()]).sum()
        terms = {k: torch.stack(v).float().mean() for k, v in sums.items()}
        return total, weighted, terms


_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def _copy_unaligned_router_tensors(model: nn.Module) -> None:
    """Copy the routers' CPU parameters and buffers that start off a 64-byte boundary into fresh memory.

    A safetensors load leaves CPU weights as views into the memory-mapped file at arbitrary
    offsets; BLAS's one-row (GEMV) kernels then sum in another order. The hyper router's gate is
    such a product of its own weights, so a reloaded model's routing differed on every input.
    Copied, a router computes what the saved one did from the same input. Router weights are
    small; the other weights stay shared with the file (copying them all doubled a large fp32
    load's memory), so a one-token forward (decoding) can still differ by ~1e-6."""
    with torch.no_grad():
        for _, _, layer in placed_moe_layers(model):
            for tensor in (*layer.router.parameters(), *layer.router.buffers()):
                if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
                    tensor.data = tensor.data.clone()


def _check_aux_gradients(moe) -> None:
    """An error when an MoE layer whose router trains routed tokens without grad, so its aux loss
    carries no gradient: reentrant gradient checkpointing runs the checkpointed layers that way
    (checked per layer: a projector MoE outside the checkpointed LLM layers keeps the total's)."""
    for placement, index, layer in moe:
        routing = layer.last_routing
        if routing is None or not routing.aux_terms or routing.aux_loss.requires_grad:
            continue  # not run, no aux loss, or it has its gradient
        if not any(layer.router.coefs[term] for term in routing.aux_terms):
            continue  # every coefficient 0: the aux loss is a constant 0, nothing for it to train
        if not bool((routing.experts >= 0).any()):
            continue  # routed no token (all padding)
        if any(p.requires_grad for p in layer.router.parameters()):
            raise RuntimeError(
                f"the aux loss of the {placement} MoE layer {index} carries no gradient although its router "
                "trains: the layer ran without grad, as reentrant gradient checkpointing does; use "
                "gradient_checkpointing_kwargs={'use_reentrant': False}"
            )


def _token_mask_contexts(model, user_context_fn=None):
    """``torch.utils.checkpoint`` context_fn: (forward context, recompute context); the recompute
    runs with the MoE layers' token masks as they were when this segment ran forward, and leaves
    their ``last_routing`` as the latest forward reported it (not the recomputed segment's: an
    earlier forward's, or the dummy image's of a batch without images)."""
    forward_ctx, recompute_ctx = user_context_fn() if user_context_fn else (nullcontext(), nullcontext())
    layers = getattr(model, "_moe_layers_in_forward", None)  # set by this forward: no module walk per segment
    if layers is None:
        layers = [layer for _, _, layer in placed_moe_layers(model)]
    masks = {layer: layer.token_mask for layer in layers}

    @contextmanager
    def with_forward_masks():
        current = {layer: (layer.token_mask, layer.last_routing) for layer in masks}
        with ExitStack() as stack:
            stack.enter_context(recompute_ctx)
            for layer, mask in masks.items():
                layer.token_mask = mask
            try:
                yield
            finally:
                for layer, (mask, routing) in current.items():
                    layer.token_mask = mask
                    layer.last_routing = routing

    return forward_ctx, with_forward_masks()


def _hub_options(kwargs: dict) -> dict:
    """The ``from_pretrained`` options that say where a config is read from."""
    return {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}


def _load_dtype(path: str, kwargs: dict) -> torch.dtype | None:
    """The dtype ``from_pretrained`` loads in: the ``dtype`` asked (else the older ``torch_dtype``,
    which transformers still takes when ``dtype`` is not given), or for transformers' default
    ``"auto"`` the checkpoint's own (its config's); None where it cannot be told."""
    dtype = kwargs.get("dtype")
    if dtype is None:
        dtype = kwargs.get("torch_dtype")
    if dtype is None:
        dtype = "auto"
    if dtype == "auto":
        try:
            config = PretrainedConfig.get_config_dict(path, **_hub_options(kwargs))[0]
        except (OSError, ValueError):
            return None
        dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_checkpoint(path: str, kwargs: dict) -> None:
    """A local checkpoint folder exists, and its config is a libmoe_vlm one (``path``: ``~`` already expanded)."""
    local = os.path.isabs(path) or path.startswith((".", "~"))  # "~" left: an unknown user's home
    if local and not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if kwargs.get("config") is not None:
        return
    model_type = PretrainedConfig.get_config_dict(path, **_hub_options(kwargs))[0].get("model_type")
    if model_type != LibMoEVLMConfig.model_type:
        raise ValueError(f"{path} holds a {model_type!r} model, not a {LibMoEVLMConfig.model_type!r} checkpoint "
                         "(import real weights with a preset; see build_model)")


def real_token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, L] bool of this call's real (non-padding) tokens from a 2-D ``attention_mask``
    [B, L_past + L]; None when every token is real or the mask is not 2-D (custom 4-D masks)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask[:, -length:].bool()  # [B, L]
    return None if bool(mask.all()) else mask


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over labels != -100; 0 when there are none."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(L-1), V]
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # [B*(L-1)]
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
