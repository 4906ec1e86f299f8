"""Advantage estimators: GAE against a plain double loop, the outcome estimators against numbers
worked out by hand."""
import pytest
import torch

from hfrl.algorithms import ADVANTAGES, get_advantage, masked_mean, masked_var

# Two groups, scores [1, 0, 0, 1] (group 7) and [1, 1, 1, 0] (group 3); the score sits on the last
# valid token of a ragged right-padded row.
LENGTHS = [3, 1, 2, 4, 4, 2, 3, 1]
SCORES = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
GROUPS = [7, 7, 7, 7, 3, 3, 3, 3]


def _batch(lengths=LENGTHS, scores=SCORES, width=4):
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards = torch.full((len(lengths), width), 5.0)  # junk at masked positions must be ignored
    rewards = torch.where(mask > 0, torch.zeros_like(rewards), rewards)
    for i, (n, s) in enumerate(zip(lengths, scores)):
        rewards[i, n - 1] = s
    return rewards, mask


def _outcome(name, rewards, mask, **kw):
    adv, ret = get_advantage(name)(rewards, mask, **kw)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    per_row = adv.sum(-1) / mask.sum(-1).clamp(min=1)
    torch.testing.assert_close(adv, per_row[:, None] * mask)  # one value broadcast per row
    return per_row, ret


def _gae_reference(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[i, t] > 0]
        last = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_v = values[i, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.9, 1.0)])
def test_gae_matches_double_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 4, 0, 5]
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = _gae_reference(rewards, values, mask, gamma, lam)
    adv, ret = get_advantage("gae")(rewards, mask, values=values, gamma=gamma, lam=lam)
    torch.testing.assert_close(ret, (ref + values) * mask)
    valid = ref[mask > 0]
    torch.testing.assert_close(adv[mask > 0], (valid - valid.mean()) / (valid.var() + 1e-8).sqrt())
    assert (adv[mask == 0] == 0).all()
    assert masked_mean(adv, mask).abs().item() < 1e-6
    assert masked_var(adv, mask).item() == pytest.approx(1.0, abs=1e-5)
    if gamma == lam == 1.0:  # returns = reward-to-go, whatever the values
        rtg = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
        torch.testing.assert_close(ret, rtg)


def test_gae_general_mask_skips_holes():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]]).float()
    rewards, values = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    _, ret = get_advantage("gae")(rewards, mask, values=values, gamma=0.9, lam=0.8)
    ref = _gae_reference(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(ret, (ref + values) * mask)


def test_grpo_literal():
    rewards, mask = _batch()
    adv, ret = _outcome("grpo", rewards, mask, group_index=torch.tensor(GROUPS), eps=0.0)
    s = 3 ** 0.5 / 2  # group 7: mean 0.5, std sqrt(1/3) -> +-0.5 / sqrt(1/3)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0.5, 0.5, 0.5, -1.5]))  # group 3: std 0.5
    adv, _ = _outcome("grpo", rewards, mask, group_index=torch.tensor(GROUPS), norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    adv, _ = _outcome("grpo", rewards, mask, group_index=torch.tensor(GROUPS))  # default eps 1e-6
    torch.testing.assert_close(adv[4], torch.tensor(0.25 / (0.5 + 1e-6)))


def test_grpo_singleton_and_padding_rows():
    rewards, mask = _batch(lengths=[2, 2, 3, 1], scores=[1.0, 0.0, 4.0, 2.0])
    mask[3] = 0  # a padding row in group 5: left out of the group's statistics
    adv, _ = _outcome("grpo", rewards, mask, group_index=torch.tensor([0, 0, 5, 5]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([2 ** -0.5, -(2 ** -0.5), 0.0, 0.0]))


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_group_order_does_not_matter(name):
    rewards, mask = _batch()
    groups = torch.tensor(GROUPS)
    base, _ = get_advantage(name)(rewards, mask, group_index=groups)
    for order in (torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]), torch.randperm(8, generator=torch.Generator().manual_seed(3))):
        adv, _ = get_advantage(name)(rewards[order], mask[order], group_index=groups[order])
        torch.testing.assert_close(adv, base[order])


def test_rloo_literal():
    rewards, mask = _batch()
    adv, ret = _outcome("rloo", rewards, mask, group_index=torch.tensor(GROUPS))
    t = 2 / 3  # group 7, sum 2: 1 - 1/3, 0 - 2/3; group 3, sum 3: 1 - 2/3, 0 - 3/3
    torch.testing.assert_close(adv, torch.tensor([t, -t, -t, t, 1 / 3, 1 / 3, 1 / 3, -1.0]))
    adv, _ = _outcome("rloo", rewards[:3], mask[:3], group_index=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]))  # singleton -> 0


def test_remax_literal():
    rewards, mask = _batch(lengths=[2, 3], scores=[1.0, 0.5])
    adv, ret = _outcome("remax", rewards, mask, baseline=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5]))


def test_reinforce_pp_literal():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv, ret = get_advantage("reinforce_plus_plus")(rewards, mask, gamma=0.5)
    expected = torch.tensor([[1.5, 1.0, 2.0, 0.0], [0.125, 0.25, 0.5, 1.0]])
    torch.testing.assert_close(ret, expected)
    valid = expected[mask > 0]
    torch.testing.assert_close(adv[mask > 0], (valid - valid.mean()) / (valid.var() + 1e-8).sqrt())
    assert adv[0, 3] == 0


def test_reinforce_pp_baseline_literal():
    rewards, mask = _batch(lengths=[1, 2, 1], scores=[3.0, 1.0, 5.0])
    adv, ret = get_advantage("reinforce_plus_plus_baseline")(rewards, mask, group_index=torch.tensor([0, 0, 1]))
    # minus group means: [1, -1 (x2 tokens), 0]; token values 1, -1, -1, 0: mean -0.25, var 0.91667
    tokens = torch.tensor([1.0, -1.0, -1.0, 0.0])
    torch.testing.assert_close(adv[mask > 0], (tokens + 0.25) / (11 / 12 + 1e-8) ** 0.5)
    torch.testing.assert_close(ret, adv)


def test_bad_inputs():
    rewards, mask = _batch()
    with pytest.raises(ValueError, match="registered: .*'gae'.*'grpo'"):
        get_advantage("ppo")
    with pytest.raises(ValueError, match="gae needs values"):
        get_advantage("gae")(rewards, mask)
    for name in ("grpo", "rloo", "reinforce_plus_plus_baseline"):
        with pytest.raises(ValueError, match=f"{name} needs group_index"):
            get_advantage(name)(rewards, mask)
    with pytest.raises(ValueError, match="remax needs baseline"):
        get_advantage("remax")(rewards, mask)
    with pytest.raises(ValueError, match=r"expects \(8,\)"):
        get_advantage("grpo")(rewards, mask, group_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer ids"):
        get_advantage("grpo")(rewards, mask, group_index=torch.zeros(8))
    with pytest.raises(ValueError, match="shape mismatch"):
        get_advantage("gae")(rewards, mask, values=rewards[:, :2])
    assert set(ADVANTAGES) == {"gae", "grpo", "rloo", "remax", "reinforce_plus_plus",
                               "reinforce_plus_plus_baseline"}
