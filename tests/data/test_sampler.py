"""Samplers: the data-parallel split of each global batch, and the sharded validation order."""
import itertools
import multiprocessing

import pytest

from nexus.data.sampler import ResumableShuffleSampler, ShardedSequentialSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_split_each_global_batch_without_overlap_or_loss(world):
    n, local, steps = 23, 2, 9  # 23 windows: global batches straddle epoch ends
    one = take(ResumableShuffleSampler(n, seed=5), local * world * steps)
    ranks = [take(ResumableShuffleSampler(n, seed=5, rank=r, world_size=world, batch_size=local), local * steps)
             for r in range(world)]
    for step in range(steps):
        glob = one[step * local * world:(step + 1) * local * world]
        parts = [ranks[r][step * local:(step + 1) * local] for r in range(world)]
        assert sum(parts, []) == glob  # together exactly the one-process global batch, in rank order


def test_position_is_global_so_a_resume_at_another_world_size_continues_the_stream():
    one = take(ResumableShuffleSampler(17, seed=1), 40)
    resumed = []
    for r in range(4):
        s = ResumableShuffleSampler(17, seed=1, rank=r, world_size=4, batch_size=1)
        s.load_state_dict({"seed": 1, "position": 8})  # 8 windows consumed by a 2-rank run
        resumed.append(take(s, 3))
    assert [resumed[r][k] for k in range(3) for r in range(4)] == one[8:20]


def test_sharded_validation_drops_only_a_last_partial_global_batch():
    shards = [list(ShardedSequentialSampler(11, rank=r, world_size=2, batch_size=2)) for r in range(2)]
    assert shards == [[0, 1, 4, 5], [2, 3, 6, 7]]  # 8..10 would leave rank 1 a batch short
    assert len(ShardedSequentialSampler(11, rank=1, world_size=2, batch_size=2)) == 4
    with pytest.raises(ValueError, match="rank=2"):
        ShardedSequentialSampler(11, rank=2, world_size=2)


def _prepare(data_dir, barrier):
    from nexus.data import prepare_data

    barrier.wait()  # both start together
    p = prepare_data(data_dir=data_dir, vocab_size=300, max_corpus_bytes=60_000)
    return p.n_train_tokens


def test_two_processes_preparing_the_same_directory_at_once_both_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        counts = pool.starmap(_prepare, [(str(tmp_path), barrier)] * 2)
    assert counts[0] == counts[1] > 0
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
