"""PPO clip, value, entropy and KL losses, case by case against hand-computed numbers."""
import math

import pytest
import torch

from hfrl.algorithms import entropy_loss, get_policy_loss, kl_loss, ppo_clip_loss, value_loss


def _ppo(ratio, adv, **kw):
    """One token per case: log_probs = log(ratio), old_log_probs = 0."""
    lp = torch.tensor([[math.log(r) for r in ratio]])
    return ppo_clip_loss(lp, torch.zeros_like(lp), torch.tensor([adv]), torch.ones_like(lp), **kw)


@pytest.mark.parametrize(
    "ratio,adv,loss,clipfrac,lower",
    [
        (1.1, 1.0, -1.1, 0.0, 0.0),   # A > 0, inside the clip range
        (1.5, 1.0, -1.2, 1.0, 0.0),   # A > 0, above: clipped at 1.2
        (0.5, 2.0, -1.0, 0.0, 0.0),   # A > 0, below: unclipped term is the pessimistic one
        (0.5, -1.0, 0.8, 1.0, 0.0),   # A < 0, below: clipped at 0.8
        (10.0, -1.0, 3.0, 0.0, 1.0),  # A < 0, ratio huge: dual clip bound -A * c = 3
        (2.0, -1.0, 2.0, 0.0, 0.0),   # A < 0, ratio 2 < c: dual clip not active
    ],
)
def test_ppo_clip_cases(ratio, adv, loss, clipfrac, lower):
    out, metrics = _ppo([ratio], [adv])
    assert out.item() == pytest.approx(loss, rel=1e-6)
    assert metrics["pg_clipfrac"].item() == clipfrac
    assert metrics["pg_clipfrac_lower"].item() == lower
    assert metrics["ppo_kl"].item() == pytest.approx(-math.log(ratio), rel=1e-6)


def test_ppo_dual_clip_disabled_and_asymmetric():
    out, metrics = _ppo([10.0], [-1.0], dual_clip_c=None)
    assert out.item() == pytest.approx(10.0)
    assert metrics["pg_clipfrac_lower"].item() == 0.0
    out, _ = _ppo([1.5], [1.0], clip_ratio_high=0.28)
    assert out.item() == pytest.approx(-1.28)
    out, _ = _ppo([0.5], [-1.0], clip_ratio_low=0.1)
    assert out.item() == pytest.approx(0.9)


def test_ppo_batch_clipfrac_and_masking():
    # four valid tokens (cases above) + one masked token with a huge loss
    lp = torch.tensor([[math.log(1.1), math.log(1.5), math.log(0.5)], [math.log(10.0), 50.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -100.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out, metrics = get_policy_loss("ppo_clip")(lp, torch.zeros_like(lp), adv, mask)
    assert out.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 3.0) / 4)
    assert metrics["pg_clipfrac"].item() == 0.5
    assert metrics["pg_clipfrac_lower"].item() == 0.25
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_ppo_agg_modes_ragged():
    # ratio 1 everywhere, so each token's loss is -A: rows [1, 2, 3] and [4]
    adv = -torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp = torch.zeros_like(adv)
    got = {m: ppo_clip_loss(lp, lp, adv, mask, agg_mode=m)[0].item()
           for m in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")}
    assert got == {"token-mean": 2.5, "seq-mean-token-sum": 5.0, "seq-mean-token-mean": 3.0}


def test_ppo_gradient_flows_only_through_log_probs():
    lp = torch.tensor([[0.1, -0.2]], requires_grad=True)
    out, _ = ppo_clip_loss(lp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    out.backward()
    # both ratios inside the range: d(-mean(A * exp(lp)))/d lp = -exp(lp) / 2
    torch.testing.assert_close(lp.grad, -torch.exp(lp.detach()) / 2)


def test_ppo_bad_options():
    with pytest.raises(ValueError, match="dual_clip_c 1.0 must be > 1"):
        _ppo([1.0], [1.0], dual_clip_c=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        _ppo([1.0], [1.0], clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="token-mean"):
        _ppo([1.0], [1.0], agg_mode="mean")
    with pytest.raises(ValueError, match=r"registered: \['ppo_clip'\]"):
        get_policy_loss("grpo")


@pytest.mark.parametrize(
    "v,old,ret,loss,clipfrac",
    [
        (1.0, 0.0, 2.0, 1.125, 1.0),  # clipped to 0.5: 0.5 * 1.5^2 > 0.5 * 1^2
        (1.0, 0.8, 0.0, 0.5, 0.0),    # inside the clip range: both terms equal
        (0.0, 1.0, 0.0, 0.125, 1.0),  # clipped to 0.5: 0.5 * 0.25 > 0
        (2.0, 0.0, 0.0, 2.0, 0.0),    # clipped 0.5 is nearer the return: unclipped term wins
    ],
)
def test_value_loss_cases(v, old, ret, loss, clipfrac):
    t = lambda x: torch.tensor([[x]])  # noqa: E731
    out, metrics = value_loss(t(v), t(old), t(ret), torch.ones(1, 1), clip=0.5)
    assert out.item() == pytest.approx(loss)
    assert metrics["vf_clipfrac"].item() == clipfrac


def test_value_loss_no_clip_and_mask():
    v = torch.tensor([[2.0, 0.0, 9.0]])
    out, metrics = value_loss(v, torch.zeros_like(v), torch.tensor([[0.0, 1.0, 0.0]]),
                              torch.tensor([[1, 1, 0]]), clip=0.0)
    assert out.item() == pytest.approx((0.5 * 4 + 0.5 * 1) / 2)
    assert metrics["vf_clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="value clip -1"):
        value_loss(v, v, v, torch.ones_like(v), clip=-1)


def test_entropy_and_kl_loss():
    ent = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert entropy_loss(ent, mask, "token-mean").item() == 3.0
    assert entropy_loss(ent, mask, "seq-mean-token-mean").item() == 3.5
    lp = torch.full((2, 2), math.log(0.5))
    ref = torch.full((2, 2), math.log(0.25))
    assert kl_loss(lp, ref, mask, "k1", "token-mean").item() == pytest.approx(math.log(2))
    assert kl_loss(lp, ref, mask, "k3", "seq-mean-token-sum").item() == pytest.approx(
        1.5 * (0.5 + math.log(2) - 1))
