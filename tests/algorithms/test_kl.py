"""KL estimators, controllers, KL-in-reward and score placement, against hand-computed numbers."""
import math

import pytest
import torch

from hfrl.algorithms import (
    KL_ESTIMATORS, AdaptiveKLController, FixedKLController, apply_kl_in_reward, build_kl_controller,
    kl_penalty, scores_to_token_rewards,
)

LP, REF = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])


def test_estimators_literal():
    assert kl_penalty(LP, REF, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(LP, REF, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(LP, REF, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)  # ratio 1/2
    assert kl_penalty(REF, LP, "k3").item() == pytest.approx(2 - math.log(2) - 1)  # ratio 2
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_k3_nonnegative_and_clamped():
    g = torch.Generator().manual_seed(0)
    lp, ref = 3 * torch.randn(64, 33, generator=g), 3 * torch.randn(64, 33, generator=g)
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert kl_penalty(torch.zeros(1, 1), torch.full((1, 1), 30.0), "k3").item() == 10.0
    x = torch.zeros(1, 1, requires_grad=True)
    kl_penalty(x, torch.full((1, 1), 1e4), "k3").sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unknown_estimator():
    with pytest.raises(ValueError, match=r"'k4'.*\('k1', 'k2', 'k3'\)"):
        kl_penalty(LP, REF, "k4")


def test_adaptive_controller_by_hand():
    c = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    c.update(9.0, 256)  # 9/6 - 1 = 0.5 -> clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    c = AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    c.update(6.6, 256)  # error 0.1, inside the clip
    assert c.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))
    c.update(torch.tensor(0.0), 1000)  # error -1 -> -0.2
    assert c.value == pytest.approx(0.1 * 1.00256 * 0.98)
    restored = AdaptiveKLController(0.5, target_kl=6.0, horizon=10000)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value


def test_fixed_controller_and_builder():
    c = build_kl_controller("fixed", 0.05)
    assert isinstance(c, FixedKLController)
    c.update(100.0, 1000)
    assert c.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(c.state_dict())
    assert other.value == 0.05
    a = build_kl_controller("adaptive", 0.2, target_kl=3.0, horizon=500)
    assert isinstance(a, AdaptiveKLController) and (a.value, a.target_kl, a.horizon) == (0.2, 3.0, 500)
    with pytest.raises(ValueError, match="needs target_kl"):
        build_kl_controller("adaptive", 0.2)
    with pytest.raises(ValueError, match="'pid'"):
        build_kl_controller("pid", 0.2)


def test_apply_kl_in_reward():
    scores = torch.tensor([[0.0, 1.0, 7.0]])
    lp = torch.full((1, 3), math.log(0.5))
    ref = torch.full((1, 3), math.log(0.25))
    mask = torch.tensor([[1, 1, 0]])
    rewards, kl = apply_kl_in_reward(scores, lp, ref, mask, coef=0.1, estimator="k1")
    k = math.log(2)
    torch.testing.assert_close(kl, torch.tensor([[k, k, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * k, 1 - 0.1 * k, 0.0]]))


def test_scores_to_token_rewards():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = scores_to_token_rewards(torch.tensor([2.0, -1.0, 5.0, 3.0]), mask)
    expected = torch.tensor([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 3.0]])
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="one score per row"):
        scores_to_token_rewards(torch.zeros(3), mask)
