"""The step's training columns (hfrl.workers.advantage) and the critic's loss, against hand
computations: which column holds which token, and which row gets which score."""
from __future__ import annotations

import math

import pytest
import torch

from hfrl.config import AlgorithmConfig
from hfrl.controller import Batch
from hfrl.workers.advantage import advantage_columns, check_whole_groups, step_metrics
from hfrl.workers.common import response_from_shifted, response_from_states, to_token_columns
from hfrl.workers.critic import critic_loss


def rollout(response_mask, uid=None, width_prompt=3):
    """N rows: a left-padded prompt of width 3 (first row's prompt one token shorter), responses of R
    columns right-padded by response_mask. Token ids count up so every position is distinct."""
    response_mask = torch.tensor(response_mask)
    N, R = response_mask.shape
    prompt_mask = torch.ones(N, width_prompt, dtype=torch.long)
    prompt_mask[0, 0] = 0
    ids = torch.arange(N * (width_prompt + R)).reshape(N, -1)
    return Batch({"input_ids": ids, "attention_mask": torch.cat([prompt_mask, response_mask], 1),
                  "response_mask": response_mask, "rollout_log_probs": torch.zeros(N, R),
                  "uid": torch.tensor(uid if uid is not None else list(range(N)))})


def test_columns_line_up_with_the_tokens():
    gen = rollout([[1, 1], [1, 0]])                       # P = 3, R = 2, T = 5
    shifted = torch.arange(2 * 4, dtype=torch.float).reshape(2, 4)   # column t predicts token t + 1
    # response token j is token P + j = 3 + j, predicted by column 2 + j; padding zeroed
    assert response_from_shifted(shifted, gen).tolist() == [[2.0, 3.0], [6.0, 0.0]]
    states = torch.arange(2 * 5, dtype=torch.float).reshape(2, 5)     # value of the state after token t
    assert response_from_states(states, gen).tolist() == [[2.0, 3.0], [7.0, 0.0]]
    per_token = to_token_columns(torch.tensor([[10.0, 11.0], [12.0, 0.0]]), gen)
    assert per_token.tolist() == [[0, 0, 0, 10, 11], [0, 0, 0, 12, 0]]
    # the engine's outputs stay on its device (CUDA under NCCL; "meta" stands in for it here) while
    # the batch's mask is on the host: the mask goes to the outputs' device
    on_device = response_from_shifted(torch.zeros(2, 4, device="meta", dtype=torch.bfloat16), gen)
    assert on_device.device.type == "meta" and on_device.shape == (2, 2) and on_device.dtype == torch.bfloat16


def test_remax_rows_get_their_own_baseline():
    gen = rollout([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = advantage_columns(AlgorithmConfig(), gen, torch.tensor([1.0, 0.5, 0.0]), torch.zeros(3, 3),
                            estimator="remax", baseline=torch.tensor([0.25, 1.0, -1.0]))
    assert out.advantages.tolist() == [[0.75, 0.75, 0.0], [-0.5, -0.5, -0.5], [1.0, 0.0, 0.0]]
    assert out.columns["advantages"][:, 3:].tolist() == out.advantages.tolist()
    assert out.columns["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]


def test_ppo_kl_in_the_reward_and_gae_returns():
    """k1 KL per token subtracted from every response token's reward, the score added at the last
    token; gamma = lam = 1 makes the returns the reward-to-go (values 0)."""
    algo = AlgorithmConfig(kl_estimator="k1")
    gen = rollout([[1, 1, 1], [1, 1, 0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    out = advantage_columns(algo, gen, torch.tensor([1.0, 2.0]), old, estimator="gae", ref_log_probs=ref,
                            values=torch.zeros(2, 3), kl_coef=0.1)
    kl = [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]
    assert out.kl.tolist() == kl
    expected_rewards = [[-0.05, 0.0, 1.1], [-0.1, 2.0, 0.0]]
    assert torch.allclose(out.token_rewards, torch.tensor(expected_rewards))
    assert torch.allclose(out.returns, torch.tensor([[1.05, 1.1, 1.1], [1.9, 2.0, 0.0]]))
    valid = gen["response_mask"].bool()
    assert abs(float(out.advantages[valid].mean())) < 1e-6       # whitened over the valid tokens
    assert torch.equal(out.columns["returns"][:, 3:], out.returns)


def test_grpo_groups_sum_to_zero_and_must_be_whole():
    gen = rollout([[1, 1]] * 4, uid=[7, 7, 9, 9])
    out = advantage_columns(AlgorithmConfig(), gen, torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.zeros(4, 2),
                            estimator="grpo", group_size=2)
    per_row = out.advantages[:, 0]
    assert per_row[:2].sum().abs() < 1e-6 and per_row[0] > 0 and per_row[2:].abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"holds \[2, 1\] responses .* not all rollout.n=2"):
        check_whole_groups(torch.tensor([7, 7, 9]), 2)


def test_safe_rlhf_combines_reward_and_cost_advantages():
    from hfrl.algorithms import get_advantage

    algo = AlgorithmConfig(gamma=1.0, lam=0.9)
    gen = rollout([[1, 1, 1], [1, 1, 0]])
    values, cost_values = torch.tensor([[0.1, 0.2, 0.3], [0.0, -0.1, 0]]), torch.tensor([[0.5, 0, 0], [1, 1, 0]])
    scores, costs = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    out = advantage_columns(algo, gen, scores, torch.zeros(2, 3), estimator="gae", values=values, costs=costs,
                            cost_values=cost_values, lagrange=3.0)
    mask = gen["response_mask"].float()
    reward_adv, _ = get_advantage("gae")(torch.tensor([[0, 0, 1.0], [0, 0.0, 0]]), mask, values=values, lam=0.9)
    cost_adv, cost_ret = get_advantage("gae")(torch.tensor([[0, 0, 0.0], [0, 2.0, 0]]), mask, values=cost_values,
                                              lam=0.9)
    assert torch.allclose(out.advantages, (reward_adv - 3.0 * cost_adv) / 4.0)
    assert torch.equal(out.columns["cost_returns"][:, 3:], cost_ret)
    assert torch.equal(out.columns["cost_values"][:, 3:], cost_values)


def test_critic_loss_compares_the_state_before_each_token_with_its_return():
    # T = 4; token 3 is the only response token: its value is the model's output at position 2
    values = torch.tensor([[9.0, 9.0, 2.0, 9.0]])
    mb = {"loss_mask": torch.tensor([[0, 0, 0, 1]]), "values": torch.tensor([[0.0, 0.0, 0.0, 2.0]]),
          "returns": torch.tensor([[0.0, 0.0, 0.0, 5.0]])}
    loss, metrics = critic_loss(values, mb, clip=0.0)
    assert math.isclose(float(loss), 0.5 * (2.0 - 5.0) ** 2)
    loss, metrics = critic_loss(torch.tensor([[9.0, 9.0, 4.0, 9.0]]), mb, clip=0.5)
    # clipped prediction 2.5: max(0.5*(4-5)^2, 0.5*(2.5-5)^2) = 3.125
    assert math.isclose(float(loss), 3.125) and float(metrics["vf_clipfrac"]) == 1.0


def test_step_metrics_totals_and_means():
    gen = rollout([[1, 1], [1, 0]])
    old = torch.zeros(2, 2)
    out = advantage_columns(AlgorithmConfig(), gen, torch.tensor([1.0, 0.0]), old, estimator="remax",
                            baseline=torch.zeros(2))
    metrics = step_metrics(gen, torch.tensor([1.0, 0.0]), old, out).reduce()
    assert metrics["critic/score/mean"] == 0.5 and metrics["critic/score/max"] == 1.0
    assert metrics["response_length/mean"] == 1.5 and metrics["response_length/max"] == 2.0
    assert metrics["prompt_length/mean"] == 2.5        # 2 and 3 prompt tokens
    assert metrics["perf/total_tokens"] == 8.0 and metrics["perf/num_sequences"] == 2.0
    assert metrics["response_length/clip_ratio/mean"] == 0.5


WHITENING = ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def _whitening_batch():
    """8 rows of ragged responses (groups of 2 ids), rewards and values; rows 0-2 go to rank 0, 3-7 to
    rank 1, so the ranks hold different numbers of rows and of valid tokens."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([2, 7, 4, 6, 1, 5, 3, 7])
    mask = (torch.arange(7)[None] < lengths[:, None]).float()
    rewards = torch.randn(8, 7, generator=g) * mask
    values = torch.randn(8, 7, generator=g) * mask
    uid = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])   # whole groups on each rank: [0 0 0] [1 1 2 2 3]
    return rewards, mask, values, uid


def _dp_whitening(rank, world_size):
    import torch.distributed as dist

    from hfrl.algorithms import get_advantage
    from hfrl.workers.advantage import dp_sum

    rewards, mask, values, uid = _whitening_batch()
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    sum_all = dp_sum(dist.group.WORLD)
    out = {}
    for name in WHITENING:
        kwargs = dict(values=values[rows], group_index=uid[rows], gamma=0.9, lam=0.8)
        out[name] = get_advantage(name)(rewards[rows], mask[rows], sum_all=sum_all, **kwargs)[0]
        out[name + "/local"] = get_advantage(name)(rewards[rows], mask[rows], **kwargs)[0]
    out["safe_rlhf"] = _safe_rlhf_columns(rows, sum_all).advantages   # the worker's path, reward and cost GAE
    return out


def _safe_rlhf_columns(rows, sum_all):
    rewards, mask, values, uid = _whitening_batch()
    gen = rollout(mask[rows].long().tolist())
    scores, costs = rewards[rows].sum(-1), values[rows].sum(-1)
    return advantage_columns(AlgorithmConfig(gamma=0.9, lam=0.8), gen, scores, torch.zeros_like(mask[rows]),
                             estimator="gae", values=values[rows], costs=costs, cost_values=rewards[rows],
                             lagrange=0.5, sum_all=sum_all)


def test_whitening_over_dp_ranks_equals_one_rank():
    """GAE and REINFORCE++ whiten over the whole batch: 2 ranks holding 3 and 5 rows (unequal token
    counts) give the advantages of one rank holding all 8, not each rank's own whitening."""
    from hfrl.algorithms import get_advantage
    from tests.multiproc import run_ranks

    rewards, mask, values, uid = _whitening_batch()
    per_rank = run_ranks(2, _dp_whitening, init=True, timeout=120)
    for name in WHITENING:
        whole = get_advantage(name)(rewards, mask, values=values, group_index=uid, gamma=0.9, lam=0.8)[0]
        split = torch.cat([per_rank[0][name], per_rank[1][name]])
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
        local = torch.cat([per_rank[0][name + "/local"], per_rank[1][name + "/local"]])
        assert not torch.allclose(local, whole, atol=1e-3), name   # the case tells the two apart
        valid = mask.bool()
        assert abs(float(split[valid].mean())) < 1e-5 and abs(float(split[valid].std()) - 1) < 1e-4
    whole = _safe_rlhf_columns(slice(0, 8), None).advantages
    torch.testing.assert_close(torch.cat([per_rank[0]["safe_rlhf"], per_rank[1]["safe_rlhf"]]), whole,
                               rtol=1e-5, atol=1e-6)


def test_an_estimator_registered_with_the_older_signature_still_runs():
    """Custom estimators registered before ``sum_all`` existed are called without it (at any DP size)."""
    from hfrl.algorithms import ADVANTAGES, register_advantage
    from hfrl.workers.advantage import takes_sum_all

    @register_advantage("test_old_signature")
    def old(token_rewards, response_mask, *, values=None, group_index=None, baseline=None,
            gamma=1.0, lam=1.0, norm_by_std=True, eps=1e-6):
        return token_rewards * 2, token_rewards

    try:
        assert not takes_sum_all(old) and takes_sum_all(ADVANTAGES["gae"])
        gen = rollout([[1, 1], [1, 0]])
        out = advantage_columns(AlgorithmConfig(), gen, torch.tensor([1.0, 3.0]), torch.zeros(2, 2),
                                estimator="test_old_signature", sum_all=lambda t: t)
        assert out.advantages.tolist() == [[0.0, 2.0], [6.0, 0.0]]
    finally:
        del ADVANTAGES["test_old_signature"]
