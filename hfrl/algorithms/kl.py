"""KL between the actor and the reference policy: per-token estimators, coefficient controllers,
the KL penalty folded into the reward, and sequence scores placed on tokens.

The estimators take the log-probabilities of the sampled tokens, ``lp = log pi(a)`` and
``ref = log pi_ref(a)``, both (B, L), and estimate KL(pi || pi_ref) per token (Schulman,
"Approximating KL divergence", 2020):

- "k1": lp - ref                         (unbiased, high variance, can be negative)
- "k2": 0.5 * (lp - ref)^2               (biased, low variance, >= 0)
- "k3": exp(ref - lp) - (ref - lp) - 1   (unbiased, low variance, >= 0)

For numerical safety k3 clamps ``ref - lp`` to [-20, 20] before the exp (so neither the value nor
its gradient overflows) and the result to [-10, 10]; a token that far apart carries no useful
gradient anyway.
"""
from __future__ import annotations

import torch

from hfrl.algorithms.core import check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate (B, L) from ``log_probs`` and ``ref_log_probs`` (B, L); unmasked."""
    check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    if estimator == "k1":
        return log_probs - ref_log_probs
    if estimator == "k2":
        return 0.5 * (log_probs - ref_log_probs) ** 2
    if estimator == "k3":
        log_ratio = (ref_log_probs - log_probs).clamp(min=-20.0, max=20.0)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient {coef} is negative; give a coefficient >= 0")
        self.value = float(coef)

    def update(self, current_kl: float, num_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL coefficient steered towards ``target_kl`` (Ziegler et al. 2019, "Fine-tuning language
    models from human preferences", §2.2):

        error = clip(current_kl / target_kl - 1, -0.2, 0.2)
        value <- value * (1 + error * num_steps / horizon)

    ``num_steps`` is the number of samples (or steps) the observed KL covers.
    """

    def __init__(self, init_coef: float, target_kl: float, horizon: int):
        if init_coef < 0:
            raise ValueError(f"init_coef {init_coef} is negative; give a coefficient >= 0")
        if target_kl <= 0:
            raise ValueError(f"target_kl {target_kl} must be > 0 for the adaptive KL controller")
        if horizon <= 0:
            raise ValueError(f"horizon {horizon} must be > 0 for the adaptive KL controller")
        self.value = float(init_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, num_steps: int) -> None:
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def build_kl_controller(
    kind: str, coef: float, target_kl: float | None = None, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """A "fixed" controller at ``coef``, or an "adaptive" one starting at ``coef``."""
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target_kl is None:
            raise ValueError("the adaptive KL controller needs target_kl; set it or use kind 'fixed'")
        return AdaptiveKLController(coef, target_kl, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected one of {KL_CONTROLLERS}")


def apply_kl_in_reward(
    token_scores: torch.Tensor,
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the KL penalty into the per-token reward (PPO-RLHF style).

    Returns ``(token_rewards, kl)``, both (B, L) and 0 at masked positions, with
    ``token_rewards = token_scores - coef * kl``.
    """
    check_same_shape(token_scores=token_scores, log_probs=log_probs, response_mask=response_mask)
    mask = response_mask.to(log_probs.dtype)
    kl = kl_penalty(log_probs, ref_log_probs, estimator) * mask
    return (token_scores - coef * kl) * mask, kl


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's score (B,) on its last valid response token: (B, L), zeros elsewhere.

    Rows with no valid token get nothing.
    """
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"scores has shape {tuple(scores.shape)}, response_mask {tuple(response_mask.shape)}; "
            "scores must be (B,) with one score per row of the (B, L) mask"
        )
    valid = response_mask != 0  # (B, L)
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, torch.zeros_like(positions)).amax(dim=-1)  # (B,)
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    out = torch.zeros(valid.shape, dtype=dtype, device=scores.device)
    has_token = valid.any(dim=-1)
    out.scatter_(1, last[:, None], torch.where(has_token, scores.to(dtype), 0.0)[:, None])
    return out
