"""The vision tower: any transformers vision model cut after its feature layer.

Features are the selected layer's hidden states (no final norm, no pooling head),
CLIP's CLS token dropped (LLaVA's ``patch`` selection), optionally S^2 multi-scale
(LibMoE ``scales``) and average-pooled to fewer tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel


def truncate_vision_config(vision_config, kept_layers: int):
    """A copy of ``vision_config`` that builds only ``kept_layers`` encoder layers and no head."""
    cfg = copy.deepcopy(vision_config)
    cfg.num_hidden_layers = kept_layers
    if hasattr(cfg, "vision_use_head"):
        cfg.vision_use_head = False
    return cfg


def strip_vision_model(model: nn.Module, kept_layers: int) -> nn.Module:
    """Delete encoder layers past ``kept_layers``, the final norm and any pooling head (in place)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "layers"):
        raise TypeError(f"{type(model).__name__} has no encoder.layers; expected a SigLIP/CLIP-style vision model")
    del encoder.layers[kept_layers:]
    if hasattr(model, "post_layernorm"):
        model.post_layernorm = nn.Identity()
    if getattr(model, "head", None) is not None:
        del model.head
        model.use_head = False
    return model


def split_tiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, C, nH, nW] -> [n*n*B, C, H, W], tile-major (all images' tile 0 first)."""
    h, w = x.shape[-2] // n, x.shape[-1] // n
    return torch.cat([x[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)], dim=0)


def merge_tiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`split_tiles`: [n*n*B, C, H, W] -> [B, C, nH, nW]."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


class VisionTower(nn.Module):
    """``model``: the HF vision model (cut); ``forward(pixel_values [N,3,H,W]) -> [N, T, C*len(scales)]``."""

    def __init__(self, vision_config, kept_layers: int, scales=(1,), pool: int = 1, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            model = AutoModel.from_config(truncate_vision_config(vision_config, kept_layers))
        self.model = strip_vision_model(model, kept_layers)
        self.grid = vision_config.image_size // vision_config.patch_size
        self.num_prefix_tokens = 1 if hasattr(self.model.embeddings, "class_embedding") else 0
        self.scales = [int(s) for s in scales]
        self.pool = int(pool)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> patch features [B, grid*grid, C] of the selected layer."""
        out = self.model(pixel_values=pixel_values.to(self.model.dtype))
        return out.last_hidden_state[:, self.num_prefix_tokens:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixel_values.shape
        batches = [pixel_values]
        for s in self.scales[1:]:
            big = F.interpolate(pixel_values.float(), size=(h * s, w * s), mode="bicubic", align_corners=False)
            batches.append(split_tiles(big.to(pixel_values.dtype), s))
        # One tower call for the image and all its tiles: one routing record, one aux loss.
        feats = self.encode(torch.cat(batches, dim=0))  # [N * (1 + sum s^2), g*g, C]
        g, c = self.grid, feats.shape[-1]
        per_scale, start = [feats[:n]], n
        for s in self.scales[1:]:
            tiles = feats[start:start + s * s * n]
            start += s * s * n
            grid = tiles.transpose(1, 2).reshape(s * s * n, c, g, g)
            merged = merge_tiles(grid, s)  # [N, C, g*s, g*s]
            pooled = F.interpolate(merged.float(), size=(g, g), mode="area").to(feats.dtype)
            per_scale.append(pooled.flatten(2).transpose(1, 2))
        x = torch.cat(per_scale, dim=-1)  # [N, g*g, C*len(scales)]
        if self.pool > 1:
            grid = x.transpose(1, 2).reshape(n, x.shape[-1], g, g)
            x = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # [N, (g/pool)^2, C']
        return x
