"""Rule-based rewards: `reward_fn(prompt, response, ground_truth) -> float`, run where the rows are.

The function is loaded on every rank of the pool from "module:function" (or a built-in task's
verifier), and each rank scores only its own rows (DP_COMPUTE over the pool), so responses are
decoded and verified in parallel and never gathered on rank 0. A function that raises or returns
something that is not a finite number fails the step with an error naming the function and the
sample (hfrl.data.rewards.score_responses).
"""
from __future__ import annotations

from hfrl.controller import DP_COMPUTE, Batch, Worker, register
from hfrl.workers.common import prompt_width, timed


def load_tokenizer_for(source: dict):
    """{"task": name} -> the task's own tokenizer; {"path": folder, "trust_remote_code": bool} -> HF's."""
    from hfrl.data import get_task, load_tokenizer

    if "task" in source:
        return get_task(source["task"]).tokenizer()
    return load_tokenizer(source["path"], trust_remote_code=source.get("trust_remote_code", False))


class RuleRewardWorker(Worker):
    def __init__(self, reward_fn: str | None, task: str | None, tokenizer_source: dict):
        from hfrl.data import load_reward_fn, task_reward_fn

        if reward_fn is not None:
            self.fn, self.fn_name = load_reward_fn(reward_fn), reward_fn
        elif task is not None:
            self.fn, self.fn_name = task_reward_fn(task), f"task {task!r} reward"
        else:
            raise ValueError("no reward: enable roles.reward (a reward model), set data.reward_fn "
                             "('module:function') or use a built-in data.task")
        self.tokenizer = load_tokenizer_for(tokenizer_source)

    @register(protocol=DP_COMPUTE)
    def score(self, gen: Batch) -> Batch:
        from hfrl.data import score_responses

        meta: dict = {}
        with timed(meta, "timing_s/reward"):
            P = prompt_width(gen)
            responses = [ids[mask.bool()].tolist() for ids, mask in
                         zip(gen["input_ids"][:, P:], gen["response_mask"])]
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            uids = gen["uid"].tolist()
            first: dict[int, int] = {}   # a prompt's responses are consecutive rows
            for j, uid in enumerate(uids):
                first.setdefault(uid, j)
            names = [f"sample {j - first[uid]} of dataset row {uid}" for j, uid in enumerate(uids)]
            scores = score_responses(self.fn, list(gen["prompt_text"]), texts, list(gen["ground_truth"]),
                                     name=self.fn_name, sample_names=names)
        return Batch({"scores": scores}, meta=meta)
