"""Built-in tasks: deterministic prompts per (seed, split), rewards on hand-written cases."""
import re
from fractions import Fraction

import pytest

from hfrl.data.tasks import DEFAULT_TASK, TASKS, Task, get_task, register_task

NAMES = ["max_digit", "add", "copy"]
PATTERNS = {"max_digit": r"max\((\d),(\d),(\d),(\d)\)=", "add": r"(\d{1,2})\+(\d{1,2})=",
            "copy": r"copy:(\d{3,6})="}


def expected_truth(name, groups):
    if name == "max_digit":
        return max(groups)
    if name == "add":
        return str(int(groups[0]) + int(groups[1]))
    return groups[0]


@pytest.mark.parametrize("name", NAMES)
def test_prompts_deterministic_and_well_formed(name):
    task = get_task(name)
    rows = task.make_prompts(200, seed=3)
    assert rows == task.make_prompts(200, seed=3, split="train")
    assert rows != task.make_prompts(200, seed=4)
    assert rows != task.make_prompts(200, seed=3, split="val")
    assert task.make_prompts(50, seed=3) == rows[:50]  # one stream per (seed, split)
    for row in rows:
        m = re.fullmatch(PATTERNS[name], row["prompt"])
        assert m, row
        assert row["ground_truth"] == expected_truth(name, m.groups())
        assert task.reward(row["prompt"], row["ground_truth"], row["ground_truth"]) == 1.0
        assert set(row["prompt"] + row["ground_truth"]) <= set(task.alphabet)
    assert len({r["prompt"] for r in rows}) > 100  # actually random


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_cached_and_covers_prompts(name):
    task = get_task(name)
    tok = task.tokenizer()
    assert task.tokenizer() is tok
    row = task.make_prompts(1, seed=0)[0]
    ids = tok(row["prompt"])["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(row["prompt"])
    assert tok.decode(ids, skip_special_tokens=True) == row["prompt"]


CASES = [
    ("max_digit", "max(3,7,2,5)=", "7", "7", 1.0),
    ("max_digit", "max(3,7,2,5)=", " 7 ", "7", 1.0),
    ("max_digit", "max(3,7,2,5)=", "75", "7", 0.5),
    ("max_digit", "max(3,7,2,5)=", "5", "7", 0.0),
    ("max_digit", "max(3,7,2,5)=", "57", "7", 0.0),
    ("max_digit", "max(3,7,2,5)=", "", "7", 0.0),
    ("add", "23+58=", "81", "81", 1.0),
    ("add", "23+58=", "71", "81", 0.25),
    ("add", "99+1=", "109", "100", 0.5 * 2 / 3),
    ("add", "23+58=", "811", "81", 0.0),
    ("add", "23+58=", "8", "81", 0.0),
    ("add", "23+58=", "", "81", 0.0),
    ("copy", "copy:4821=", "4821", "4821", 1.0),
    ("copy", "copy:4821=", "4820", "4821", 0.75),
    ("copy", "copy:4821=", "48", "4821", 0.5),
    ("copy", "copy:4821=", "48219999", "4821", 0.5),
    ("copy", "copy:4821=", "1111", "4821", 0.25),
    ("copy", "copy:4821=", "", "4821", 0.0),
]


@pytest.mark.parametrize("name,prompt,response,truth,reward", CASES)
def test_rewards(name, prompt, response, truth, reward):
    assert get_task(name).reward(prompt, response, truth) == pytest.approx(reward, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_rewards_in_unit_interval(name):
    task = get_task(name)
    chars = task.alphabet
    for row in task.make_prompts(30, seed=1):
        for response in ["", row["ground_truth"][::-1], row["ground_truth"] + "0", chars, "9" * 4]:
            assert 0.0 <= task.reward(row["prompt"], response, row["ground_truth"]) <= 1.0


def test_max_digit_random_policy_reward_is_small():
    # A policy answering one uniformly random alphabet character: the exact expectation over
    # the characters, averaged over prompts, is 1/|alphabet| (only the max digit scores).
    task = get_task("max_digit")
    rows = task.make_prompts(100, seed=0)
    expectation = sum(Fraction(task.reward(r["prompt"], c, r["ground_truth"]))
                      for r in rows for c in task.alphabet) / (len(rows) * len(task.alphabet))
    assert expectation == Fraction(1, len(task.alphabet)) == Fraction(1, 17)
    assert expectation < 0.15


def test_registry():
    assert DEFAULT_TASK == "max_digit" and set(NAMES) <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'mul'.*'add', 'copy', 'max_digit'"):
        get_task("mul")
    assert get_task(TASKS["add"]) is TASKS["add"]
    assert register_task(TASKS["add"]) is TASKS["add"]  # the same object again is fine

    class OtherAdd(Task):
        name, alphabet = "add", "0"

    with pytest.raises(ValueError, match="already registered"):
        register_task(OtherAdd())
    with pytest.raises(TypeError, match="Task instance"):
        register_task("add")


def test_make_prompts_bad_arguments():
    task = get_task("copy")
    with pytest.raises(ValueError, match="split='dev'"):
        task.make_prompts(3, seed=0, split="dev")
    with pytest.raises(ValueError, match="num=-1"):
        task.make_prompts(-1, seed=0)
    assert task.make_prompts(0, seed=0) == []
