"""Actor and critic losses: per-token terms (B, L) reduced by ``agg_loss``.

Policy losses are registered by name and share the call

    loss, metrics = get_policy_loss(name)(log_probs, old_log_probs, advantages, response_mask, **options)

with every tensor (B, L) over response tokens; ``loss`` is a scalar and ``metrics`` maps names to
detached 0-dim tensors (``float()`` them when logging). Per-rank: the caller weights and reduces
across DP ranks.
"""
from __future__ import annotations

from typing import Callable

import torch

from hfrl.algorithms.core import agg_loss, check_same_shape, masked_mean
from hfrl.algorithms.kl import kl_penalty

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss under ``name`` (which must be new)."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered; pick another name")
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as ``name``."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
    agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017) with optional dual clip (Ye et al. 2020).

    Per token, with ratio = exp(log_probs - old_log_probs) and A the advantage:

        clipped = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
        loss    = min(clipped, -A * dual_clip_c)  where A < 0, else clipped

    The dual clip bounds the loss of a negative-advantage token whose ratio has blown up;
    ``dual_clip_c`` (> 1) None disables it. The log-ratio is clamped to [-20, 20] before the exp.

    Metrics (masked means over valid tokens): "pg_clipfrac" (the clipped term was the larger one),
    "pg_clipfrac_lower" (the dual-clip bound was active), "ppo_kl" (mean of old - new log-prob).
    """
    check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages,
                     response_mask=response_mask)
    if not 0 <= clip_ratio_low < 1:
        raise ValueError(f"clip_ratio_low {clip_ratio_low} must be in [0, 1) (the ratio floor is 1 - it)")
    if clip_ratio_high < 0:
        raise ValueError(f"clip_ratio_high {clip_ratio_high} must be >= 0")
    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c {dual_clip_c} must be > 1, or None to disable the dual clip")
    log_ratio = (log_probs - old_log_probs).clamp(min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    surrogate = -advantages * ratio
    surrogate_clipped = -advantages * ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_tok = torch.maximum(surrogate, surrogate_clipped)
    clip_active = surrogate_clipped > surrogate
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual_active = (advantages < 0) & (loss_tok > bound)
        loss_tok = torch.where(dual_active, bound, loss_tok)
    else:
        dual_active = torch.zeros_like(clip_active)
    metrics = {
        "pg_clipfrac": masked_mean(clip_active.float(), response_mask).detach(),
        "pg_clipfrac_lower": masked_mean(dual_active.float(), response_mask).detach(),
        "ppo_kl": masked_mean(-log_ratio, response_mask).detach(),
    }
    return agg_loss(loss_tok, response_mask, agg_mode), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip: float = 0.5,
    agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, all tensors (B, L):

        0.5 * max((v - R)^2, (clip(v, old - clip, old + clip) - R)^2)

    ``clip == 0`` disables clipping: 0.5 * (v - R)^2. Metric "vf_clipfrac": fraction of valid
    tokens where the clipped term was the larger one.
    """
    check_same_shape(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    if clip < 0:
        raise ValueError(f"value clip {clip} is negative; give clip > 0, or 0 to disable clipping")
    err = (values - returns) ** 2
    if clip == 0:
        loss_tok, clip_active = err, torch.zeros_like(err, dtype=torch.bool)
    else:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (clipped - returns) ** 2
        loss_tok, clip_active = torch.maximum(err, err_clipped), err_clipped > err
    metrics = {"vf_clipfrac": masked_mean(clip_active.float(), response_mask).detach()}
    return agg_loss(0.5 * loss_tok, response_mask, agg_mode), metrics


def entropy_loss(entropy: torch.Tensor, response_mask: torch.Tensor,
                 agg_mode: str = "token-mean") -> torch.Tensor:
    """Aggregated entropy (B, L) -> scalar; the caller subtracts ``coef * entropy_loss``."""
    return agg_loss(entropy, response_mask, agg_mode)


def kl_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, response_mask: torch.Tensor,
            estimator: str = "k3", agg_mode: str = "token-mean") -> torch.Tensor:
    """KL(actor || reference) as a loss term (GRPO style), aggregated to a scalar; the caller adds
    ``coef * kl_loss``.
    """
    return agg_loss(kl_penalty(log_probs, ref_log_probs, estimator), response_mask, agg_mode)
