"""The policy roles: the actor (generate, log-probs, advantages, PPO update) and the reference.

The actor's methods, as the trainers call them (every Batch stays on the ranks that computed it
unless a method on another pool needs its rows; see hfrl.controller):

    generate(prompts)              MICRO_DP_COMPUTE: each generation replica samples its prompts'
                                   responses through the 3D-HybridEngine (training weights ->
                                   generation layout -> back), n rows per prompt
    compute_log_probs(gen)         DP_COMPUTE: log-probs of the response tokens (actor: the "old"
                                   policy of the PPO ratio; reference: the KL anchor)
    compute_advantages(gen, ...)   DP_COMPUTE: scores -> token rewards (minus the KL penalty) ->
                                   the algorithm's advantage estimator -> the training columns
    update(data)                   DP_COMPUTE: ppo_epochs x mini-batches of clipped policy-gradient
                                   steps (plus entropy bonus and KL loss where configured)
"""
from __future__ import annotations

import torch

from hfrl.algorithms import agg_loss, kl_loss, ppo_clip_loss, masked_mean
from hfrl.controller import DP_COMPUTE, ONE_TO_ALL, Batch, register
from hfrl.workers.advantage import advantage_columns, dp_sum, step_metrics
from hfrl.workers.common import EngineWorker, response_from_shifted, timed
from hfrl.workers.generation import ResponseGenerator

TIMING_NAMES = {"old_log_probs": "timing_s/old_log_prob", "ref_log_probs": "timing_s/ref"}
"""verl's names for the time of each log-prob pass."""


class PolicyWorker(EngineWorker):
    """A CausalLM role: log-probs of responses (the reference policy is just this)."""

    def __init__(self, engine_cfg, temperature: float = 1.0):
        self.build_engine(engine_cfg)
        self.temperature = temperature if temperature > 0 else 1.0   # greedy rollouts: plain logits

    @register(protocol=DP_COMPUTE)
    def compute_log_probs(self, gen: Batch, key: str = "old_log_probs") -> Batch | None:
        """{key: (N, R)} log-probs of the response tokens under logits / rollout temperature."""
        meta: dict = {}
        with timed(meta, TIMING_NAMES.get(key, f"timing_s/{key}")):
            log_probs = self.engine.compute_log_probs(
                {"input_ids": gen["input_ids"], "attention_mask": gen["attention_mask"]},
                temperature=self.temperature)
        if log_probs is None:   # not the last pipeline stage: not an output rank
            return None
        return self.output_batch({key: response_from_shifted(log_probs, gen)}, meta)


class ActorWorker(PolicyWorker, ResponseGenerator):
    """hybrid_cfg None: the actor does not generate (a rollout role does, hfrl.workers.rollout); it
    then builds no hybrid engine and sends its weights to the rollout after each update."""

    def __init__(self, engine_cfg, rollout_cfg, hybrid_cfg, algo_cfg, *, eos_token_id: int,
                 pad_token_id: int, num_mini_batches: int):
        from hfrl.hybrid_engine import HybridEngine

        super().__init__(engine_cfg, rollout_cfg.temperature)
        self.rollout_cfg, self.algo = rollout_cfg, algo_cfg
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.num_mini_batches = num_mini_batches
        self.hybrid = self.rollout = None
        if hybrid_cfg is not None:
            self.hybrid = HybridEngine.from_config(self.engine, hybrid_cfg)
            self.rollout = self.hybrid.rollout_engine(rollout_cfg)

    @register(protocol=ONE_TO_ALL)
    def send_weights(self, links: tuple[tuple[int, ...], ...], rollout_tp: tuple[int, ...], tg: int) -> dict:
        """After an update: this rank's part of the weight sync to the rollout role (see
        hfrl.workers.rollout). Training replica 0 gathers each stage over TP; the stage's tp=0 rank
        sends it over `links[stage]` to the rollout ranks `links[stage][1:]`, whose TP ranks (of tg)
        are `rollout_tp`; the other replicas have nothing to do."""
        from hfrl.models.weights import param_plan
        from hfrl.workers.rollout import send_stage

        meta: dict = {}
        with timed(meta, "timing_s/weight_sync"):
            if self.engine.dp_rank == 0:
                full = self.engine.stage_state_dict()   # collective over this replica's TP group
                if self.engine.tp_rank == 0:
                    link = links[self.engine.pp_rank]
                    specs = {spec.name: spec for spec in param_plan(self.engine.model_config)}
                    send_stage(full, specs, link, self.ctx.runtime.cache.get(link), rollout_tp, tg)
        return meta

    # ---- generation (generate() and its rows: hfrl.workers.generation) ---------------------------
    def generation_weights(self):
        if self.hybrid is None:
            raise RuntimeError("this actor generates nothing: roles.rollout is enabled, so call generate on "
                               "the rollout group (RLTrainer.generator)")
        return self.hybrid.generation()

    def generation_meta(self) -> dict:
        return {k: v for k, v in self.hybrid.metrics().items() if k.startswith("timing_s/")}

    # ---- advantages ---------------------------------------------------------------------------
    @register(protocol=DP_COMPUTE)
    def compute_advantages(self, gen: Batch, scores: Batch, old: Batch, ref: Batch | None = None,
                           values: Batch | None = None, costs: Batch | None = None,
                           cost_values: Batch | None = None, baseline: Batch | None = None, *,
                           estimator: str, kl_coef: float = 0.0, lagrange: float = 0.0,
                           group_size: int = 1) -> Batch:
        """The training columns of this rank's rows (advantage.py), the step's reward metrics in meta."""
        def column(batch, key):
            return None if batch is None else batch[key]

        meta: dict = {}
        with timed(meta, "timing_s/adv"):
            out = advantage_columns(
                self.algo, gen, scores["scores"], old["old_log_probs"], estimator=estimator,
                ref_log_probs=column(ref, "ref_log_probs"), values=column(values, "values"),
                costs=column(costs, "scores"), cost_values=column(cost_values, "values"),
                baseline=column(baseline, "scores"), kl_coef=kl_coef, lagrange=lagrange, group_size=group_size,
                sum_all=dp_sum(self.dp_group))
        metrics = step_metrics(gen, scores["scores"], old["old_log_probs"], out, column(values, "values"),
                               column(costs, "scores"))
        meta.update(metrics.reduce(self.dp_group))
        return self.output_batch(out.columns, meta)

    # ---- training -----------------------------------------------------------------------------
    @register(protocol=DP_COMPUTE)
    def update(self, data: Batch, kl_coef: float = 0.0) -> dict:
        """ppo_epochs passes of num_mini_batches optimizer steps over this rank's rows."""
        algo = self.algo
        seq_mode = algo.loss_agg_mode != "token-mean"
        if seq_mode and self.engine.cfg.pack_sequences:
            raise ValueError(f"algorithm.loss_agg_mode={algo.loss_agg_mode!r} averages over sequences, which "
                             "packed micro-batches (engine.pack_sequences=true) merge into one row: use "
                             "loss_agg_mode=token-mean or turn packing off")
        keys = ["input_ids", "attention_mask", "loss_mask", "old_log_probs", "advantages"]
        tensors = {k: data[k] for k in keys + (["ref_log_probs"] if "ref_log_probs" in data else [])}
        if seq_mode:   # micro-batches and DP ranks weighted by sequences, not tokens
            first = tensors["loss_mask"].cumsum(1) == 1
            tensors["seq_mask"] = (first & tensors["loss_mask"].bool()).long()
        use_kl_loss = "ref_log_probs" in tensors and kl_coef > 0
        temperature = self.temperature

        def loss_fn(logits, mb):
            if temperature != 1.0:
                logits = logits / temperature
            log_probs = self.engine.token_log_probs(logits, mb["input_ids"])   # (b, t-1)
            mask = mb["loss_mask"][:, 1:].float()
            loss, m = ppo_clip_loss(log_probs, mb["old_log_probs"][:, 1:], mb["advantages"][:, 1:], mask,
                                    clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
                                    dual_clip_c=algo.dual_clip_c, agg_mode=algo.loss_agg_mode)
            metrics = {"pg_loss": loss.detach(), **m}
            if algo.entropy_coef > 0:
                token_entropy = self.engine.token_entropy(logits)
                loss = loss - algo.entropy_coef * agg_loss(token_entropy, mask, algo.loss_agg_mode)
                metrics["entropy"] = masked_mean(token_entropy.detach(), mask)   # per token, any agg mode
            if use_kl_loss:
                kl = kl_loss(log_probs, mb["ref_log_probs"][:, 1:], mask, algo.kl_estimator,
                             algo.loss_agg_mode)
                loss = loss + kl_coef * kl
                metrics["kl_loss"] = kl.detach()
            return loss, metrics

        meta: dict = {}
        with timed(meta, "timing_s/update_actor"):
            result = run_mini_batches(self.engine, tensors, loss_fn, self.num_mini_batches, algo.ppo_epochs,
                                      "seq_mask" if seq_mode else "loss_mask")
        return {**{f"actor/{k}": v for k, v in result.items()}, **meta}


def run_mini_batches(engine, tensors: dict, loss_fn, num_mini_batches: int, epochs: int,
                     loss_mask_key: str) -> dict[str, float]:
    """`epochs` passes of `num_mini_batches` train_steps over contiguous row ranges; metrics averaged
    over the steps (each step's are already global over DP)."""
    rows = len(next(iter(tensors.values())))
    if rows % num_mini_batches:
        raise ValueError(f"{rows} rows on this data-parallel rank cannot be cut into {num_mini_batches} "
                         "mini-batches: make data.train_batch_size * rollout.n divisible by the role's dp "
                         "* (data.train_batch_size / algorithm.mini_batch_size)")
    size = rows // num_mini_batches
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for i in range(num_mini_batches):
            mini = {k: v[i * size:(i + 1) * size] for k, v in tensors.items()}
            metrics = engine.train_step(mini, loss_fn, loss_mask_key=loss_mask_key)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    return {k: v / steps for k, v in sums.items()}

