"""Continual learning: learn task after task without forgetting the earlier ones.

- ``EWC``: Elastic Weight Consolidation (Kirkpatrick et al. 2017), a quadratic pull toward each old task's
  weights, weighted by the diagonal empirical Fisher; online EWC (Schwarz et al. 2018) keeps one decayed Fisher.
- ``LwF``: Learning without Forgetting (Li & Hoiem 2016), distillation toward the old model's outputs.
- ``ReplayBuffer``: reservoir sampling (Vitter's algorithm R) of past samples, mixed into new batches.
- ``ProgressiveNetwork``: Progressive Neural Networks (Rusu et al. 2016), a frozen column per old task and
  lateral connections into each new column.

``EWC`` and ``LwF`` are ``TrainerCallback``s: give them to the Trainer and call ``trainer.start_task(...)`` at a
task boundary; they consolidate on the finished task and add their penalty to every later loss.

Example::
    ewc = EWC(model, ewc_lambda=100.0)
    ...train on task A...
    ewc.consolidate(loader_a, loss_fn)          # loss_fn(model, batch) -> scalar loss
    loss = loss_fn(model, batch_b) + ewc.penalty()
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from nexus.training.trainer import Trainer, TrainerCallback

__all__ = ["EWC", "LwF", "ReplayBuffer", "ProgressiveNetwork"]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def _split_samples(batch: Any) -> list:
    """A batch (a tensor, or a tuple / list / dict of tensors sharing dim 0) as a list of one-sample batches."""
    if isinstance(batch, torch.Tensor):
        return [batch[i: i + 1] for i in range(batch.shape[0])]
    if isinstance(batch, (tuple, list)):
        columns = [_split_samples(b) for b in batch]
        return [type(batch)(c) if isinstance(batch, tuple) else list(c) for c in zip(*columns)]
    if isinstance(batch, dict):
        columns = {k: _split_samples(v) for k, v in batch.items()}
        n = len(next(iter(columns.values())))
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    raise TypeError(f"a batch must be a tensor, or a tuple, list or dict of tensors, got {type(batch).__name__}")


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"a batch must be a tensor, or a tuple, list or dict of tensors, got {type(batch).__name__}")


class EWC(TrainerCallback):
    """Elastic Weight Consolidation: ``penalty() = ewc_lambda / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``.

    ``consolidate(dataloader, loss_fn)`` at the end of a task computes the diagonal empirical Fisher
    ``F_i = mean over samples of (d loss_sample / d theta_i)^2`` (one backward per sample; the model in eval
    mode) and stores it with the current weights as anchors. Offline EWC keeps one (Fisher, anchors) pair per
    task; online EWC (``online=True``) keeps one: ``F <- gamma * F + F_new`` and anchors moved to the newest weights.
    ``fisher`` and ``anchors`` are the newest pair (``{parameter name: tensor}``, shapes and dtypes of the
    parameters); ``tasks`` holds them all.

    As a Trainer callback it consolidates at ``trainer.start_task`` on up to ``max_batches`` (default: the Trainer's
    ``eval_batches``, else 20) batches of the finished task's loader (the Trainer's loss) and adds ``penalty()``
    to every micro-batch's loss.

    Example::
        ewc = EWC(model, ewc_lambda=100.0, online=True, gamma=0.9)
        ewc.consolidate(loader_a, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        (loss_fn(model, batch) + ewc.penalty()).backward()
    """

    def __init__(self, model: torch.nn.Module, ewc_lambda: float = 1.0, online: bool = False, gamma: float = 1.0,
                 *, max_batches: int | None = None):
        if not ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        self.model = model
        self.ewc_lambda = float(ewc_lambda)
        self.online = online
        self.gamma = float(gamma)
        self.max_batches = max_batches
        self.tasks: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (fisher, anchors) per task

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return self.tasks[-1][0] if self.tasks else {}

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        return self.tasks[-1][1] if self.tasks else {}

    def compute_fisher(self, dataloader: Iterable, loss_fn: LossFn, max_batches: int | None = None
                       ) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher: the mean over every sample of the squared gradient of its own loss."""
        params = self._params()
        fisher = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}
        count = 0
        was_training = self.model.training
        self.model.eval()  # no dropout noise in the importance estimate
        try:
            for b, batch in enumerate(dataloader):
                if max_batches is not None and b >= max_batches:
                    break
                for sample in _split_samples(batch):
                    loss = loss_fn(self.model, sample)
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    for (n, _), g in zip(params.items(), grads):
                        if g is not None:
                            fisher[n] += g.detach() ** 2
                    count += 1
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("the dataloader yielded no samples: the Fisher needs at least one")
        return {n: f / count for n, f in fisher.items()}

    def consolidate(self, dataloader: Iterable, loss_fn: LossFn, max_batches: int | None = None) -> None:
        """End of a task: its Fisher on ``dataloader`` (``loss_fn(model, one_sample_batch)`` -> scalar) and the
        current weights as its anchors."""
        fisher = self.compute_fisher(dataloader, loss_fn, max_batches or self.max_batches)
        anchors = {n: p.detach().clone() for n, p in self._params().items()}
        if self.online and self.tasks:
            old = self.tasks[0][0]
            fisher = {n: self.gamma * old[n] + f if n in old else f for n, f in fisher.items()}
            self.tasks = [(fisher, anchors)]
        elif self.online:
            self.tasks = [(fisher, anchors)]
        else:
            self.tasks.append((fisher, anchors))

    def penalty(self) -> torch.Tensor:
        """The 0-dim penalty to add to the loss (zero before the first ``consolidate``)."""
        params = self._params()
        if not self.tasks:
            p = next(iter(params.values()))
            return p.new_zeros(())
        total = 0.0
        for fisher, anchors in self.tasks:
            for n, p in params.items():
                if n in fisher:  # parameters added after the task (a new head) carry none of its importance
                    total = total + (fisher[n] * (p - anchors[n]) ** 2).sum()
        return 0.5 * self.ewc_lambda * total

    # ---- Trainer integration ----------------------------------------------------------------------
    def on_task_end(self, trainer: Trainer) -> None:
        with torch.random.fork_rng(devices=[]):  # a loader's seed draw must not move the training RNG stream
            limit = self.max_batches or getattr(trainer.args, "eval_batches", None) or 20  # train loaders are endless
            self.consolidate(trainer.train_loader, lambda model, batch: trainer.batch_loss(batch), limit)

    def extra_loss(self, trainer: Trainer, window: torch.Tensor, out: Any) -> torch.Tensor | None:
        return self.penalty() if self.tasks else None

    def state_dict(self) -> dict:
        return {"online": self.online, "gamma": self.gamma,
                "tasks": [{"fisher": f, "anchors": a} for f, a in self.tasks]}

    def load_state_dict(self, state: dict) -> None:
        if state["online"] != self.online:
            raise ValueError(f"the saved EWC has online={state['online']}, this one online={self.online}")
        self.tasks = [(t["fisher"], t["anchors"]) for t in state["tasks"]]


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(old / T) || softmax(new / T))`` over the last dim, mean over the other dims
    (Hinton et al. 2015; the T^2 keeps gradients comparable across temperatures). Float32 or wider."""
    t = temperature
    log_p = F.log_softmax(logits.float() / t, dim=-1)
    log_q = F.log_softmax(old_logits.float() / t, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.mean() * t * t


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: ``out["logits"]``, ``out.logits`` or the tensor itself."""
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"LwF found no logits in a {type(out).__name__} output: give LwF(outputs_of=...)")
    return logits


class LwF(TrainerCallback):
    """Learning without Forgetting: ``alpha * distillation_loss(new, old, temperature)`` on the current inputs,
    where ``old`` is a frozen copy of the model taken by ``consolidate()`` at a task boundary.

    ``outputs_of(out)`` picks the logits from a model output (default: ``out["logits"]``, ``out.logits`` or ``out``).
    As a Trainer callback it snapshots at ``trainer.start_task`` and distils on each batch's model inputs.

    Example::
        lwf = LwF(model, alpha=1.0, temperature=2.0)
        ...train on task A...; lwf.consolidate()
        logits = model(x_b); loss = F.cross_entropy(logits, y_b) + lwf.penalty(x_b, logits)
    """

    def __init__(self, model: torch.nn.Module, alpha: float = 1.0, temperature: float = 2.0,
                 outputs_of: Callable[[Any], torch.Tensor] | None = None):
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.model = model
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.outputs_of = outputs_of or _logits
        self.old_model: torch.nn.Module | None = None

    def consolidate(self) -> None:
        """Freeze a copy of the model as it is now: the teacher for every later task."""
        self.old_model = copy.deepcopy(self.model).eval()
        for p in self.old_model.parameters():
            p.requires_grad_(False)

    def penalty(self, inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        """Distillation loss of ``logits`` (the model's on ``inputs``) toward the old model's (zero before
        ``consolidate``)."""
        if self.old_model is None:
            return logits.new_zeros(())
        with torch.no_grad():
            old = self.outputs_of(self.old_model(inputs))
        return self.alpha * distillation_loss(logits, old, self.temperature)

    def on_task_end(self, trainer: Trainer) -> None:
        self.consolidate()

    def extra_loss(self, trainer: Trainer, window: Any, out: Any) -> torch.Tensor | None:
        if self.old_model is None:
            return None
        args, kwargs = trainer.model_inputs(window)
        with torch.no_grad():
            old = self.outputs_of(self.old_model(*args, **kwargs))
        return self.alpha * distillation_loss(self.outputs_of(out), old, self.temperature)

    def state_dict(self) -> dict:
        return {"old_model": None if self.old_model is None else self.old_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["old_model"] is None:
            self.old_model = None
            return
        self.consolidate()
        self.old_model.load_state_dict(state["old_model"])


class ReplayBuffer:
    """A fixed-capacity uniform sample of every sample ever added (reservoir sampling, Vitter's algorithm R):
    after ``n`` additions each of them is in the buffer with probability ``min(1, capacity / n)``.

    Samples are rows of a batch: a tensor ``[B, ...]`` or a tuple of tensors sharing dim 0 (inputs, targets).
    ``mix(batch)`` returns the batch with ``replay_size`` stored samples appended (drawn before the batch
    itself is added), so old tasks keep being trained on. Seeded; ``state_dict`` holds samples and RNG. A Trainer
    resumed over ``buffer.loader(...)`` replays the task's batches and so refills the buffer with this task's
    samples only: keep earlier tasks' samples by restoring ``state_dict`` yourself.

    Example::
        buffer = ReplayBuffer(capacity=1000)
        for x, y in loader_b:
            x, y = buffer.mix((x, y))        # [B + replay_size, ...]
    """

    def __init__(self, capacity: int, *, replay_size: int | None = None, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if replay_size is not None and replay_size < 0:
            raise ValueError(f"replay_size must be >= 0 or None (the batch size), got {replay_size}")
        self.capacity = capacity
        self.replay_size = replay_size
        self.samples: list[Any] = []
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def add(self, batch: Any) -> None:
        """Offer every sample of ``batch`` to the reservoir."""
        for sample in _split_samples(batch):
            sample = _detach(sample)
            self.seen += 1
            if len(self.samples) < self.capacity:
                self.samples.append(sample)
            else:
                slot = self._randint(self.seen)  # keep with probability capacity / seen
                if slot < self.capacity:
                    self.samples[slot] = sample

    def sample(self, k: int) -> Any:
        """``k`` stored samples drawn uniformly without replacement (all of them if fewer), as one batch."""
        if not self.samples:
            raise ValueError("the replay buffer is empty")
        k = min(k, len(self.samples))
        picks = torch.randperm(len(self.samples), generator=self.generator)[:k].tolist()
        return _cat([self.samples[i] for i in picks])

    def mix(self, batch: Any, replay_size: int | None = None) -> Any:
        """``batch`` with up to ``replay_size`` (default: the buffer's, else the batch size) old samples appended
        along dim 0; then ``batch`` is added to the buffer."""
        k = replay_size if replay_size is not None else self.replay_size
        k = _batch_size(batch) if k is None else k
        mixed = batch
        if self.samples and k > 0:
            old = self.sample(k)
            mixed = _cat([batch, _to_device_of(old, batch)])
        self.add(batch)
        return mixed

    def loader(self, dataloader: Iterable, replay_size: int | None = None) -> Iterable:
        """An iterable over ``dataloader`` whose batches are ``mix``-ed (a Trainer's ``train_loader``)."""
        return _ReplayLoader(self, dataloader, replay_size)

    def state_dict(self) -> dict:
        return {"samples": list(self.samples), "seen": self.seen, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.seen = list(state["samples"]), state["seen"]
        self.generator.set_state(state["generator"])


class _ReplayLoader:
    def __init__(self, buffer: ReplayBuffer, dataloader: Iterable, replay_size: int | None):
        self.buffer, self.dataloader, self.replay_size = buffer, dataloader, replay_size

    def __iter__(self):
        for batch in self.dataloader:
            yield self.buffer.mix(batch, self.replay_size)


def _detach(sample: Any) -> Any:
    if isinstance(sample, torch.Tensor):
        return sample.detach()
    if isinstance(sample, (tuple, list)):
        return type(sample)(_detach(s) for s in sample)
    return {k: _detach(v) for k, v in sample.items()}


def _to_device_of(batch: Any, like: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(like.device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device_of(b, l) for b, l in zip(batch, like))
    return {k: _to_device_of(v, like[k]) for k, v in batch.items()}


def _cat(batches: list) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))
    return {k: _cat([b[k] for b in batches]) for k in first}


class ProgressiveNetwork(torch.nn.Module):
    """Progressive Neural Network of MLP columns: column ``k``'s layer ``i`` computes
    ``h_i^k = act(W_i^k h_{i-1}^k + sum_{j<k} U_i^{k,j} h_{i-1}^j)`` (no activation on the output layer).

    ``add_column()`` freezes every existing column (and its laterals) and adds a new trainable one with
    lateral connections from all of them, so old tasks' outputs never change. ``forward(x, task=None)``
    returns column ``task``'s output (default: the newest). Input ``[..., in_features]``, output
    ``[..., out_features]``, in the parameters' dtype.

    Example::
        net = ProgressiveNetwork(4, [32, 32], 2)      # column 0 for task 0
        net.add_column()                              # column 1 for task 1; column 0 frozen
        y0, y1 = net(x, task=0), net(x)
    """

    def __init__(self, in_features: int, hidden_sizes: list[int], out_features: int,
                 activation: Callable[[], torch.nn.Module] = torch.nn.ReLU):
        super().__init__()
        if in_features < 1 or out_features < 1 or any(h < 1 for h in hidden_sizes):
            raise ValueError(f"sizes must be positive, got in_features={in_features}, hidden_sizes={hidden_sizes}, "
                             f"out_features={out_features}")
        self.sizes = [in_features, *hidden_sizes, out_features]
        self.activation = activation()
        self.columns = torch.nn.ModuleList()  # columns[k][i]: W_i^k
        self.laterals = torch.nn.ModuleList()  # laterals[k][i][j]: U_i^{k,j} for layer i >= 1, j < k
        self.add_column()

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def add_column(self) -> int:
        """Freeze the existing columns, add a new one; returns its index (the new task's id)."""
        for p in self.parameters():
            p.requires_grad_(False)
        k = len(self.columns)
        sizes = self.sizes
        self.columns.append(torch.nn.ModuleList(
            torch.nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)))
        # layer 0 reads the input only; layers i >= 1 also read layer i-1 of every older column
        self.laterals.append(torch.nn.ModuleList(
            torch.nn.ModuleList(torch.nn.Linear(sizes[i], sizes[i + 1], bias=False) for _ in range(k))
            for i in range(1, len(sizes) - 1)))
        ref = next(self.columns[0].parameters())
        self.columns[-1].to(device=ref.device, dtype=ref.dtype)
        self.laterals[-1].to(device=ref.device, dtype=ref.dtype)
        return k

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        task = self.num_columns - 1 if task is None else task
        if not 0 <= task < self.num_columns:
            raise ValueError(f"task must be in [0, {self.num_columns}), got {task}")
        last = len(self.sizes) - 2
        hidden = [x] * (task + 1)  # h_{i-1}^j for every column j <= task
        for i in range(last + 1):
            new = []
            for k in range(task + 1):
                h = self.columns[k][i](hidden[k])
                if i >= 1:
                    for j in range(k):
                        h = h + self.laterals[k][i - 1][j](hidden[j])
                new.append(h if i == last else self.activation(h))
            hidden = new
        return hidden[task]
