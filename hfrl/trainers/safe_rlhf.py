"""Safe-RLHF (Dai et al. 2024): PPO with a cost model, a cost critic and a Lagrange multiplier.

    generate -> reward and cost scores -> old / reference log-probs -> reward values and cost
    values -> multiplier update from the batch's mean cost -> advantages (reward GAE - lambda * cost
    GAE) / (1 + lambda) -> update both critics -> update actor

The multiplier lives on rank 0 (one number): lambda <- max(0, lambda + lr * (mean cost - limit)).
"""
from __future__ import annotations

import time

from hfrl.algorithms import LagrangeMultiplier
from hfrl.controller import Batch
from hfrl.trainers.base import RLTrainer
from hfrl.workers import CriticWorker, RewardModelWorker


class SafeRLHFTrainer(RLTrainer):
    algorithm = "safe_rlhf"
    estimator = "gae"

    def build_workers(self) -> None:
        super().build_workers()
        algo = self.cfg.algorithm
        self.cost = self.role_group(RewardModelWorker, "cost", self.engine_cfg("cost"), "cost")
        # the cost critic shares the critic's pool and layout; it starts from the cost model
        cost_critic_cfg = self.engine_cfg("critic")
        cost_critic_cfg.model_path, cost_critic_cfg.init_missing_value_head = self.engine_cfg("cost").model_path, True
        self.cost_critic = self.role_group(CriticWorker, "critic", cost_critic_cfg, algo,
                                           num_mini_batches=self.num_mini_batches, label="cost_critic",
                                           name="cost_critic")
        self.lagrange = LagrangeMultiplier(algo.lagrangian_init, algo.lagrangian_lr, algo.cost_limit)

    def trainable(self):
        return {**super().trainable(), "cost_critic": self.cost_critic}

    def step(self, prompts: Batch) -> dict[str, float]:
        start, kl_coef = time.perf_counter(), self.kl_ctrl.value
        gen = self.generator.generate(prompts, blocking=False)
        scores = self.reward.score(gen, blocking=False)
        costs = self.cost.score(gen, blocking=False)
        old = self.actor.compute_log_probs(gen, blocking=False)
        ref = self.ref_log_probs(gen)
        values = self.critic.compute_values(gen, blocking=False)
        cost_values = self.cost_critic.compute_values(gen, blocking=False)
        lagrange = self.lagrange.update(self.mean_cost(costs))
        data = self.actor.compute_advantages(gen, scores, old, ref, values, costs, cost_values,
                                             estimator=self.estimator, kl_coef=kl_coef, lagrange=lagrange,
                                             blocking=False)
        critic = self.critic.update(data, blocking=False)
        cost_critic = self.cost_critic.update(data, values_key="cost_values", returns_key="cost_returns",
                                              prefix="cost_critic", blocking=False)
        actor = self.actor.update(data, kl_coef=kl_coef, blocking=False)
        sync = self.sync_rollout()
        metrics = self.collect(start, dict(gen=gen, scores=scores, costs=costs, old=old, ref=ref, values=values,
                                           cost_values=cost_values), data, [critic, cost_critic, actor, *sync])
        metrics["safe_rlhf/lagrange"] = lagrange
        return metrics

    def mean_cost(self, costs) -> float:
        """The batch's mean cost: the per-rank score sums travel in the scores' meta."""
        return float(costs.meta["cost/score/mean"])

    def extra_state(self):
        return {"lagrange": self.lagrange.state_dict()}

    def load_extra_state(self, state):
        self.lagrange.load_state_dict(state["lagrange"])
