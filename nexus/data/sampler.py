"""A shuffling sampler whose position can be saved and restored, for exact resumption."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Endless stream of indices: a fresh permutation of ``range(n)`` per epoch, seeded by ``seed + epoch``.

    ``load_state_dict({"seed": s, "position": k})`` makes the next iterator start at the k-th index of the stream, so a run that
    stopped after consuming k samples continues with exactly the samples an uninterrupted run would see.

    Data parallel: with ``world_size`` ranks each global batch of ``batch_size * world_size`` indices of
    the one stream is split, rank ``rank`` taking the ``rank``-th ``batch_size`` of them, so the ranks see
    disjoint data, together exactly what one process would, and ``position`` counts the global stream
    (a run resumed at another world size, with the same global batch, continues the same stream).

    Example::
        sampler = ResumableShuffleSampler(len(dataset), seed=0)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        if n <= 0:
            raise ValueError(f"the dataset is empty (n={n}): nothing to sample")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1, got rank={rank}, "
                             f"world_size={world_size}, batch_size={batch_size}")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def state_dict(self, consumed: int | None = None) -> dict:
        """Seed and position; pass ``consumed`` (samples actually used) when a loader prefetches."""
        return {"seed": self.seed, "position": self.position if consumed is None else consumed}

    def load_state_dict(self, state: dict) -> None:
        if state["position"] < 0:
            raise ValueError(f"position must be >= 0, got {state['position']}")
        self.seed = state["seed"]
        self.position = state["position"]

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def _stream(self):
        epoch, offset = divmod(self.position, self.n)
        while True:
            yield from self._order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self):
        if self.world_size == 1:
            yield from self._stream()
            return
        stream, chunk = self._stream(), self.batch_size * self.world_size
        start = self.rank * self.batch_size
        while True:
            batch = [next(stream) for _ in range(chunk)]
            yield from batch[start: start + self.batch_size]


class ShardedSequentialSampler(Sampler[int]):
    """``range(n)`` in order, cut into global batches of ``batch_size * world_size``; rank ``rank`` takes
    its ``batch_size`` of each. A last partial global batch is dropped, so every rank runs the same
    number of batches (a sharded model needs all ranks in every forward) at any world size.

    Example::
        loader = DataLoader(val, batch_size=4, sampler=ShardedSequentialSampler(len(val), rank=1, world_size=2, batch_size=4))
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1, got rank={rank}, "
                             f"world_size={world_size}, batch_size={batch_size}")
        self.n, self.rank, self.world_size, self.batch_size = n, rank, world_size, batch_size

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size) * self.batch_size

    def __iter__(self):
        chunk = self.batch_size * self.world_size
        for start in range(0, self.n // chunk * chunk, chunk):
            first = start + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)
