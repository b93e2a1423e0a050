"""Curriculum learning: the sampler draws only the pool (a permutation per pass, or in proportion to weights),
curricula order by length / difficulty and advance as configured from the Trainer's metrics, self-paced weights
follow the losses, and a resumed Trainer run draws exactly the samples of the uninterrupted one."""
import collections
import math
import types

import pytest
import torch

from nexus.data.sampler import CurriculumSampler
from nexus.training.curriculum import DifficultyCurriculum, LengthCurriculum, SelfPacedCurriculum
from nexus.training.trainer import Trainer, TrainingArguments
from tests.training.tiny_lm import SEQ, VOCAB, TinyLM


def draw(iterator, k):
    return [next(iterator) for _ in range(k)]


def test_sampler_passes_are_permutations_of_the_pool_from_the_change_on():
    sampler = CurriculumSampler(50, indices=[3, 7, 11, 19], seed=1)
    it = iter(sampler)
    first = draw(it, 12)
    for k in range(3):  # three passes, each a permutation of the pool
        assert sorted(first[4 * k: 4 * k + 4]) == [3, 7, 11, 19]
    sampler.set_pool(range(20, 50))
    second = draw(it, 60)
    assert sorted(second[:30]) == list(range(20, 50)) and sorted(second[30:]) == list(range(20, 50))
    with pytest.raises(ValueError, match="pool indices must be in"):
        sampler.set_pool([49, 50])
    with pytest.raises(ValueError, match="empty"):
        sampler.set_pool([])


def test_sampler_weighted_pool_draws_in_proportion():
    sampler = CurriculumSampler(10, indices=[2, 5, 9], weights=[1.0, 2.0, 5.0], seed=0)
    counts = collections.Counter(draw(iter(sampler), 8000))
    assert set(counts) == {2, 5, 9}
    for i, w in ((2, 1 / 8), (5, 2 / 8), (9, 5 / 8)):  # sd of each frequency < 0.006
        assert counts[i] / 8000 == pytest.approx(w, abs=0.025)


def test_sampler_resume_is_exact_past_a_prefetching_loader():
    """A loader drew 10 indices ahead when the pool changed; the state saved at the consumed position still
    reproduces the stream: positions before the change from the old pool, after it from the new."""
    sampler = CurriculumSampler(30, indices=range(10), seed=4)
    it = iter(sampler)
    stream = draw(it, 25)  # consumed 15, prefetched 10 more
    sampler.set_pool(range(10, 30))
    stream += draw(it, 40)
    state = sampler.state_dict(consumed=15)
    restored = CurriculumSampler(30, seed=99)
    restored.load_state_dict(state)
    assert draw(iter(restored), 50) == stream[15:]
    assert all(i < 10 for i in stream[:25]) and all(i >= 10 for i in stream[25:])
    assert sampler.state_dict(consumed=30)["segments"][0]["start"] == 25  # pools before the position are dropped


def test_sampler_ranks_split_the_one_stream():
    pool = list(range(5, 17))
    one = draw(iter(CurriculumSampler(20, indices=pool, seed=3)), 24)
    ranks = [draw(iter(CurriculumSampler(20, indices=pool, seed=3, rank=r, world_size=2, batch_size=3)), 12)
             for r in range(2)]
    rebuilt = [i for b in range(4) for r in range(2) for i in ranks[r][3 * b: 3 * b + 3]]
    assert rebuilt == one


def fake_trainer(step):
    return types.SimpleNamespace(step=step)


def test_length_curriculum_orders_short_to_long():
    lengths = torch.tensor([5, 40, 12, 33, 7, 21, 60, 9, 18, 50])
    curriculum = LengthCurriculum(lengths, max_lengths=[10, 25, 40], steps_per_stage=1)
    assert curriculum.num_stages == 4  # 10, 25, 40, then everything (60 and 50 are longer than 40)
    it = iter(curriculum.sampler)
    for stage, bound in enumerate([10, 25, 40, math.inf]):
        assert curriculum.stage == stage
        eligible = {i for i, n in enumerate(lengths.tolist()) if n <= bound}
        assert set(draw(it, 40)) == eligible, stage  # 40 draws: whole passes over the pool
        curriculum.on_log(fake_trainer(stage + 1), {"loss": 1.0})
    default = LengthCurriculum(torch.arange(1, 101), num_stages=4, patience=1)
    assert [len(p) for p in default.pools] == [25, 50, 75, 100]


def test_difficulty_curriculum_advances_below_thresholds_after_min_steps():
    difficulty = torch.linspace(0, 1, 11)  # 0.0, 0.1, ... 1.0
    curriculum = DifficultyCurriculum(difficulty, thresholds=[0.35, 0.65], metric="val_loss",
                                      advance_below=[2.0, 1.5], min_steps_per_stage=3)
    assert [len(p) for p in curriculum.pools] == [4, 7, 11]
    curriculum.on_evaluate(fake_trainer(1), {"val_loss": 2.5})
    curriculum.on_evaluate(fake_trainer(2), {"val_loss": 1.9})  # below, but only 2 steps in the stage
    assert curriculum.stage == 0
    curriculum.on_log(fake_trainer(3), {"lm_loss": 0.1})  # not the configured metric: ignored
    assert curriculum.stage == 0
    curriculum.on_evaluate(fake_trainer(3), {"val_loss": 1.9})
    assert curriculum.stage == 1 and sorted(curriculum.sampler.pool.tolist()) == list(range(7))
    curriculum.on_evaluate(fake_trainer(6), {"val_loss": 1.6})  # not below the second threshold
    assert curriculum.stage == 1
    curriculum.on_evaluate(fake_trainer(7), {"val_loss": 1.5})
    assert curriculum.stage == 2 and len(curriculum.sampler.pool) == 11
    curriculum.on_evaluate(fake_trainer(20), {"val_loss": 0.1})  # the last stage stays
    assert curriculum.stage == 2


def test_patience_and_steps_per_stage_progressions():
    curriculum = DifficultyCurriculum(torch.arange(6.0), thresholds=[1, 3], metric="lm_loss", patience=2,
                                      min_delta=0.01)
    for step, value in enumerate([3.0, 2.0, 1.995, 2.5], start=1):  # 1.995 is not better by more than 0.01
        curriculum.on_log(fake_trainer(step), {"lm_loss": value})
    assert curriculum.stage == 1 and curriculum.stage_start_step == 4
    by_steps = LengthCurriculum(torch.arange(8), max_lengths=[2, 5], steps_per_stage=4)
    for step in range(1, 9):
        by_steps.on_log(fake_trainer(step), {"loss": 1.0})
        assert by_steps.stage == step // 4
    with pytest.raises(ValueError, match="advance_below, patience or steps_per_stage"):
        LengthCurriculum(torch.arange(8), max_lengths=[2, 5])
    with pytest.raises(ValueError, match="no sample has difficulties <= -1.0"):
        DifficultyCurriculum(torch.arange(4.0), thresholds=[-1.0, 2.0], patience=1)


@pytest.mark.parametrize("mode", ["hard", "linear"])
def test_self_paced_weights_follow_the_losses(mode):
    dataset = list(range(10))
    curriculum = SelfPacedCurriculum(dataset, lam=1.0, growth=1.5, mode=mode, min_fraction=0.1)
    losses = torch.tensor([0.2, 1.5, 0.9, 3.0, 0.5, 1.1, 0.05, 2.0, 0.99, 0.7], dtype=torch.float64)
    weights = curriculum.update(losses)
    expected = (losses <= 1.0).double() if mode == "hard" else (1 - losses / 1.0).clamp(min=0)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-15)
    assert set(curriculum.sampler.pool.tolist()) == set(torch.nonzero(expected).reshape(-1).tolist())
    counts = collections.Counter(draw(iter(curriculum.sampler), 6000))
    for i in curriculum.sampler.pool.tolist():  # drawn in proportion to the weights
        assert counts[i] / 6000 == pytest.approx(float(expected[i] / expected.sum()), abs=0.03)
    assert curriculum.lam == 1.5  # the pace: the threshold grows after the round
    weights = curriculum.update(losses)
    expected = (losses <= 1.5).double() if mode == "hard" else (1 - losses / 1.5).clamp(min=0)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-15)
    # a threshold below every loss is raised so that min_fraction of the samples keep a weight >= 1/2
    low = SelfPacedCurriculum(dataset, lam=0.01, mode=mode, min_fraction=0.3)
    weights = low.update(losses)
    easiest = torch.argsort(losses)[:3]
    assert bool((weights[easiest] >= 0.5).all()) and int((weights > 0).sum()) >= 3


# ---- the curriculum in the Trainer, and resume ----------------------------------------------------
DATA = torch.randint(0, VOCAB, (40, SEQ + 1), generator=torch.Generator().manual_seed(0))


class Recording(torch.utils.data.Dataset):
    """The windows, noting every index the training loader fetches."""

    def __init__(self):
        self.fetched = []

    def __len__(self):
        return len(DATA)

    def __getitem__(self, i):
        self.fetched.append(i)
        return DATA[i]


def curricula():
    difficulty = (DATA[:, 0] % 5).double()  # five difficulty levels
    return {
        "difficulty": lambda: DifficultyCurriculum(difficulty, thresholds=[0, 2], metric="lm_loss",
                                                   advance_below=100.0, min_steps_per_stage=2, seed=3),
        "self_paced": lambda: SelfPacedCurriculum(list(DATA), lam=2.6, growth=1.05, mode="linear", seed=3),
    }


def make_trainer(tmp_path, kind, seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    curriculum = curricula()[kind]()
    dataset = Recording()
    args = TrainingArguments(output_dir=str(tmp_path), seq_len=SEQ, batch_size=4, log_interval=1, eval_interval=2,
                             save_interval=3, progress_bar=False, tensorboard=False, device="cpu", eval_batches=2)
    val = torch.utils.data.DataLoader(DATA[:8], batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    constant = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = Trainer(model=model, optimizer=opt, lr_scheduler=constant, train_loader=curriculum.loader(dataset, 4),
                      val_loader=val, args=args, callbacks=[curriculum])
    return trainer, curriculum, dataset


@pytest.mark.parametrize("kind", ["difficulty", "self_paced"])
def test_trainer_drives_the_curriculum_and_resume_keeps_its_position(tmp_path, kind, one_thread):
    full, curriculum, data = make_trainer(tmp_path / "full", kind)
    full.train(max_steps=8)
    if kind == "difficulty":  # advanced by the logged lm_loss every 2 steps, through 3 stages
        assert curriculum.stage == 2 and curriculum.stage_start_step == 4
        first_two_steps = data.fetched[:8]
        assert all(int(DATA[i, 0]) % 5 == 0 for i in first_two_steps)
    else:  # scored at the start and after each of the 4 evaluations
        assert curriculum.rounds == 5 and curriculum.lam == pytest.approx(2.6 * 1.05 ** 5)
    split, _, split_data = make_trainer(tmp_path / "split", kind)
    split.train(max_steps=3)
    resumed, resumed_curriculum, resumed_data = make_trainer(tmp_path / "split", kind, seed=7)
    resumed.train(max_steps=8, resume_from=tmp_path / "split" / "checkpoint_step_3.pt")
    assert split_data.fetched + resumed_data.fetched == data.fetched  # the same samples, in the same order
    assert resumed_curriculum.state_dict().keys() == curriculum.state_dict().keys()
    for key, value in curriculum.state_dict().items():
        other = resumed_curriculum.state_dict()[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
