"""Value-head roles: the critic (values, clipped value-loss update) and the reward / cost models.

    critic.compute_values(gen)  -> {"values": (N, R)}   value of the state before each response token
    critic.update(data)         -> metrics               ppo_epochs x mini-batches of the clipped value loss
    reward.score(gen)           -> {"scores": (N,)}      the model's value at each row's last real token

A Safe-RLHF cost model is a reward model whose scores are costs; its cost critic is a second
critic (the trainer passes the column names).
"""
from __future__ import annotations

import torch

from hfrl.algorithms import value_loss
from hfrl.controller import DP_COMPUTE, Batch, register
from hfrl.workers.actor import run_mini_batches
from hfrl.workers.common import EngineWorker, MetricSums, last_token_index, response_from_states, timed


class CriticWorker(EngineWorker):
    def __init__(self, engine_cfg, algo_cfg, *, num_mini_batches: int, label: str = "critic"):
        """``label`` names its timing (a Safe-RLHF cost critic: timing_s/cost_critic_values)."""
        self.build_engine(engine_cfg)
        self.algo, self.num_mini_batches, self.label = algo_cfg, num_mini_batches, label

    @register(protocol=DP_COMPUTE)
    def compute_values(self, gen: Batch) -> Batch | None:
        meta: dict = {}
        with timed(meta, "timing_s/values" if self.label == "critic" else f"timing_s/{self.label}_values"):
            values = self.engine.compute_values({"input_ids": gen["input_ids"],
                                                 "attention_mask": gen["attention_mask"]})
        if values is None:
            return None
        return self.output_batch({"values": response_from_states(values, gen)}, meta)

    @register(protocol=DP_COMPUTE)
    def update(self, data: Batch, values_key: str = "values", returns_key: str = "returns",
               prefix: str = "critic") -> dict:
        algo = self.algo
        tensors = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"],
                   "loss_mask": data["loss_mask"], "values": data[values_key], "returns": data[returns_key]}

        def loss_fn(values, mb):
            return critic_loss(values, mb, algo.value_clip)

        meta: dict = {}
        with timed(meta, f"timing_s/update_{prefix}"):
            result = run_mini_batches(self.engine, tensors, loss_fn, self.num_mini_batches, algo.ppo_epochs,
                                      "loss_mask")
        return {**{f"{prefix}/{k}": v for k, v in result.items()}, **meta}


def critic_loss(values: torch.Tensor, mb: dict, clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss over the micro-batch's response tokens. ``values`` (b, t) are the model's
    outputs: position t is the state after token t, so token t's value is at t - 1, as in
    ``response_from_states``; ``mb`` holds the per-token columns values, returns, loss_mask."""
    mask = mb["loss_mask"][:, 1:].float()
    loss, metrics = value_loss(values[:, :-1].float(), mb["values"][:, 1:], mb["returns"][:, 1:], mask,
                               clip=clip, agg_mode="token-mean")
    return loss, {"vf_loss": loss.detach(), **metrics}


class RewardModelWorker(EngineWorker):
    """A reward (or cost) model: one scalar per response, read at its last real token."""

    def __init__(self, engine_cfg, name: str = "reward"):
        self.build_engine(engine_cfg)
        self.name = name

    @register(protocol=DP_COMPUTE)
    def score(self, gen: Batch) -> Batch | None:
        meta: dict = {}
        with timed(meta, f"timing_s/{self.name}"):
            values = self.engine.compute_values({"input_ids": gen["input_ids"],
                                                 "attention_mask": gen["attention_mask"]})
        if values is None:
            return None
        index = last_token_index(gen["attention_mask"]).to(values.device)
        scores = values.gather(1, index[:, None])[:, 0]
        sums = MetricSums()
        sums.add(f"{self.name}/score", scores)
        meta.update(sums.reduce(self.dp_group))   # the batch's mean (Safe-RLHF's multiplier reads it)
        return self.output_batch({"scores": scores}, meta)
