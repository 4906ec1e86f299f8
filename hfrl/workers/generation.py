"""`generate`, shared by the two roles that sample responses: the actor on its own ranks (through the
3D-HybridEngine) and the rollout role on a pool of its own (hfrl.workers.rollout).

    prompts (B rows) -> per-prompt SamplingParams (seeded or not) -> RolloutEngine.generate inside the
    role's `generation_weights()` -> right-padded responses -> B * n rows of the step's columns

A role provides `self.rollout` (a RolloutEngine), `self.rollout_cfg`, `eos_token_id`, `pad_token_id`,
`generation_weights()` (a context in which the engine's model holds the weights to sample from) and
`generation_meta()` (timings added to the output's meta).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from hfrl.controller import MICRO_DP_COMPUTE, Batch, register


class ResponseGenerator:
    """The generate method of a role that samples responses (mixed into its Worker class)."""

    @register(protocol=MICRO_DP_COMPUTE)
    def generate(self, prompts: Batch, greedy: bool = False, repeat: int = 1) -> Batch:
        """prompts: prompt_ids/prompt_mask (B, P) left-padded, seed (B,) (-1: unseeded), index (B,)
        and non-tensor columns that are carried along. Returns B * n rows (n = rollout.n, or 1 and
        each row `repeat` times for a greedy baseline), prompt-major."""
        from hfrl.rollout import RolloutEngine

        overrides = dict(stop_token_ids=[self.eos_token_id])
        if greedy:
            overrides.update(temperature=0.0, n=1)
        base = RolloutEngine.sampling_params(self.rollout_cfg, **overrides)
        seeds = prompts["seed"].tolist()
        params = [dataclasses.replace(base, seed=None if s < 0 else s) for s in seeds]
        mask = prompts["prompt_mask"].bool()
        token_lists = [row[m].tolist() for row, m in zip(prompts["prompt_ids"], mask)]
        meta: dict = {}
        start = time.perf_counter()
        with self.generation_weights():
            out = self.rollout.generate(token_lists, params)
        meta["timing_s/gen"] = time.perf_counter() - start
        meta.update(self.generation_meta())
        samples_per_prompt = base.n if not greedy else repeat
        return self._rows(prompts, out, samples_per_prompt, repeat if greedy else 1, meta)

    def generation_meta(self) -> dict:
        return {}

    def _rows(self, prompts: Batch, out, per_prompt: int, repeat: int, meta: dict) -> Batch:
        R = self.rollout_cfg.max_new_tokens
        padded = out.padded(self.pad_token_id)
        width = padded["responses"].shape[1]
        responses = torch.nn.functional.pad(padded["responses"], (0, R - width), value=self.pad_token_id)
        response_mask = torch.nn.functional.pad(padded["response_mask"], (0, R - width))
        log_probs = torch.nn.functional.pad(padded["response_log_probs"], (0, R - width))
        if repeat > 1:
            responses, response_mask, log_probs = (t.repeat_interleave(repeat, 0)
                                                   for t in (responses, response_mask, log_probs))
        rows = prompts.repeat(per_prompt)   # prompt-major, as the engine returns samples
        tensors = {"input_ids": torch.cat([rows["prompt_ids"], responses], 1),
                   "attention_mask": torch.cat([rows["prompt_mask"], response_mask], 1),
                   "response_mask": response_mask, "rollout_log_probs": log_probs,
                   "uid": rows["index"]}
        return Batch(tensors, {k: rows[k] for k in rows.non_tensors}, meta=meta)
