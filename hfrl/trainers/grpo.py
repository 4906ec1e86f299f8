"""Critic-free, group-relative algorithms: GRPO (Shao et al. 2024), RLOO (Ahmadian et al. 2024),
REINFORCE++ and its group-baseline variant (Hu 2025). PPO's step without the critic's two lines,
with rollout.n responses per prompt and the estimator swapped:

    generate (n per prompt) -> score -> old log-probs -> reference log-probs -> advantages
    (group-relative) -> update actor (KL as a loss term when algorithm.kl_in_reward=false)
"""
from __future__ import annotations

import time

from hfrl.controller import Batch
from hfrl.trainers.base import RLTrainer


class GRPOTrainer(RLTrainer):
    algorithm = "grpo"
    estimator = "grpo"

    def step(self, prompts: Batch) -> dict[str, float]:
        start, kl_coef = time.perf_counter(), self.kl_ctrl.value
        gen = self.generator.generate(prompts, blocking=False)
        scores = self.reward.score(gen, blocking=False)
        old = self.actor.compute_log_probs(gen, blocking=False)
        ref = self.ref_log_probs(gen)
        data = self.actor.compute_advantages(gen, scores, old, ref, estimator=self.estimator, kl_coef=kl_coef,
                                             group_size=self.cfg.rollout.n, blocking=False)
        actor = self.actor.update(data, kl_coef=kl_coef, blocking=False)
        sync = self.sync_rollout()
        return self.collect(start, dict(gen=gen, scores=scores, old=old, ref=ref), data, [actor, *sync])


class RLOOTrainer(GRPOTrainer):
    algorithm = "rloo"
    estimator = "rloo"


class ReinforcePlusPlusTrainer(GRPOTrainer):
    algorithm = "reinforce_plus_plus"
    estimator = "reinforce_plus_plus"


class ReinforcePlusPlusBaselineTrainer(GRPOTrainer):
    algorithm = "reinforce_plus_plus_baseline"
    estimator = "reinforce_plus_plus_baseline"
