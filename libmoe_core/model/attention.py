"""Choose the attention implementation: flash_attention_2 > sdpa > eager."""

from __future__ import annotations

import importlib.util

import torch

ATTN_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere (sm_80) and newer only


def cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability (major, minor); None without CUDA."""
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def flash_attn_available() -> bool:
    """flash-attn is installed and the CUDA GPU can run it (compute capability >= 8.0: a V100 or T4
    failed at the first forward)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    capability = cuda_capability()
    return capability is not None and capability >= FLASH_ATTN_MIN_CAPABILITY


def sdpa_available() -> bool:
    return hasattr(torch.nn.functional, "scaled_dot_product_attention")


def resolve_attn_implementation(requested: str | None = None, dtype: torch.dtype | None = None) -> str:
    """``None``/``"auto"``: the best available for a model in ``dtype`` (flash-attn runs fp16/bf16
    only, on GPUs of compute capability >= 8.0, so an fp32 model or an older GPU gets sdpa; None:
    not known, as for a model cast to bf16 later). An explicit choice is honoured or refused clearly."""
    if requested in (None, "auto"):
        if flash_attn_available() and dtype in (None, torch.float16, torch.bfloat16):
            return "flash_attention_2"
        return "sdpa" if sdpa_available() else "eager"
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package "
                             "(pip install flash-attn), which is not installed; use 'sdpa' or 'eager'")
        capability = cuda_capability()
        if capability is None:
            raise ValueError("attn_implementation='flash_attention_2' needs a CUDA GPU, and none is available; "
                             "use 'sdpa' or 'eager'")
        if capability < FLASH_ATTN_MIN_CAPABILITY:
            need = ".".join(map(str, FLASH_ATTN_MIN_CAPABILITY))
            raise ValueError(f"attn_implementation='flash_attention_2' needs a GPU of compute capability >= {need} "
                             f"(Ampere or newer); this GPU's is {capability[0]}.{capability[1]}; use 'sdpa' or 'eager'")
        return requested
    if requested == "sdpa":
        if not sdpa_available():
            raise ValueError("attn_implementation='sdpa' needs torch.nn.functional.scaled_dot_product_attention "
                             f"(torch >= 2.0); this torch is {torch.__version__}; use 'eager'")
        return requested
    if requested == "eager":
        return requested
    raise ValueError(f"unknown attn_implementation {requested!r}; choose one of {ATTN_IMPLEMENTATIONS} or 'auto'")
