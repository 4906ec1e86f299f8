"""The step's training columns from its rollouts: rewards -> KL penalty -> advantages, per rank.

Tensor code on the rows one rank holds (no engine), so it is tested against hand computations; the
actor's `compute_advantages` calls it with `sum_all=dp_sum(dp_group)`, so that the estimators that
whiten (GAE, REINFORCE++) use the statistics of the whole batch over DP, as on one rank, and it
reduces the metrics over DP.

    scores (N,) at each response's last token -> token rewards (N, R)
    - kl_coef * KL(old || ref) per token        (algorithm.kl_in_reward)
    -> the estimator's advantages and returns   (GAE with values; group-relative with uid groups;
                                                 ReMax with the greedy baseline's scores)
    Safe-RLHF: (reward advantages - lambda * cost GAE) / (1 + lambda)
    -> per-token training columns (N, T)        (see common.py for the column conventions)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hfrl.algorithms import (apply_kl_in_reward, get_advantage, kl_penalty, safe_rlhf_advantages,
                             scores_to_token_rewards)
from hfrl.controller import Batch
from hfrl.distributed.env import collective_device
from hfrl.workers.common import MetricSums, to_token_columns

GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus_baseline")
"""Estimators that compare the responses of one prompt: a rank must hold every one of them."""


@dataclass
class Advantages:
    columns: dict[str, torch.Tensor]
    """The training columns (N, T): input_ids, attention_mask, loss_mask, old_log_probs,
    advantages, and values/returns, cost_values/cost_returns, ref_log_probs where used."""
    token_rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor | None
    """(N, R) KL estimate per response token (0 on padding), when a reference policy is given."""


def advantage_columns(algo, gen: Batch, scores: torch.Tensor, old_log_probs: torch.Tensor, *,
                      estimator: str, ref_log_probs: torch.Tensor | None = None,
                      values: torch.Tensor | None = None, costs: torch.Tensor | None = None,
                      cost_values: torch.Tensor | None = None, baseline: torch.Tensor | None = None,
                      kl_coef: float = 0.0, lagrange: float = 0.0, group_size: int = 1,
                      sum_all=None) -> Advantages:
    """`algo` is the AlgorithmConfig; per-response tensors are (N, R), scores (N,). `sum_all` sums over
    the DP group, so that whitening estimators whiten over the whole batch (``masked_whiten``)."""
    mask = gen["response_mask"].float()
    if estimator in GROUP_ESTIMATORS:
        check_whole_groups(gen["uid"], group_size)
    token_scores = scores_to_token_rewards(scores.float(), mask)
    kl = None
    if ref_log_probs is not None:
        kl = kl_penalty(old_log_probs, ref_log_probs, algo.kl_estimator) * mask
    token_rewards = token_scores
    if ref_log_probs is not None and algo.kl_in_reward and kl_coef > 0:
        token_rewards, _ = apply_kl_in_reward(token_scores, old_log_probs, ref_log_probs, mask, kl_coef,
                                              algo.kl_estimator)
    estimate = get_advantage(estimator)
    extra = {"sum_all": sum_all} if sum_all is not None and takes_sum_all(estimate) else {}
    advantages, returns = estimate(
        token_rewards, mask, values=values, group_index=gen["uid"], baseline=baseline,
        gamma=algo.gamma, lam=algo.lam, norm_by_std=algo.group_norm_by_std, **extra)
    columns = {"input_ids": gen["input_ids"], "attention_mask": gen["attention_mask"],
               "loss_mask": to_token_columns(mask, gen), "old_log_probs": to_token_columns(old_log_probs, gen)}
    if costs is not None:
        cost_rewards = scores_to_token_rewards(costs.float(), mask)
        cost_adv, cost_returns = get_advantage("gae")(cost_rewards, mask, values=cost_values, gamma=algo.gamma,
                                                      lam=algo.lam, sum_all=sum_all)
        advantages = safe_rlhf_advantages(advantages, cost_adv, lagrange)
        columns["cost_values"] = to_token_columns(cost_values, gen)
        columns["cost_returns"] = to_token_columns(cost_returns, gen)
    columns["advantages"] = to_token_columns(advantages, gen)
    if values is not None:
        columns["values"] = to_token_columns(values, gen)
        columns["returns"] = to_token_columns(returns, gen)
    if ref_log_probs is not None and not algo.kl_in_reward:
        columns["ref_log_probs"] = to_token_columns(ref_log_probs, gen)
    return Advantages(columns, token_rewards, advantages, returns, kl)


def step_metrics(gen: Batch, scores: torch.Tensor, old_log_probs: torch.Tensor, out: Advantages,
                 values: torch.Tensor | None = None, costs: torch.Tensor | None = None) -> MetricSums:
    """The step's reward and rollout statistics of this rank's rows (verl's names); reduce them
    over the data-parallel group."""
    mask = gen["response_mask"].float()
    seq = torch.ones(len(gen))
    metrics = MetricSums()
    metrics.add("critic/score", scores, extremes=True)
    metrics.add("critic/rewards", out.token_rewards.sum(-1), seq, extremes=True)
    metrics.add("critic/advantages", out.advantages, mask, extremes=True)
    metrics.add("critic/returns", out.returns, mask, extremes=True)
    if values is not None:
        metrics.add("critic/values", values, mask, extremes=True)
    if costs is not None:
        metrics.add("critic/cost", costs, extremes=True)
    if out.kl is not None:
        metrics.add("actor/reward_kl_penalty", out.kl, mask)
        metrics.add("actor/kl_seq", out.kl.sum(-1), seq)
    # The generation engine's log-probs against the training engine's, same weights and
    # temperature: their gap is what the PPO ratio's first step sees besides the policy change.
    metrics.add("actor/rollout_log_prob_diff", (gen["rollout_log_probs"] - old_log_probs).abs(), mask,
                extremes=True)
    response_lengths = mask.sum(-1)
    metrics.add("response_length", response_lengths, seq, extremes=True)
    metrics.add("prompt_length", gen["attention_mask"].sum(-1) - response_lengths, seq, extremes=True)
    metrics.add("response_length/clip_ratio", (response_lengths == mask.shape[1]).float(), seq)
    metrics.total("perf/total_tokens", float(gen["attention_mask"].sum()))
    metrics.total("perf/num_sequences", float(len(gen)))
    return metrics


def takes_sum_all(estimator) -> bool:
    """Whether a registered estimator takes ``sum_all`` (every built-in one does; one registered with
    the older signature is called without it, and whitens its own rows, if it whitens)."""
    params = inspect.signature(estimator).parameters.values()
    return any(p.name == "sum_all" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def dp_sum(group):
    """``sum_all`` for ``group``: an all-reduce (sum) of a small tensor on the group's collective
    device, returned where it came from; None when the group has one rank (nothing to sum)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    device = collective_device(group)

    def sum_all(t: torch.Tensor) -> torch.Tensor:
        summed = t.to(device, copy=True)
        dist.all_reduce(summed, group=group)
        return summed.to(t.device)

    return sum_all


def check_whole_groups(uid: torch.Tensor, group_size: int) -> None:
    """Group estimators compare a prompt's responses: this rank must hold all group_size of each."""
    _, counts = torch.unique(uid, return_counts=True)
    if (counts != group_size).any():
        raise ValueError(f"this rank holds {counts.tolist()} responses of its prompts, not all "
                         f"rollout.n={group_size} of each: make data.train_batch_size divisible by the "
                         "actor's data-parallel size so each rank gets whole prompts")
