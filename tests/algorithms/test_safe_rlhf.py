"""Lagrange multiplier updates and the combined Safe-RLHF advantage, by hand."""
import pytest
import torch

from hfrl.algorithms import LagrangeMultiplier, safe_rlhf_advantages


def test_lagrange_update_and_projection():
    lam = LagrangeMultiplier(init=1.0, lr=0.1, cost_limit=0.0)
    assert lam.update(2.0) == pytest.approx(1.2)  # violated: 1 + 0.1 * 2
    assert lam.update(torch.tensor(-1.0)) == pytest.approx(1.1)
    assert lam.update(-20.0) == 0.0  # 1.1 - 2 projected onto lambda >= 0
    assert lam.value == 0.0
    capped = LagrangeMultiplier(init=1.0, lr=0.1, cost_limit=0.5, max_value=1.1)
    assert capped.update(2.5) == pytest.approx(1.1)  # 1.2 clipped at max_value
    restored = LagrangeMultiplier(init=0.0, lr=0.1, cost_limit=0.5)
    restored.load_state_dict(capped.state_dict())
    assert restored.value == capped.value


def test_lagrange_bad_args():
    with pytest.raises(ValueError, match="init -1"):
        LagrangeMultiplier(init=-1.0, lr=0.1, cost_limit=0.0)
    with pytest.raises(ValueError, match="lr 0"):
        LagrangeMultiplier(init=1.0, lr=0, cost_limit=0.0)


def test_safe_rlhf_advantages_literal():
    r = torch.tensor([[1.0, 2.0]])
    c = torch.tensor([[0.5, -1.0]])
    torch.testing.assert_close(safe_rlhf_advantages(r, c, 1.0), torch.tensor([[0.25, 1.5]]))
    torch.testing.assert_close(safe_rlhf_advantages(r, c, 0.0), r)
    with pytest.raises(ValueError, match="negative"):
        safe_rlhf_advantages(r, c, -0.5)
