"""Modality-length grouped sampling (image and text-only samples in separate mega-batches)."""

from __future__ import annotations

import functools
import operator

import torch
from torch.utils.data import Sampler


def modality_megabatches(modality_lengths: list[int], megabatch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle each modality, cut it into mega-batches sorted by length (longest first),
    shuffle the full mega-batches of both modalities together and put the two partial
    remainders last (the only place where the modalities can meet).

    ``modality_lengths``: positive for samples with images, negative for text-only ones.
    """
    if any(n == 0 for n in modality_lengths):
        raise ValueError("modality lengths must be non-zero (positive: image, negative: text-only)")
    full, tail = [], []
    for keep in (lambda n: n > 0, lambda n: n < 0):
        group = [i for i, n in enumerate(modality_lengths) if keep(n)]
        order = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        for s in range(0, len(order), megabatch_size):
            mb = sorted(order[s:s + megabatch_size], key=lambda i: -abs(modality_lengths[i]))
            (full if len(mb) == megabatch_size else tail).append(mb)
    full = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()]
    return full + ([functools.reduce(operator.iadd, tail, [])] if tail else [])


class ModalityLengthGroupedSampler(Sampler[int]):
    """Index sampler for ``DataLoader(batch_size=batch_size)``; mega-batches hold
    ``batch_size * world_size`` samples. Deterministic for a given ``seed`` and epoch."""

    def __init__(self, modality_lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0):
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        self.modality_lengths = list(modality_lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def megabatches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return modality_megabatches(self.modality_lengths, self.batch_size * self.world_size, g)

    def __iter__(self):
        return iter([i for mb in self.megabatches() for i in mb])

    def __len__(self) -> int:
        return len(self.modality_lengths)
