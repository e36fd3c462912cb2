"""Training data order: a deterministic stream of packed examples, split into per-process micro-batches by step.

The stream visits the images epoch after epoch, each epoch in its own permutation drawn from (seed, epoch); the
example at stream position p is image order_e[p mod N] with queries (and protocol sparsity) drawn from (seed, p).
Micro-batch j of the run covers positions [j G, (j + 1) G) with G = batch_size x processes; process r takes the
r-th slice of batch_size. Hence:
- the data of optimiser step s is a pure function of (seed, s): resuming at step s needs no replay of the loader;
- N processes with batch_size b see exactly the images and queries of one process with batch_size N b.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from vlm_depth.data.sample import RGBDSample
from vlm_depth.data.sparsify import image_seed
from vlm_depth.train.collator import Batch, ExampleBuilder


class PackedQueryStream(torch.utils.data.Dataset):
    """Stream position -> packed example (see the module docstring). `images`: an indexable dataset of
    `RGBDSample`; `cache_images` keeps read samples in memory (for small or slow-to-generate datasets)."""

    def __init__(
        self, images: Sequence[RGBDSample], builder: ExampleBuilder, seed: int, cache_images: bool = False
    ) -> None:
        if len(images) == 0:
            raise ValueError("no training images")
        self.images = images
        self.builder = builder
        self.seed = seed
        self.cache: dict[int, RGBDSample] | None = {} if cache_images else None
        self._orders: dict[int, np.ndarray] = {}

    def image_index(self, position: int) -> int:
        """Index into `images` of stream position `position`."""
        epoch, offset = divmod(position, len(self.images))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.images))}
        return int(self._orders[epoch][offset])

    def sample(self, index: int) -> RGBDSample:
        if self.cache is None:
            return self.images[index]
        if index not in self.cache:
            self.cache[index] = self.images[index]
        return self.cache[index]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> Batch:
        rng = np.random.default_rng([self.seed, position, 1])
        return self.builder(self.sample(self.image_index(position)), rng, image_seed(self.seed, position, 2))


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Stream positions of this process's micro-batches for optimiser steps [start_step, max_steps)."""

    def __init__(
        self, batch_size: int, grad_accum: int, start_step: int, max_steps: int, rank: int = 0, world: int = 1
    ) -> None:
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.start_step, self.max_steps = start_step, max_steps
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(self.max_steps - self.start_step, 0) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        per_global = self.batch_size * self.world
        for micro in range(self.start_step * self.grad_accum, self.max_steps * self.grad_accum):
            first = micro * per_global + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))
