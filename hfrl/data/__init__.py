"""Prompts, tokenizers and rule rewards for the trainers.

    hfrl.data.tokenizer  load_tokenizer (a local folder), char_tokenizer (the tasks' own)
    hfrl.data.tasks      built-in verifiable tasks by name: max_digit (the default), add, copy
    hfrl.data.datasets   read_rows (JSONL, Parquet), PromptDataset, StepSampler
    hfrl.data.rewards    load_reward_fn ("module:function"), score_responses, task_reward_fn

Importing hfrl.data loads neither transformers nor pyarrow; the functions that need them import
them when called.
"""
from hfrl.data.datasets import TRUNCATIONS, PromptDataset, StepSampler, read_rows
from hfrl.data.rewards import (RewardFunctionError, load_reward_fn, score_responses,
                               task_reward_fn)
from hfrl.data.tasks import DEFAULT_TASK, TASKS, Task, get_task, register_task
from hfrl.data.tokenizer import SPECIAL_TOKENS, char_tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_TASK", "SPECIAL_TOKENS", "TASKS", "TRUNCATIONS", "PromptDataset",
    "RewardFunctionError", "StepSampler", "Task", "char_tokenizer", "get_task", "load_reward_fn",
    "load_tokenizer", "read_rows", "register_task", "score_responses", "task_reward_fn",
]
