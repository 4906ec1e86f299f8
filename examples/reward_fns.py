"""Rule rewards for examples/grpo_rule_reward.yaml: `data.reward_fn: examples/reward_fns.py:exact_answer`.

A rule reward is any function `fn(prompt: str, response: str, ground_truth) -> float`; hfrl calls it
on the ranks that hold the responses (decoded, special tokens removed).
"""
from __future__ import annotations

import re


def exact_answer(prompt: str, response: str, ground_truth) -> float:
    """1 for the right number as the whole answer, 0.2 for the right number followed by more text
    (a format penalty), 0 otherwise."""
    answer = response.strip()
    truth = str(ground_truth).strip()
    if answer == truth:
        return 1.0
    first = re.match(r"-?\d+", answer)
    return 0.2 if first is not None and first.group(0) == truth else 0.0
