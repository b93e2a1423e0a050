"""FP8, MXFP8 and FP4 layers under ``torch.compile(fullgraph=True)``: one graph, no recompiles, and the
compiled outputs, input and parameter gradients and FP8 amax histories equal eager bit for bit.

One small model holds all three layer kinds and a packed MXFP8 layer (one compile keeps CPU time down). Stochastic gradient
rounding is on (MXFP8 and FP4), so its seeds must be drawn as tensors inside the graph: a Python int
seed would graph-break (``.item()``) or recompile each step. The ``aot_eager`` backend runs the
same aten ops as eager (same RNG draws in the same order), so equality is exact. The kernel ops pick
their path at run time: the compiled graph runs the interpreted kernels and, under
``forced("reference")``, the reference, without recompiling.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from nexus_kernels import forced
from nexus.training.mixed_precision import (
    FP4Config,
    FP4Linear,
    FP8Format,
    FP8Linear,
    MXFP8Config,
    MXFP8Linear,
    convert_to_fp4,
    convert_to_fp8,
    convert_to_mxfp8,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 48), nn.GELU(),
                          nn.Linear(48, 16))
    convert_to_fp8(model, FP8Format.HYBRID, filter_fn=lambda name, _: name == "0")
    convert_to_mxfp8(model, MXFP8Config(stochastic_rounding=True), filter_fn=lambda name, _: name in ("2", "6"))
    convert_to_fp4(model, FP4Config(stochastic_rounding=True), filter_fn=lambda name, _: name == "4")
    model[6].pack_weights()  # packed codes + E8M0 scales: the forward decodes them with from_mx
    assert [type(model[i]) for i in (0, 2, 4, 6)] == [FP8Linear, MXFP8Linear, FP4Linear, MXFP8Linear]
    return model


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the stochastic-rounding seeds are drawn in backward
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    out = {"y": y.detach(), "dx": x.grad}
    for name, p in model.named_parameters():
        out[f"grad {name.removeprefix('_orig_mod.')}"] = p.grad
        p.grad = None
    for name, b in model.named_buffers():
        out[f"buffer {name.removeprefix('_orig_mod.')}"] = b.clone()
    return out


def test_fp8_mxfp8_fp4_model_compiles_fullgraph_and_matches_eager():
    eager = _model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend=counter)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    runs = [(10, None), (11, None), (12, "reference")]  # two steps on the kernel path, one on the reference
    for seed, backend in runs:
        with forced(backend) if backend else contextlib.nullcontext():
            want = _step(eager, x, seed)
            got = _step(compiled, x, seed)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"step seed={seed} backend={backend}: {name}"
    assert counter.frame_count == 1, f"compiled {counter.frame_count} graphs: a recompile or a graph break"
    # the stochastic rounding really varies with the step's seed
    assert not torch.equal(_step(eager, x, 20)["grad 2.weight"], _step(eager, x, 21)["grad 2.weight"])
