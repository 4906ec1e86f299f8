"""Safe RLHF (Dai et al. 2023): maximise reward subject to expected cost <= cost_limit, through
the Lagrangian  min_lambda>=0 max_theta  J_r(theta) - lambda * (J_c(theta) - cost_limit).

The policy is trained on the combined advantage (``safe_rlhf_advantages``), the multiplier by
projected gradient ascent on the constraint violation (``LagrangeMultiplier``).
"""
from __future__ import annotations

import torch

from hfrl.algorithms.core import check_same_shape


class LagrangeMultiplier:
    """The multiplier lambda, updated once per step from the batch's mean episode cost J_c:

        lambda <- max(0, lambda + lr * (J_c - cost_limit))      then min(lambda, max_value)

    so lambda grows while the constraint is violated and decays (down to 0) once it holds.
    """

    def __init__(self, init: float, lr: float, cost_limit: float, max_value: float | None = None):
        if init < 0:
            raise ValueError(f"Lagrange multiplier init {init} is negative; it must be >= 0")
        if lr <= 0:
            raise ValueError(f"Lagrange multiplier lr {lr} must be > 0")
        if max_value is not None and max_value < init:
            raise ValueError(f"max_value {max_value} is below init {init}; raise it or set None")
        self.value = float(init)
        self.lr = float(lr)
        self.cost_limit = float(cost_limit)
        self.max_value = None if max_value is None else float(max_value)

    def update(self, mean_episode_cost: float) -> float:
        """One projected ascent step; returns the new lambda. A tensor cost is read as a float."""
        value = max(0.0, self.value + self.lr * (float(mean_episode_cost) - self.cost_limit))
        if self.max_value is not None:
            value = min(value, self.max_value)
        self.value = value
        return value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def safe_rlhf_advantages(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor,
                         lagrange: float) -> torch.Tensor:
    """(reward_adv - lambda * cost_adv) / (1 + lambda), same shape as the inputs ((B, L) or (B,)).

    Dividing by 1 + lambda keeps the advantage scale stable as lambda grows.
    """
    check_same_shape(reward_advantages=reward_advantages, cost_advantages=cost_advantages)
    if float(lagrange) < 0:
        raise ValueError(f"lagrange {float(lagrange)} is negative; the multiplier must be >= 0")
    return (reward_advantages - lagrange * cost_advantages) / (1 + lagrange)
