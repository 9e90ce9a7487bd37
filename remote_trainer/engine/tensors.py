"""Tensor helpers of the engine: statistics, generated inputs, and the checks every input passes."""

from __future__ import annotations

import math

import torch

from remote_trainer.contract.names import Distribution
from remote_trainer.engine.errors import invalid
from remote_trainer.engine.results import Stats


def tensor_stats(t: torch.Tensor) -> Stats:
    """Norm, min, max, mean and non-finite count of ``t``, in float32."""
    f = t.detach().float()
    n = f.numel()
    if n == 0:
        return Stats(0.0, math.nan, math.nan, math.nan, 0, 0)
    norm = torch.linalg.vector_norm(f)
    lo, hi = torch.aminmax(f)
    summary = torch.stack([norm, lo, hi, f.mean()]).tolist()
    non_finite = 0 if math.isfinite(summary[0]) else int((~torch.isfinite(f)).sum())
    return Stats(summary[0], summary[1], summary[2], summary[3], non_finite, n)


def tensors_stats(ts: list[torch.Tensor]) -> list[Stats]:
    """``tensor_stats`` of many tensors at once, with the same numbers: the norms in one fused
    multi-tensor pass (``torch._foreach_norm``), min/max in one pass and the mean in another per
    tensor, and one host synchronisation for all (not four per tensor)."""
    fs = [t.detach().float() for t in ts]
    present = [f for f in fs if f.numel()]
    rows: list[list[float]] = []
    if present:
        norms = torch._foreach_norm(present)
        rows = torch.stack([torch.stack([n, *torch.aminmax(f), f.mean()]) for n, f in zip(norms, present)]).tolist()
    out = []
    it = iter(rows)
    for f in fs:
        if not f.numel():
            out.append(Stats(0.0, math.nan, math.nan, math.nan, 0, 0))
            continue
        norm, lo, hi, mean = next(it)
        non_finite = 0 if math.isfinite(norm) else int((~torch.isfinite(f)).sum())
        out.append(Stats(norm, lo, hi, mean, non_finite, f.numel()))
    return out


def generate(shape: tuple[int, ...], distribution: Distribution, seed: int, high: int = 0) -> torch.Tensor:
    """A tensor made on the CPU with its own generator, reproducible by any client."""
    g = torch.Generator().manual_seed(seed)
    if distribution == "zeros":
        return torch.zeros(shape)
    if distribution == "ones":
        return torch.ones(shape)
    if distribution == "uniform":
        return torch.rand(shape, generator=g)
    if distribution == "normal":
        return torch.randn(shape, generator=g)
    if high < 1:
        raise invalid("generate.high", f"randint needs high >= 1, got {high}", "BAD_GENERATOR")
    return torch.randint(high, shape, generator=g)


def require_finite(t: torch.Tensor, field_name: str) -> None:
    if not t.is_floating_point():
        return
    # A finite sum proves every element finite (NaN and infinity propagate through a sum) and costs
    # one pass with no temporary, a twentieth of isfinite(t).all() on a 19 MB batch; only a sum
    # that is not finite (a bad element, or an overflow) needs the exact check.
    if math.isfinite(float(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise invalid(field_name, f"{field_name} contains NaN or infinite values", "NON_FINITE_VALUES")


def require_float32(t: torch.Tensor, field_name: str) -> None:
    if t.dtype != torch.float32:
        raise invalid(field_name, f"{field_name} must be float32, got {str(t.dtype).removeprefix('torch.')}", "WRONG_DTYPE")


def to_cpu(value: object) -> object:
    """A copy of a (nested) optimizer state with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value
