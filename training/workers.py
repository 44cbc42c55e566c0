"""Patch sources run in worker processes: how a GPU gets fed synthetic data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data


class _PatchStream(torch.utils.data.IterableDataset):
    """Endless batches from one patch source per worker process."""

    def __init__(self, factory: Callable[..., Any], seed: int, batch_size: int):
        self.factory, self.seed, self.batch_size = factory, seed, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        source = self.factory(rng=np.random.default_rng([self.seed, info.id if info else 0]))
        while True:
            yield source.sample(self.batch_size)


class WorkerPatches:
    """A patch source run in ``workers`` processes (a torch ``DataLoader``), for a GPU
    that one core cannot feed (``synthesis.SyntheticPatches``). Each worker has its own
    source, seeded from ``rng`` and its index; a resumed run draws new patches.

    Args:
        factory: ``factory(rng=...)`` -> a source with ``sample(batch_size)`` (picklable,
            e.g. ``functools.partial`` of a class).
        rng: random source of the workers' seeds.
        batch_size: patches per :meth:`sample` (the training batch).
        workers: processes.
    """

    def __init__(self, factory, rng: np.random.Generator, batch_size: int, workers: int):
        self.batch_size = int(batch_size)
        stream = _PatchStream(factory, int(rng.integers(2**62)), self.batch_size)
        self.loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=int(workers), prefetch_factor=4,
            persistent_workers=True,
        )  # fmt: skip
        self._batches = iter(self.loader)

    def sample(self, batch_size: int) -> tuple[np.ndarray, ...]:
        """``(image, labels, weight)`` as the source gives them; ``batch_size`` must be the
        one given."""
        if int(batch_size) != self.batch_size:
            raise ValueError(f"batch size {batch_size} != the workers' {self.batch_size}")
        return tuple(np.asarray(a) for a in next(self._batches))
