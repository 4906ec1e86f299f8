"""RL algorithms as pure per-rank tensor functions, registered by name (see each module)."""
from hfrl.algorithms.advantages import ADVANTAGES, get_advantage, register_advantage
from hfrl.algorithms.core import (
    AGG_MODES,
    agg_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_mask,
)
from hfrl.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    build_kl_controller,
    kl_penalty,
    scores_to_token_rewards,
)
from hfrl.algorithms.losses import (
    POLICY_LOSSES,
    entropy_loss,
    get_policy_loss,
    kl_loss,
    ppo_clip_loss,
    register_policy_loss,
    value_loss,
)
from hfrl.algorithms.safe_rlhf import LagrangeMultiplier, safe_rlhf_advantages

__all__ = [
    "ADVANTAGES", "AGG_MODES", "KL_ESTIMATORS", "POLICY_LOSSES",
    "AdaptiveKLController", "FixedKLController", "LagrangeMultiplier",
    "agg_loss", "apply_kl_in_reward", "build_kl_controller", "entropy_loss", "get_advantage",
    "get_policy_loss", "kl_loss", "kl_penalty", "masked_mean", "masked_sum", "masked_var",
    "masked_whiten", "ppo_clip_loss", "register_advantage", "register_policy_loss",
    "safe_rlhf_advantages", "scores_to_token_rewards", "sequence_mask", "value_loss",
]
