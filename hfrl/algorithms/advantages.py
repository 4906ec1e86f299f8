"""Advantage estimators, registered by name.

Every estimator has one signature, so the trainer picks one by name from the config:

    advantages, returns = get_advantage(name)(
        token_rewards,          # (B, L) reward per response token (scores, KL penalty, ...)
        response_mask,          # (B, L) 0/1
        values=None,            # (B, L) critic values          (gae)
        group_index=None,       # (B,) long, one id per prompt  (grpo, rloo, reinforce_plus_plus_baseline)
        baseline=None,          # (B,) score of the greedy answer (remax)
        gamma=1.0, lam=1.0,     # discount and GAE lambda     (gae, reinforce_plus_plus)
        norm_by_std=True,       # GRPO: divide by the group std
        eps=1e-6,               # GRPO: added to the group std
        sum_all=None,           # whitening over every DP rank (gae, reinforce_plus_plus[_baseline])
    )                           # -> (B, L), (B, L), both 0 at masked positions, float32

A sequence's score is the sum of its valid token rewards (an outcome reward placed on the last
token, plus any per-token terms). Outcome estimators broadcast one advantage per row to all its
valid tokens. Rows with no valid token (padding rows) are left out of group statistics.

Group statistics use ``torch.unique(return_inverse=True)`` and ``index_add``: no Python loop over
rows or groups; GAE and the reward-to-go loop over the L time steps, vectorised over B. Results are
computed in float32 whatever the input dtype. Each rank computes its own rows: a group must not be
split across ranks, and the estimators that whiten take ``sum_all`` (an all-reduce over the DP group,
see ``masked_whiten``) so the whitening statistics are the whole batch's, as on one rank.
"""
from __future__ import annotations

from typing import Callable

import torch

from hfrl.algorithms.core import check_same_shape, masked_sum, masked_whiten, sequence_mask

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an estimator under ``name`` (which must be new)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another name")
        ADVANTAGES[name] = fn
        return fn

    return wrap


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as ``name``."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def _prepare(token_rewards: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rewards (B, L) and mask (B, L), shapes checked."""
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards has shape {tuple(token_rewards.shape)}; expected (B, L)")
    check_same_shape(token_rewards=token_rewards, response_mask=response_mask)
    return token_rewards.float(), (response_mask != 0).float()


def _check_rows(name: str, t: torch.Tensor | None, batch: int, needed_by: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"{needed_by} needs {name}; pass {name}= a (B,) tensor")
    if t.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; {needed_by} expects ({batch},)")
    return t


def _group_stats(scores: torch.Tensor, group_index: torch.Tensor, row_valid: torch.Tensor):
    """Per row, statistics of its group over the valid rows: (count, sum, unbiased std), each (B,)."""
    if group_index.is_floating_point() or group_index.is_complex():
        raise ValueError(f"group_index has dtype {group_index.dtype}; give integer ids (torch.long)")
    ids, inverse = torch.unique(group_index, return_inverse=True)  # inverse (B,) in [0, G)
    num_groups = ids.numel()
    w = row_valid.float()
    count = torch.zeros(num_groups, device=scores.device).index_add_(0, inverse, w)
    total = torch.zeros(num_groups, device=scores.device).index_add_(0, inverse, scores * w)
    mean = total / count.clamp(min=1)
    sq_dev = torch.zeros(num_groups, device=scores.device).index_add_(
        0, inverse, (scores - mean[inverse]) ** 2 * w
    )
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()
    return count[inverse], total[inverse], std[inverse]


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_row[:, None] * mask  # (B,) -> (B, L)


@register_advantage("gae")
def gae_advantages(token_rewards, response_mask, *, values=None, group_index=None, baseline=None,
                   gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's valid tokens.

    The valid tokens of a row, in order, are its episode: the step after a valid token is the next
    valid token (masked positions are skipped, so any mask works, not only right-padded ones) and the
    value after the last valid token is 0. ``returns = advantages + values`` (the critic's target);
    then the advantages, not the returns, are whitened over all valid tokens of the batch, as PPO
    implementations do.
    """
    rewards, mask = _prepare(token_rewards, response_mask)
    if values is None:
        raise ValueError("gae needs values (a critic); pass values=, or pick a critic-free estimator")
    check_same_shape(token_rewards=token_rewards, values=values)
    values = values.float()
    batch, length = rewards.shape
    next_value = torch.zeros(batch, device=rewards.device)  # value of the next valid token
    next_adv = torch.zeros(batch, device=rewards.device)
    steps = []
    for t in reversed(range(length)):
        valid = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
        steps.append(adv_t)
    advantages = torch.stack(steps[::-1], dim=1) * mask  # (B, L)
    returns = (advantages + values) * mask
    return masked_whiten(advantages, mask, sum_all=sum_all), returns


def _scores(token_rewards, response_mask):
    rewards, mask = _prepare(token_rewards, response_mask)
    return masked_sum(rewards, mask, dim=-1), mask  # (B,), (B, L)


@register_advantage("grpo")
def grpo_advantages(token_rewards, response_mask, *, values=None, group_index=None, baseline=None,
                    gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """GRPO (Shao et al. 2024): (score - group mean) / (group std + eps), std unbiased as torch.std.

    ``norm_by_std=False`` keeps only the mean subtraction (Dr. GRPO). A group with a single valid
    row has no baseline and gets advantage 0. ``returns = advantages``.
    """
    scores, mask = _scores(token_rewards, response_mask)
    _check_rows("group_index", group_index, scores.shape[0], "grpo")
    count, total, std = _group_stats(scores, group_index, sequence_mask(mask))
    per_row = scores - total / count.clamp(min=1)
    if norm_by_std:
        per_row = per_row / (std + eps)
    per_row = torch.where(count > 1, per_row, torch.zeros_like(per_row))
    advantages = _broadcast(per_row, mask)
    return advantages, advantages


@register_advantage("rloo")
def rloo_advantages(token_rewards, response_mask, *, values=None, group_index=None, baseline=None,
                    gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """RLOO (Ahmadian et al. 2024): score minus the mean of the other samples of its group,
    ``a_i = s_i - (sum_g - s_i) / (n_g - 1)``; a group of one gets 0. ``returns = advantages``.
    """
    scores, mask = _scores(token_rewards, response_mask)
    _check_rows("group_index", group_index, scores.shape[0], "rloo")
    count, total, _ = _group_stats(scores, group_index, sequence_mask(mask))
    per_row = scores - (total - scores) / (count - 1).clamp(min=1)
    per_row = torch.where(count > 1, per_row, torch.zeros_like(per_row))
    advantages = _broadcast(per_row, mask)
    return advantages, advantages


@register_advantage("remax")
def remax_advantages(token_rewards, response_mask, *, values=None, group_index=None, baseline=None,
                     gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """ReMax (Li et al. 2023): score minus ``baseline`` (the greedy response's score, per row),
    on every valid token; no whitening. ``returns = advantages``.
    """
    scores, mask = _scores(token_rewards, response_mask)
    baseline = _check_rows("baseline", baseline, scores.shape[0], "remax")
    advantages = _broadcast(scores - baseline.float(), mask)
    return advantages, advantages


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, L): sum over later valid tokens k >= t of gamma^(steps from t to k) * r_k; 0 if masked."""
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    steps = []
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t] > 0
        running = torch.where(valid, rewards[:, t] + gamma * running, running)
        steps.append(running)
    return torch.stack(steps[::-1], dim=1) * mask


@register_advantage("reinforce_plus_plus")
def reinforce_pp_advantages(token_rewards, response_mask, *, values=None, group_index=None,
                            baseline=None, gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """REINFORCE++ (Hu 2025): discounted reward-to-go over the valid tokens, whitened over the
    batch's valid tokens. ``returns`` = the reward-to-go before whitening.
    """
    rewards, mask = _prepare(token_rewards, response_mask)
    returns = _reward_to_go(rewards, mask, gamma)
    return masked_whiten(returns, mask, sum_all=sum_all), returns


@register_advantage("reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantages(token_rewards, response_mask, *, values=None, group_index=None,
                                     baseline=None, gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6, sum_all=None):
    """REINFORCE++-baseline: score minus its group's mean, on every valid token, then whitened over
    the batch's valid tokens. ``returns = advantages``.
    """
    scores, mask = _scores(token_rewards, response_mask)
    _check_rows("group_index", group_index, scores.shape[0], "reinforce_plus_plus_baseline")
    count, total, _ = _group_stats(scores, group_index, sequence_mask(mask))
    advantages = masked_whiten(_broadcast(scores - total / count.clamp(min=1), mask), mask,
                               sum_all=sum_all)
    return advantages, advantages
