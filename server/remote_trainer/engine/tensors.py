"""Tensor helpers of the engine: statistics, generated inputs, and the checks every input passes."""

from __future__ import annotations

import math
from collections.abc import Callable

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


# On the CPU the statistics read each tensor in slices of this many elements (512 KiB of float32,
# within a core's L2 cache): norm, min/max and sum then read a slice from the cache after the first
# of them brought it in, instead of making three passes over memory. Measured on resnet18's 62
# gradients (46.8 MB, one thread): 11 ms against 15 ms for three whole-tensor passes.
_SLICE = 1 << 17


def tensors_stats(ts: list[torch.Tensor]) -> list[Stats]:
    """``tensor_stats`` of many tensors at once, with the same numbers (to float rounding) and one
    host synchronisation for all (not four per tensor). On the CPU each tensor is reduced slice by
    slice (see ``_SLICE``); elsewhere the norms come from one multi-tensor kernel
    (``torch._foreach_norm``) and min/max and the sum from one kernel each per tensor."""
    fs = [t.detach().float() for t in ts]
    present = [f.reshape(-1) for f in fs if f.numel()]
    parts: list[list[torch.Tensor]] = []  # per tensor: [norm, min, max, sum] of each of its slices
    if present and present[0].device.type == "cpu":
        for f in present:
            pieces = [f[i : i + _SLICE] for i in range(0, f.numel(), _SLICE)]
            parts.append([torch.stack([torch.linalg.vector_norm(p), *torch.aminmax(p), p.sum()]) for p in pieces])
    elif present:
        norms = torch._foreach_norm(present)
        parts = [[torch.stack([n, *torch.aminmax(f), f.sum()])] for n, f in zip(norms, present)]
    counts = [len(p) for p in parts]
    flat = torch.stack([row for p in parts for row in p]).tolist() if parts else []
    out = []
    start = 0
    rows = iter(range(len(counts)))
    for f in fs:
        if not f.numel():
            out.append(Stats(0.0, math.nan, math.nan, math.nan, 0, 0))
            continue
        i = next(rows)
        slices = flat[start : start + counts[i]]
        start += counts[i]
        norm = math.sqrt(_total([r[0] * r[0] for r in slices])) if len(slices) > 1 else slices[0][0]
        lo, hi = _extreme(min, [r[1] for r in slices]), _extreme(max, [r[2] for r in slices])
        mean = _total([r[3] for r in slices]) / f.numel()
        non_finite = 0 if math.isfinite(norm) else int((~torch.isfinite(f)).sum())
        out.append(Stats(norm, lo, hi, mean, non_finite, f.numel()))
    return out


def _total(xs: list[float]) -> float:
    """The sum of the slices' sums: exact (``fsum``) when finite; else as torch's sum would be
    (infinities of both signs make NaN, which ``fsum`` refuses)."""
    return math.fsum(xs) if all(math.isfinite(x) for x in xs) else sum(xs)


def _extreme(pick: Callable[[list[float]], float], xs: list[float]) -> float:
    """The slices' min (or max), NaN when any slice has one, as torch's ``aminmax`` over the whole
    tensor (Python's ``min`` and ``max`` would skip a NaN after the first slice)."""
    return math.nan if any(math.isnan(x) for x in xs) else pick(xs)


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


def global_norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm over all ``tensors`` together (of gradients: the global gradient norm), in one
    fused per-tensor pass (``torch._foreach_norm``)."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm([t if t.dtype == torch.float32 else t.float() for t in tensors])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


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
