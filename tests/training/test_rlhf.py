"""RLHF: losses against formulas written here, GAE against a backward loop, cached sampling against
recomputation, and tiny runs with a known reward (PPO's reward rises with a bounded KL, DPO's margin
grows, a reward model ranks held-out pairs), memory flat over DPO steps."""
import gc
import math

import numpy as np
import pytest
import torch

from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training import rlhf
from nexus.training.rlhf import DPO, PPO, RewardModel, RewardModeling, RLHFConfig

V, P, N, TARGET = 8, 2, 8, 5  # vocab, prompt length, response length, the token the reward counts
CAUSAL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=64,
              max_seq_len=16, n_experts=2, moe_top_k=1, n_shared_experts=0, moe_layer_interval=2,
              use_mod=False, use_mamba=False, n_pred_tokens=1)


def tiny_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoETransformer(MoEConfig(**{**CAUSAL, **overrides}))


def count_reward(seq, mask):
    """The known reward: how many response tokens are TARGET."""
    return ((seq[:, P:] == TARGET).float() * mask[:, P:]).sum(-1)


def preference_pairs(n, seed, length=N):
    """Pairs of responses after one prompt: chosen has more TARGET tokens than rejected."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (n, P), generator=g)
    others = torch.tensor([t for t in range(V) if t != TARGET])

    def response(k):  # k TARGET tokens at random places, the rest other tokens
        r = others[torch.randint(0, V - 1, (n, length), generator=g)]
        place = torch.rand(n, length, generator=g).argsort(1) < k[:, None]
        return torch.where(place, torch.full_like(r, TARGET), r)

    k_rej = torch.randint(0, 3, (n,), generator=g)
    k_cho = k_rej + torch.randint(2, 5, (n,), generator=g)
    mask = torch.cat([torch.zeros(n, P), torch.ones(n, length)], dim=1)
    return {"chosen_ids": torch.cat([prompts, response(k_cho)], 1), "chosen_mask": mask,
            "rejected_ids": torch.cat([prompts, response(k_rej)], 1), "rejected_mask": mask.clone()}


def batches(pairs, size):
    n = pairs["chosen_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in pairs.items()} for i in range(0, n, size)]


# ---- losses against independent formulas ----------------------------------------------------------


def _np(t):
    return t.detach().double().numpy()


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    return [(-10 * torch.rand(16, generator=g, dtype=torch.float64)) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid-smoothed", "ipo", "hinge", "kto_pair"])
def test_dpo_loss_matches_the_papers_equations(logps, loss_type):
    pc, pr, rc, rr = (_np(t) for t in logps)
    beta, ls = 0.3, (0.1 if loss_type == "sigmoid-smoothed" else 0.0)
    h = (pc - rc) - (pr - rr)
    if loss_type.startswith("sigmoid"):  # Rafailov et al. eq. 7; conservative DPO's smoothing
        expected = np.mean(-(1 - ls) * _log_sigmoid(beta * h) - ls * _log_sigmoid(-beta * h))
    elif loss_type == "ipo":  # Azar et al. eq. 17
        expected = np.mean((h - 1 / (2 * beta)) ** 2)
    elif loss_type == "hinge":
        expected = np.mean(np.maximum(0.0, 1 - beta * h))
    else:
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        kl_c, kl_r = max(0.0, np.mean(pc - rc)), max(0.0, np.mean(pr - rr))
        expected = np.mean(np.concatenate([1 - sig(beta * ((pc - rc) - kl_r)), 1 - sig(beta * (kl_c - (pr - rr)))]))
    got = rlhf.dpo_loss(*logps, beta=beta, loss_type=loss_type.split("-")[0], label_smoothing=ls)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down(logps):
    pc, pr = (t.clone().requires_grad_() for t in logps[:2])
    rlhf.dpo_loss(pc, pr, logps[2], logps[3], beta=0.5).backward()
    # d/d pi_c of -log sigmoid(beta h) = -beta sigmoid(-beta h) / B < 0
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    torch.testing.assert_close(pc.grad, -0.5 * torch.sigmoid(-0.5 * h) / 16)
    torch.testing.assert_close(pr.grad, -pc.grad)


def test_reward_model_loss_is_bradley_terry():
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    assert float(rlhf.reward_model_loss(c, r)) == pytest.approx(np.mean(-_log_sigmoid(_np(c) - _np(r))), rel=1e-12)
    margin = torch.rand(32, generator=g, dtype=torch.float64)
    assert float(rlhf.reward_model_loss(c, r, margin)) == pytest.approx(
        np.mean(-_log_sigmoid(_np(c) - _np(r) - _np(margin))), rel=1e-12)


def _gae_loop(rewards, values, gamma, lam, last_value, lengths):
    """GAE by the textbook backward recursion, one python float at a time, per row of its own length."""
    adv = np.zeros_like(rewards)
    for b, length in enumerate(lengths):
        running = 0.0
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else (last_value[b] if length == rewards.shape[1] else 0.0)
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    ret = adv + np.where(np.arange(rewards.shape[1])[None] < np.array(lengths)[:, None], values, 0.0)
    return adv, ret


def test_compute_gae_matches_the_backward_recursion():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(4, 7, generator=g, dtype=torch.float64)
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    last = torch.randn(4, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 1]  # right padding; full rows bootstrap from last_value, shorter ones terminate
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).double()
    adv, ret = rlhf.compute_gae(rewards, values, gamma=0.9, lam=0.8, last_value=last, mask=mask)
    exp_adv, exp_ret = _gae_loop(_np(rewards), _np(values), 0.9, 0.8, _np(last), lengths)
    np.testing.assert_allclose(_np(adv), exp_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(ret), exp_ret, rtol=1e-12, atol=1e-12)
    # no mask, scalar last value: every row full length
    adv, ret = rlhf.compute_gae(rewards, values, gamma=0.99, lam=0.95, last_value=0.5)
    exp_adv, exp_ret = _gae_loop(_np(rewards), _np(values), 0.99, 0.95, [0.5] * 4, [7] * 4)
    np.testing.assert_allclose(_np(adv), exp_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(ret), exp_ret, rtol=1e-12, atol=1e-12)


def test_ppo_losses_match_elementwise_formulas():
    g = torch.Generator().manual_seed(3)
    shape = (3, 5)
    logprobs = (-2 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()
    old = logprobs.detach() + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)  # ratios beyond the clip
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    eps = 0.2
    pg, grads, kept = [], np.zeros(shape), []
    for i in range(3):
        for j in range(5):
            if not mask[i, j]:
                continue
            ratio = math.exp(float(logprobs.detach()[i, j]) - float(old[i, j]))
            a = float(adv[i, j])
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            pg.append(max(unclipped, clipped))
            kept.append((i, j, unclipped >= clipped, ratio, a))
    loss = rlhf.ppo_policy_loss(logprobs, old, adv, clip_eps=eps, mask=mask)
    assert float(loss.detach()) == pytest.approx(sum(pg) / len(pg), rel=1e-12)
    assert any(not k[2] for k in kept) or any(abs(k[3] - 1) > eps for k in kept)  # the clip is exercised
    loss.backward()
    for i, j, unclipped_wins, ratio, a in kept:  # gradient flows only where the unclipped term is the max
        grads[i, j] = -a * ratio / len(pg) if unclipped_wins else 0.0
    np.testing.assert_allclose(_np(logprobs.grad), grads, rtol=1e-10, atol=1e-14)

    values = torch.randn(shape, generator=g, dtype=torch.float64)
    old_values = values + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    returns = torch.randn(shape, generator=g, dtype=torch.float64)
    vl = []
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                v, o, r = float(values[i, j]), float(old_values[i, j]), float(returns[i, j])
                vc = min(max(v, o - eps), o + eps)
                vl.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
    got = rlhf.ppo_value_loss(values, old_values, returns, clip_eps=eps, mask=mask)
    assert float(got) == pytest.approx(sum(vl) / len(vl), rel=1e-12)
    # without a mask: the mean over every token
    full = rlhf.ppo_policy_loss(logprobs, old, adv, clip_eps=eps)
    ratio = torch.exp(logprobs.detach() - old)
    assert float(full.detach()) == pytest.approx(float(torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()))


def test_bad_inputs_name_the_problem():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="rejected_rewards shape"):
        rlhf.reward_model_loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match="loss_type"):
        rlhf.dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        rlhf.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="lam"):
        rlhf.compute_gae(x, x, gamma=0.9, lam=1.5)
    with pytest.raises(ValueError, match="clip_eps"):
        rlhf.ppo_policy_loss(x, x, x, clip_eps=-1)
    for field, value in [("method", "sft"), ("kl_coef", -0.1), ("gamma", 1.2), ("clip_eps", 0), ("beta", -1),
                         ("ppo_epochs", 0), ("dpo_loss_type", "x"), ("eos_token_id", -1), ("temperature", 0.0)]:
        with pytest.raises(ValueError, match=field):
            RLHFConfig(**{field: value})
    with pytest.raises(ValueError, match="reward_model_path"):
        PPO(tiny_moe(), RLHFConfig())
    with pytest.raises(ValueError, match="chosen_ids"):
        DPO(tiny_moe(), RLHFConfig(method="dpo")).step({"chosen": x})


# ---- sampling with a KV cache -----------------------------------------------------------------------


def test_cached_sampling_equals_sampling_without_cache():
    policy = tiny_moe(seed=1)
    prompts = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(4))
    runs = []
    for use_cache in (True, False):
        runs.append(rlhf.generate(policy, prompts, 10, generator=torch.Generator().manual_seed(5),
                                  use_cache=use_cache, output_logits=True))
    (seq_c, mask_c, logits_c), (seq_f, mask_f, logits_f) = runs
    torch.testing.assert_close(logits_c, logits_f, atol=1e-5, rtol=1e-5)  # step by step
    assert torch.equal(seq_c, seq_f) and torch.equal(mask_c, mask_f)
    # and each step's logits are the full model's on the sampled prefix
    with torch.no_grad():
        full = policy(seq_c).logits[:, 2:-1]
    torch.testing.assert_close(logits_c, full, atol=1e-5, rtol=1e-5)
    assert rlhf.supports_kv_cache(policy) and not rlhf.supports_kv_cache(tiny_moe(use_mod=True))
    with pytest.raises(ValueError, match="use_cache=True"):
        rlhf.generate(tiny_moe(use_mod=True), prompts, 2, use_cache=True)


def test_generation_stops_at_eos_and_pads():
    policy = tiny_moe(seed=2)
    with torch.no_grad():  # uniform next-token logits: the EOS (3) comes with probability 1/8 per step
        policy.lm_head.weight.zero_()
    prompts = torch.randint(0, V, (6, P), generator=torch.Generator().manual_seed(6))
    seq, mask = rlhf.generate(policy, prompts, N, eos_token_id=3, pad_token_id=0,
                              generator=torch.Generator().manual_seed(7))
    assert seq.shape == (6, P + N) and mask.shape == (6, N)
    resp = seq[:, P:]
    for b in range(6):
        eos = (resp[b] == 3).nonzero()
        end = int(eos[0]) + 1 if len(eos) else N
        assert mask[b, :end].eq(1).all() and mask[b, end:].eq(0).all()  # EOS kept, the rest masked
        assert resp[b, end:].eq(0).all()
    assert (mask.sum(1) < N).any()  # uniform logits over 8 tokens: some rows do end early


# ---- the methods on a task with a known reward -------------------------------------------------------


def test_ppo_raises_the_reward_with_the_kl_bounded(one_thread):
    """Per-token reward 1 for TARGET, KL coefficient beta: the KL-regularised optimum puts
    p* = e^(1/beta) / (V - 1 + e^(1/beta)) on TARGET (about 0.51 for beta 0.5 and a near-uniform
    reference), a reward of N p* = 4.1 and a KL of about 3.5 nats per response. PPO must get close:
    the reward from ~1 to > 2.5 while the KL stays < 7 (a reward-only optimum would reach 16.6)."""
    policy = tiny_moe(seed=0)
    config = RLHFConfig(max_new_tokens=N, kl_coef=0.5, gamma=1.0, lam=0.95, ppo_epochs=2, num_mini_batches=2,
                        value_lr=3e-3)
    ppo = PPO(policy, config, reward=count_reward, optimizer=torch.optim.Adam(policy.parameters(), lr=3e-3))
    g = torch.Generator().manual_seed(1)
    history = [ppo.step(torch.randint(0, V, (32, P), generator=g)) for _ in range(16)]
    first = float(history[0]["score"])
    late_score = np.mean([float(m["score"]) for m in history[-6:]])
    late_kl = np.mean([float(m["kl"]) for m in history[-6:]])
    assert first < 1.6  # about N / V at the start
    assert late_score > 2.5, [float(m["score"]) for m in history]
    assert 0.3 < late_kl < 7.0, [float(m["kl"]) for m in history]
    assert all(math.isfinite(float(v)) for m in history for v in m.values())
    assert set(history[0]) >= {"score", "kl", "policy_loss", "value_loss", "clip_fraction", "approx_kl"}
    # the reference did not move
    ref = rlhf.frozen_copy(tiny_moe(seed=0))
    for p, q in zip(ppo.reference.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_dpo_raises_the_margin_on_train_and_held_out_pairs(one_thread):
    policy = tiny_moe(seed=3)
    dpo = DPO(policy, RLHFConfig(method="dpo", beta=0.5), optimizer=torch.optim.Adam(policy.parameters(), lr=2e-3))
    train, held_out = preference_pairs(64, seed=8), preference_pairs(64, seed=9)
    with torch.no_grad():
        before, _ = dpo.loss(held_out)
        _, m0 = dpo.loss(held_out)
    assert float(m0["margin"]) == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    for _ in range(3):
        for batch in batches(train, 16):
            dpo.step(batch)
    with torch.no_grad():
        after, m1 = dpo.loss(held_out)
    assert float(m1["margin"]) > 0.5 and float(m1["accuracy"]) > 0.8, m1
    assert float(after) < float(before) - 0.1
    # the policy learned the preference itself: TARGET is likelier after a prompt than under the reference
    prompts = held_out["chosen_ids"][:, :P]
    with torch.no_grad():
        p_pol = policy(prompts).logits[:, -1].softmax(-1)[:, TARGET].mean()
        p_ref = dpo.reference(prompts).logits[:, -1].softmax(-1)[:, TARGET].mean()
    assert float(p_pol) > float(p_ref) + 0.05


def test_reward_model_ranks_held_out_pairs(one_thread, tmp_path):
    rm = RewardModel(tiny_moe(seed=4))
    trainer = RewardModeling(rm, RLHFConfig(method="reward"), optimizer=torch.optim.Adam(rm.parameters(), lr=3e-3))
    train, held_out = preference_pairs(128, seed=10), preference_pairs(64, seed=11)

    def accuracy(model):
        with torch.no_grad():
            return float((model(held_out["chosen_ids"], held_out["chosen_mask"])
                          > model(held_out["rejected_ids"], held_out["rejected_mask"])).float().mean())

    for _ in range(3):
        for batch in batches(train, 32):
            trainer.step(batch)
    acc = accuracy(rm)
    assert acc > 0.85, acc
    # save / load round trip, then it serves PPO as a reward from RLHFConfig.reward_model_path
    path = tmp_path / "rm.pt"
    rm.save(path)
    loaded = RewardModel.load(path)
    assert accuracy(loaded) == acc
    ppo = PPO(tiny_moe(seed=5), RLHFConfig(reward_model_path=str(path), max_new_tokens=4))
    seq = held_out["chosen_ids"][:4]
    mask = torch.ones_like(seq, dtype=torch.float32)
    torch.testing.assert_close(ppo.reward(seq, mask), rm(seq, mask))


def test_reward_model_reads_the_last_masked_token_and_takes_any_backbone():
    class Embed(torch.nn.Module):  # a non-MoE backbone returning features [B, T, 6]
        def __init__(self):
            super().__init__()
            self.e = torch.nn.Embedding(V, 6)

        def forward(self, ids):
            return self.e(ids).cumsum(1)

    torch.manual_seed(0)
    rm = RewardModel(Embed())
    assert rm.hidden_size == 6
    ids = torch.randint(0, V, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    scores = rm.token_scores(ids)
    torch.testing.assert_close(rm(ids, mask), torch.stack([scores[0, 4], scores[1, 1], scores[2, 3]]))


class GRULM(torch.nn.Module):
    """Not an MoE model: a GRU language model that returns a plain logits tensor."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, 16)
        self.gru = torch.nn.GRU(16, 16, batch_first=True)
        self.out = torch.nn.Linear(16, V)

    def forward(self, ids):
        return self.out(self.gru(self.embed(ids))[0])


def test_any_module_returning_logits_is_a_policy(one_thread):
    torch.manual_seed(0)
    policy = GRULM()
    assert not rlhf.supports_kv_cache(policy)
    ppo = PPO(policy, RLHFConfig(max_new_tokens=4, ppo_epochs=1), reward=count_reward,
              optimizer=torch.optim.Adam(policy.parameters(), lr=1e-2))
    assert ppo.critic.hidden_size == V  # a generic policy's critic reads its logits as features
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = ppo.step(torch.randint(0, V, (8, P)))
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    dpo = DPO(policy, RLHFConfig(method="dpo"), optimizer=torch.optim.Adam(policy.parameters(), lr=1e-2))
    m = [dpo.step(preference_pairs(16, seed=16)) for _ in range(3)]
    assert float(m[-1]["margin"]) > float(m[0]["margin"])


def test_accumulated_dpo_step_equals_one_step_on_the_whole_batch():
    """step(b1, b2) (two backward passes) takes the same optimizer step as step(b1 + b2)."""
    pairs = preference_pairs(16, seed=20)
    halves = batches(pairs, 8)
    params = []
    torch.manual_seed(0)
    initial = [p.detach().double() for p in GRULM().parameters()]
    for inputs in ([pairs], halves):
        torch.manual_seed(0)
        policy = GRULM().double()
        dpo = DPO(policy, RLHFConfig(method="dpo"), optimizer=torch.optim.SGD(policy.parameters(), lr=1.0),
                  max_grad_norm=None)
        metrics = dpo.step(*inputs)
        params.append([p.detach().clone() for p in policy.parameters()])
        assert float(metrics["accuracy"]) == 0.0  # measured before the step: policy == reference
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(params[0], initial))  # every tensor moved


# ---- memory stays flat over steps (trl #1087) ----------------------------------------------------------


def _live_tensors():
    gc.collect()
    tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors), sum(t.grad_fn is not None for t in tensors)


def test_dpo_memory_stays_flat_over_50_steps(one_thread):
    """Live tensors (count and bytes, as gc sees them) and autograd graphs after step 5 equal those
    after step 50; a step that keeps its loss (as a careless metrics list would) is caught."""
    policy = tiny_moe(seed=6)
    dpo = DPO(policy, RLHFConfig(method="dpo"), optimizer=torch.optim.Adam(policy.parameters(), lr=1e-3))
    data = batches(preference_pairs(40, seed=12), 8)
    kept = []
    for i in range(50):
        metrics = dpo.step(data[i % len(data)])
        kept.append(metrics["loss"])  # what a logger does: the detached metrics hold no graph
        if i == 4:
            count5, bytes5, graphs5 = _live_tensors()
    count50, bytes50, graphs50 = _live_tensors()
    # relative to step 5: earlier tests in the same process may still hold tensors (and graphs) of their own
    assert graphs50 == graphs5
    assert count50 - count5 == 45 and bytes50 - bytes5 == 45 * 4  # only the 45 kept fp32 scalars
    # the detector works: keeping each step's graph is seen at once
    leaky = []
    for batch in data[:3]:
        loss, _ = dpo.loss(batch)
        leaky.append(loss)
    count, _, graphs = _live_tensors()
    assert graphs >= graphs50 + 3 and count > count50
    del leaky, loss


# ---- on the Trainer: trainer.with_rlhf(RLHFConfig(...)) ----------------------------------------------


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return self.pairs["chosen_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.pairs.items()}


def _trainer(tmp_path, name, model, train_loader, val_loader=None, **kw):
    from nexus.training.trainer import Trainer

    settings = dict(output_dir=str(tmp_path / name), max_steps=8, logging_steps=2, eval_steps=4, save_steps=4,
                    progress_bar=False, device="cpu", report_to="none", system_metrics=False, max_grad_norm=1.0)
    return Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), train_loader=train_loader,
                   val_loader=val_loader, **{**settings, **kw})


def _records(path):
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_with_rlhf_dpo_trains_logs_and_evaluates_on_the_trainer(one_thread, tmp_path):
    from torch.utils.data import DataLoader

    train = DataLoader(_Pairs(preference_pairs(64, seed=13)), batch_size=16)
    val = DataLoader(_Pairs(preference_pairs(32, seed=14)), batch_size=16)
    trainer = _trainer(tmp_path, "dpo", tiny_moe(seed=7), train, val)
    assert trainer.with_rlhf(RLHFConfig(method="dpo", beta=0.5)) is trainer
    result = trainer.train()
    assert result.step == 8 and result.stop_reason == "max_steps"
    records = _records(tmp_path / "dpo")
    evals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[0]["val_accuracy"] == 0.0  # policy == reference: every margin is exactly 0
    assert evals[-1]["val_accuracy"] > 0.8 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    logged = [r for r in records if "margin" in r]
    assert logged and all(k in logged[-1] for k in ("loss", "reward_chosen", "reward_rejected", "accuracy", "lr"))
    assert (tmp_path / "dpo" / "checkpoint_step_8.pt").is_file()


def test_with_rlhf_ppo_resumes_bit_identically(one_thread, tmp_path):
    """PPO through the Trainer: the metrics are logged, and a run resumed at step 3 from a fresh
    process-like start (a differently initialised model, so the reference must come from the
    checkpoint) ends with the same policy and critic as the uninterrupted run."""
    from torch.utils.data import DataLoader

    prompts = torch.randint(0, V, (48, P), generator=torch.Generator().manual_seed(15))
    config = RLHFConfig(max_new_tokens=6, kl_coef=0.2, ppo_epochs=2, num_mini_batches=2, value_lr=3e-3, seed=3)
    loader = lambda: DataLoader(prompts, batch_size=16)  # noqa: E731

    full = _trainer(tmp_path, "ppo", tiny_moe(seed=8), loader(), max_steps=6, save_steps=3, lr_schedule="constant")
    full.with_rlhf(config, reward=count_reward).train()
    records = _records(tmp_path / "ppo")
    assert all(k in records[-1] for k in ("score", "kl", "policy_loss", "value_loss", "clip_fraction"))

    resumed = _trainer(tmp_path, "ppo2", tiny_moe(seed=9), loader(), max_steps=6, save_steps=3,
                       lr_schedule="constant")
    resumed.with_rlhf(config, reward=count_reward).train(resume_from=tmp_path / "ppo" / "checkpoint_step_3.pt")
    assert resumed.step == 6
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    full_rlhf, resumed_rlhf = full.rlhf.algorithm, resumed.rlhf.algorithm
    for a, b in zip(full_rlhf.critic.state_dict().values(), resumed_rlhf.critic.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_rlhf.reference.state_dict().values(), resumed_rlhf.reference.state_dict().values()):
        assert torch.equal(a, b)


def test_seed_example_reward_model_path_and_positional_trainer(one_thread, tmp_path):
    """Seed 003's example: RLHFConfig(reward_model_path=..., kl_coef, gamma, lam) and
    Trainer(model, data, optimizer, args).with_rlhf(config), the data a dataset of prompts."""
    from nexus.training.trainer import Trainer, TrainingArguments

    RewardModel(tiny_moe(seed=10)).save(tmp_path / "rm.pt")
    rlhf_config = RLHFConfig(reward_model_path=str(tmp_path / "rm.pt"), kl_coef=0.1, gamma=0.99, lam=0.95,
                             max_new_tokens=4, ppo_epochs=1)
    model = tiny_moe(seed=11)
    data = torch.utils.data.TensorDataset(torch.randint(0, V, (32, P), generator=torch.Generator().manual_seed(17)))
    args = TrainingArguments(output_dir=str(tmp_path / "seed"), max_steps=2, train_batch_size=8, logging_steps=1,
                             progress_bar=False, device="cpu", report_to="none", system_metrics=False)
    trainer = Trainer(model, data, torch.optim.AdamW(model.parameters(), lr=1e-4), args).with_rlhf(rlhf_config)
    result = trainer.train()
    assert result.step == 2 and math.isfinite(result.metrics["score"]) and math.isfinite(result.metrics["kl"])
    assert trainer.tokens_seen == 2 * 8 * (P + 4)


def test_with_rlhf_trains_a_reward_model_from_a_dataset_of_pairs(one_thread, tmp_path):
    """The README's first line: Trainer(reward_model, pairs, optimizer, args).with_rlhf(method="reward")."""
    from nexus.training.trainer import Trainer, TrainingArguments

    reward_model = RewardModel(tiny_moe(seed=12))
    pairs, held_out = _Pairs(preference_pairs(96, seed=18)), _Pairs(preference_pairs(32, seed=19))
    args = TrainingArguments(output_dir=str(tmp_path / "rm"), max_steps=9, train_batch_size=32, eval_steps=9,
                             logging_steps=3, progress_bar=False, device="cpu", report_to="none",
                             system_metrics=False, lr_schedule="constant")
    trainer = Trainer(reward_model, pairs, torch.optim.Adam(reward_model.parameters(), lr=3e-3), args,
                      val_loader=torch.utils.data.DataLoader(held_out, batch_size=32))
    trainer.with_rlhf(RLHFConfig(method="reward")).train()
    evals = [r for r in _records(tmp_path / "rm") if "val_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 9
    assert evals[-1]["val_accuracy"] > 0.85 and evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_with_rlhf_refuses_what_it_cannot_do(tmp_path):
    trainer = _trainer(tmp_path, "bad", tiny_moe(), [torch.zeros(2, P, dtype=torch.long)])
    with pytest.raises(TypeError, match="RLHFConfig"):
        trainer.with_rlhf({"method": "ppo"})
    with pytest.raises(ValueError, match="reward"):
        trainer.with_rlhf(RLHFConfig(method="ppo"))
    with pytest.raises(TypeError, match="RewardModel"):
        trainer.with_rlhf(RLHFConfig(method="reward"))
    accumulating = _trainer(tmp_path, "bad2", tiny_moe(), [torch.zeros(2, P, dtype=torch.long)],
                            gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        accumulating.with_rlhf(RLHFConfig(), reward=count_reward)
    trainer.with_rlhf(RLHFConfig(method="dpo"))
    with pytest.raises(RuntimeError, match="already"):
        trainer.with_rlhf(RLHFConfig(method="dpo"))
