"""ReMax (Li et al. 2024): REINFORCE with the greedy response's reward as the baseline, no critic.

    generate (sampled) -> generate (greedy, the baseline) -> score both -> old / reference log-probs
    -> advantages (score - greedy score) -> update actor
"""
from __future__ import annotations

import time

from hfrl.controller import Batch
from hfrl.trainers.base import RLTrainer


class ReMaxTrainer(RLTrainer):
    algorithm = "remax"
    estimator = "remax"

    def step(self, prompts: Batch) -> dict[str, float]:
        start, kl_coef = time.perf_counter(), self.kl_ctrl.value
        gen = self.generator.generate(prompts, blocking=False)
        greedy = self.generator.generate(prompts, greedy=True, repeat=self.cfg.rollout.n, blocking=False)
        scores = self.reward.score(gen, blocking=False)
        baseline = self.reward.score(greedy, blocking=False)
        old = self.actor.compute_log_probs(gen, blocking=False)
        ref = self.ref_log_probs(gen)
        data = self.actor.compute_advantages(gen, scores, old, ref, baseline=baseline, estimator=self.estimator,
                                             kl_coef=kl_coef, blocking=False)
        actor = self.actor.update(data, kl_coef=kl_coef, blocking=False)
        sync = self.sync_rollout()
        metrics = self.collect(start, dict(gen=gen, scores=scores, old=old, ref=ref), data, [actor, *sync])
        metrics["timing_s/gen_greedy"] = greedy.meta.get("timing_s/gen", 0.0)
        return metrics
