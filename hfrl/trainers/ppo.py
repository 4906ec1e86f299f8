"""PPO (Ouyang et al. 2022; the paper's Figure 7): the step is the dataflow.

    generate -> score -> old log-probs -> reference log-probs -> values -> advantages (GAE, KL in
    the reward) -> update critic -> update actor [-> weight sync, with roles.rollout enabled]

Every call returns a Future at once; each stage's ranks fetch their rows from the ranks that
produced them. With the critic on its own pool (placement split) the critic's calls run while the
actor's do. Rank 0 reads only metrics (Future.meta and the updates' small results).
"""
from __future__ import annotations

import time

from hfrl.controller import Batch
from hfrl.trainers.base import RLTrainer


class PPOTrainer(RLTrainer):
    algorithm = "ppo"
    estimator = "gae"

    def step(self, prompts: Batch) -> dict[str, float]:
        start, kl_coef = time.perf_counter(), self.kl_ctrl.value
        gen = self.generator.generate(prompts, blocking=False)
        scores = self.reward.score(gen, blocking=False)
        old = self.actor.compute_log_probs(gen, blocking=False)
        ref = self.ref_log_probs(gen)
        values = self.critic.compute_values(gen, blocking=False)
        data = self.actor.compute_advantages(gen, scores, old, ref, values, estimator=self.estimator,
                                             kl_coef=kl_coef, blocking=False)
        critic = self.critic.update(data, blocking=False)
        actor = self.actor.update(data, kl_coef=kl_coef, blocking=False)
        sync = self.sync_rollout()
        return self.collect(start, dict(gen=gen, scores=scores, old=old, ref=ref, values=values), data,
                            [critic, actor, *sync])
