"""Reward functions for the trainer tests (loaded as 'module:function')."""


def digits(prompt, response, ground_truth):
    """The share of digits in the response: varies between a random policy's samples, so every
    estimator sees non-zero advantages from the first step."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


def raises(prompt, response, ground_truth):
    raise ValueError(f"cannot grade {response!r}")


def returns_text(prompt, response, ground_truth):
    return "correct"
