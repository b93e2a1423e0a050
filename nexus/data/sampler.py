"""A shuffling sampler whose position can be saved and restored, for exact resumption."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Endless stream of indices: a fresh permutation of ``range(n)`` per epoch, seeded by ``seed + epoch``.

    ``load_state_dict({"seed": s, "position": k})`` makes the next iterator start at the k-th index of the stream, so a run that
    stopped after consuming k samples continues with exactly the samples an uninterrupted run would see.

    Example::
        sampler = ResumableShuffleSampler(len(dataset), seed=0)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError(f"the dataset is empty (n={n}): nothing to sample")
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

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

    def __iter__(self):
        epoch, offset = divmod(self.position, self.n)
        while True:
            yield from self._order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0
