"""Masked reductions over response tokens, and the loss aggregation modes.

Every per-token tensor here is (B, L) over response tokens with a ``mask`` (B, L) of 0/1 (float,
int or bool). Masked positions never contribute, whatever value they hold. These are per-rank
functions, except ``masked_whiten``, which takes a ``sum_all`` to whiten over every DP rank's tokens.

Empty selections never raise and never sync the device: a mean over no tokens is 0 and a variance
over fewer than two tokens is 0, so a degenerate batch yields zeros instead of NaN.
"""
from __future__ import annotations

from typing import Callable

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all given tensors have one shape; names them in the message."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; these must all be the same (B, L)")


def _as_weight(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1: a scalar (dim None) or reduced over ``dim``."""
    w = _as_weight(mask, x)
    return (x * w).sum() if dim is None else (x * w).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 where there are none."""
    # Count in float32 at least: bf16 holds integers exactly only up to 256.
    weight = mask.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    count = weight.sum() if dim is None else weight.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance (scalar) of ``x`` over all positions where ``mask`` is 1.

    ``unbiased`` divides by n - 1 (Bessel). Fewer than two valid tokens give 0.
    """
    mean = masked_mean(x, mask)
    n = _as_weight(mask, x).sum()
    sq_sum = masked_sum((x - mean) ** 2, mask)
    if unbiased:
        return torch.where(n > 1, sq_sum / (n - 1).clamp(min=1), torch.zeros_like(sq_sum))
    return sq_sum / n.clamp(min=1)


SumAll = Callable[[torch.Tensor], torch.Tensor]
"""Sums a small float64 tensor over the data-parallel ranks (an all-reduce) and returns the sum."""


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    sum_all: SumAll | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased var over the valid tokens.

    ``shift_mean=False`` adds the mean back (scale only). Masked positions come out 0.
    ``sum_all``: the mean and var are those of every data-parallel rank's valid tokens together
    (two all-reduces of float64 sums, the second of squared deviations from the global mean), so
    the batch is whitened as if one rank held all of it, whatever the DP size; None: this rank's
    tokens only. Shape: same as ``x``.
    """
    w = _as_weight(mask, x).double()
    x64 = x.double()
    stats = torch.stack([(x64 * w).sum(), w.sum()])  # sum, count
    if sum_all is not None:
        stats = sum_all(stats)
    count = stats[1]
    mean = stats[0] / count.clamp(min=1)
    sq_dev = ((x64 - mean) ** 2 * w).sum()[None]
    if sum_all is not None:
        sq_dev = sum_all(sq_dev)
    var = torch.where(count > 1, sq_dev[0] / (count - 1).clamp(min=1), torch.zeros_like(count))
    dtype = x.dtype if x.is_floating_point() else torch.float32   # integer scores whiten to floats
    mean, inv_std = mean.to(dtype), torch.rsqrt(var + eps).to(dtype)
    whitened = (x.to(dtype) - mean) * inv_std
    if not shift_mean:
        whitened = whitened + mean
    return whitened * _as_weight(mask, whitened)


def sequence_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of ``mask`` (B, L) with at least one valid token."""
    return (mask != 0).any(dim=-1)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a per-token loss (B, L) to a scalar.

    - "token-mean": sum(loss * mask) / sum(mask); every token weighs the same.
    - "seq-mean-token-sum": mean over rows with >= 1 token of each row's token sum.
    - "seq-mean-token-mean": mean over rows with >= 1 token of each row's token mean; every
      sequence weighs the same, whatever its length.

    Rows with no valid token are ignored by all three modes.
    """
    check_same_shape(loss_mat=loss_mat, mask=mask)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-sum":
        per_seq = masked_sum(loss_mat, mask, dim=-1)  # (B,)
    elif mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)  # (B,)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    return masked_mean(per_seq, sequence_mask(mask))
