"""What the loop trains on: images (augmented on the fly) or activations cached from frozen blocks.

Small sets are decoded once into memory (the resized uint8 image, before any crop), so an epoch costs only the
augmentation and the network; the decode time is measured and recorded either way. On CUDA the loader pins
memory and keeps its workers alive between epochs; workers fork after the decode, so they share that memory.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from tledge.data.images import Preprocess, Sample, resized_uint8, to_input
from tledge.train.augment import Augment, augmented_input

# Decoded images are kept in memory up to this many bytes (uint8 HWC at the resize size); above it they are
# decoded again every epoch (in the loader's workers).
DECODE_CACHE_BYTES = 2 << 30


class ImageSet:
    """A map-style dataset of ``samples``; item ``(epoch, i)`` is image ``i`` augmented with seed (seed, epoch, i).

    ``aug=None`` gives the eval input (center crop), identical to :func:`tledge.data.images.load_image`.
    """

    def __init__(self, samples: Sequence[Sample], pre: Preprocess, aug: Augment | None, seed: int, cache: bool | None = None, threads: int = 4):
        self.samples, self.pre, self.aug, self.seed = list(samples), pre, aug, seed
        est = len(self.samples) * pre.resize * pre.resize * 3 * 1.2  # non-square images are a bit larger
        self.cached = est <= DECODE_CACHE_BYTES if cache is None else cache
        self.images: list[np.ndarray] | None = None
        self.decode_seconds = 0.0
        if self.cached:
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                self.images = list(pool.map(lambda s: resized_uint8(s.path, pre), self.samples))
            self.decode_seconds = time.perf_counter() - t

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.samples], dtype=np.int64)

    def subset(self, samples: Sequence[Sample]) -> "ImageSet":
        """The same set restricted to ``samples`` (their decoded images shared, not decoded again)."""
        index = {s.path: i for i, s in enumerate(self.samples)}
        sub = ImageSet([], self.pre, self.aug, self.seed, cache=False)
        sub.samples, sub.cached = list(samples), self.cached
        sub.images = [self.images[index[s.path]] for s in samples] if self.images is not None else None
        return sub

    def image(self, i: int) -> np.ndarray:
        return self.images[i] if self.images is not None else resized_uint8(self.samples[i].path, self.pre)

    def view(self, i: int, epoch: int, plain: bool = False) -> np.ndarray:
        """Image ``i``: the eval input if ``plain`` (or without augmentation), else its augmented view of ``epoch``."""
        aug = self.aug
        if plain or aug is None or aug.identity:
            return to_input(self.image(i), self.pre)
        rng = np.random.default_rng((self.seed, epoch, i))  # the same view whatever the worker, run or resume
        return augmented_input(self.image(i), self.pre, aug, rng)

    def __getitem__(self, key):
        import torch

        epoch, i = key if isinstance(key, tuple) else (0, key)
        return torch.from_numpy(self.view(i, epoch)), int(self.samples[i].label)


class EpochSampler:
    """Shuffled indices for one rank, tagged with the epoch: ``(epoch, i)``.

    The shuffle is DistributedSampler's (seeded by seed + epoch, padded so every rank takes as many batches),
    and the epoch travels with each index so augmentation stays seeded in persistent workers too.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        from torch.utils.data.distributed import DistributedSampler

        self.inner = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class TensorSet:
    """Cached activations as a dataset keyed like :class:`ImageSet` (the epoch is ignored)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        return self.x[i], self.y[i]


def make_loader(dataset, batch_size: int, seed: int, device, world, workers: int | None = None, shuffle: bool = True):
    """A DataLoader over ``dataset`` for this rank; returns (loader, sampler). ``workers=None``: 0 for tensors
    and on the CPU (the network is the bottleneck there), else up to 8 (CUDA: decode and augment off the GPU's
    critical path)."""
    import os

    import torch
    from torch.utils.data import DataLoader

    cuda = torch.device(device).type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda and isinstance(dataset, ImageSet) else 0
    sampler = EpochSampler(len(dataset), seed, world.rank, world.size, shuffle)
    # Tensors already in memory batch faster by indexing than by collating one row at a time.
    if isinstance(dataset, TensorSet):
        return _TensorBatches(dataset, sampler, batch_size, pin=cuda), sampler
    loader = DataLoader(dataset, batch_size=max(1, batch_size), sampler=sampler, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    return loader, sampler


class _TensorBatches:
    def __init__(self, data: TensorSet, sampler: EpochSampler, batch_size: int, pin: bool):
        self.data, self.sampler, self.batch_size, self.pin = data, sampler, max(1, batch_size), pin

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        import torch

        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x, y = self.data.x[idx], self.data.y[idx]
            yield (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)
