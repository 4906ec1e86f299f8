"""Reward functions that misbehave, for the bad-input tests (loaded as 'module:function')."""


def raises(prompt, response, ground_truth):
    raise ValueError(f"cannot grade {response!r}")


def returns_text(prompt, response, ground_truth):
    return "correct"
