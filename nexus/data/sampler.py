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


class CurriculumSampler(ResumableShuffleSampler):
    """Endless, resumable stream of indices drawn from a pool that a curriculum changes during training.

    ``set_pool(indices, weights=None)`` takes effect from the next index drawn: the stream then runs through
    passes of ``len(indices)`` draws, each pass a fresh permutation of the pool (or, with ``weights``, draws
    with replacement in proportion to them), seeded by (seed, pool number, pass). So the index at each
    position of the stream is fixed by the pool changes before it, and ``state_dict(consumed)`` (position plus
    the pools from there on) lets a resumed run draw exactly what the uninterrupted run drew, also when a
    loader had prefetched indices past ``consumed`` when the pool changed.

    Data parallel as ``ResumableShuffleSampler``: one global stream, each rank its ``batch_size`` of every
    global batch (the curriculum must change the pool identically on every rank).

    Example::
        sampler = CurriculumSampler(len(dataset), indices=easy_indices)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        sampler.set_pool(torch.arange(len(dataset)))      # from now on, everything
    """

    def __init__(self, n: int, *, indices=None, weights=None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        super().__init__(n, seed=seed, shuffle=True, rank=rank, world_size=world_size, batch_size=batch_size)
        self.segments: list[dict] = []  # {"id", "start", "indices", "weights"}, in stream order
        self._next = 0  # the stream position the live iterator draws next (ahead of use when a loader prefetches)
        self.set_pool(torch.arange(n) if indices is None else indices, weights)

    def _check_pool(self, indices, weights) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("the curriculum pool is empty: it must hold at least one sample index")
        if indices.min() < 0 or indices.max() >= self.n:
            raise ValueError(f"pool indices must be in [0, {self.n}), got min {int(indices.min())}, "
                             f"max {int(indices.max())}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if weights.shape != indices.shape or not bool((weights >= 0).all()) or not weights.sum() > 0:
                raise ValueError(f"weights must be {indices.numel()} non-negative values, not all zero, one per "
                                 f"pool index; got shape {tuple(weights.shape)}")
        return indices, weights

    def set_pool(self, indices, weights=None) -> None:
        """Draw from ``indices`` (sample ids) from the next position on, uniformly or in proportion to ``weights``."""
        indices, weights = self._check_pool(indices, weights)
        start = max(self._next, self.segments[-1]["start"]) if self.segments else self._next
        if self.segments and self.segments[-1]["start"] == start:  # nothing was drawn from the previous pool
            self.segments.pop()
        next_id = self.segments[-1]["id"] + 1 if self.segments else 0
        self.segments.append({"id": next_id, "start": start, "indices": indices, "weights": weights})

    @property
    def pool(self) -> torch.Tensor:
        """The sample ids of the newest pool."""
        return self.segments[-1]["indices"]

    def _segment_at(self, position: int) -> int:
        k = 0
        while k + 1 < len(self.segments) and self.segments[k + 1]["start"] <= position:
            k += 1
        return k

    def _pass(self, segment: dict, number: int) -> torch.Tensor:
        seed = ((self.seed * 1_000_003 + segment["id"]) * 1_000_003 + number) % 2**63
        g = torch.Generator().manual_seed(seed)
        indices, weights = segment["indices"], segment["weights"]
        if weights is None:
            return indices[torch.randperm(len(indices), generator=g)]
        return indices[torch.multinomial(weights, len(indices), replacement=True, generator=g)]

    def _stream(self):
        p = self.position
        self._next = p
        cached, order = None, None
        while True:
            segment = self.segments[self._segment_at(p)]
            number, offset = divmod(p - segment["start"], len(segment["indices"]))
            if cached != (segment["id"], number):
                cached, order = (segment["id"], number), self._pass(segment, number).tolist()
            p += 1
            self._next = p
            yield order[offset]

    def state_dict(self, consumed: int | None = None) -> dict:
        """Seed, position and the pools in effect from there on."""
        position = self.position if consumed is None else consumed
        first = self._segment_at(position)
        return {"seed": self.seed, "position": position,
                "segments": [dict(s) for s in self.segments[first:]]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "segments" in state:
            self.segments = [dict(s) for s in state["segments"]]
        self._next = max(self.position, self.segments[-1]["start"])
