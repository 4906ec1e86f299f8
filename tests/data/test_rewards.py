"""load_reward_fn (module and file specs, each failure) and score_responses' checks."""
import math
import pickle

import numpy as np
import pytest
import torch

from hfrl.data.rewards import (RewardFunctionError, load_reward_fn, score_responses,
                               task_reward_fn)

MODULE = '''
THRESHOLD = 3

def exact(prompt, response, ground_truth):
    return float(response == ground_truth)

def _private():
    pass
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE)
    (tmp_path / "needs_missing.py").write_text("import hfrl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_spec(reward_module):
    fn = load_reward_fn("my_rewards_mod:exact")
    assert fn("p", "7", "7") == 1.0 and fn("p", "8", "7") == 0.0


def test_file_spec(tmp_path):
    path = tmp_path / "sub" / "score.py"
    path.parent.mkdir()
    path.write_text(MODULE)
    fn = load_reward_fn(f"{path}:exact")
    assert fn("p", "a", "a") == 1.0


@pytest.mark.parametrize("spec,error,match", [
    ("my_rewards_mod.exact", ValueError, r"expected 'module:function'"),
    ("my_rewards_mod:", ValueError, r"expected 'module:function'"),
    ("hfrl_not_a_module:f", ValueError, r"module 'hfrl_not_a_module' not found"),
    ("hfrl_not_a_pkg.sub:f", ValueError, r"module 'hfrl_not_a_pkg' not found"),
    ("needs_missing:f", ValueError, r"'needs_missing' imports 'hfrl_no_such_dependency'"),
    ("my_rewards_mod:nope", ValueError, r"has no attribute 'nope'; its public callables are "
                                        r"\['exact'\]"),
    ("my_rewards_mod:THRESHOLD", TypeError, r"my_rewards_mod.THRESHOLD is a int, not callable"),
    ("missing/file.py:f", ValueError, r"file 'missing/file.py' not found"),
])
def test_spec_errors(reward_module, spec, error, match):
    with pytest.raises(error, match=match):
        load_reward_fn(spec)


def test_score_accepts_real_numbers():
    values = iter([True, False, 3, 0.25, np.float32(0.5), np.int64(2), np.bool_(True),
                   torch.tensor(0.75), np.array(1.5)])
    scores = score_responses(lambda p, r, g: next(values), ["p"] * 9, ["r"] * 9, [None] * 9,
                             name="mixed")
    assert scores.dtype == torch.float32 and scores.shape == (9,)
    assert scores.tolist() == [1.0, 0.0, 3.0, 0.25, 0.5, 2.0, 1.0, 0.75, 1.5]


def test_score_passes_arguments_in_order():
    seen = []
    score_responses(lambda p, r, g: seen.append((p, r, g)) or 0, ["p0", "p1"], ["r0", "r1"],
                    ["g0", None], name="f")
    assert seen == [("p0", "r0", "g0"), ("p1", "r1", None)]


def test_score_raising_function_named():
    def bad(prompt, response, ground_truth):
        if response == "boom":
            raise KeyError("answer")
        return 1.0

    with pytest.raises(RewardFunctionError, match=r"reward function 'my.bad' raised on sample "
                                                  r"11 \(prompt 'q1', response 'boom'.*KeyError") \
            as info:
        score_responses(bad, ["q0", "q1"], ["ok", "boom"], [1, 2], name="my.bad", start_index=10)
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("value,shown", [
    ("abc", r"'abc' \(builtins.str\)"), (None, r"None \(builtins.NoneType\)"),
    ([1.0], r"\[1.0\] \(builtins.list\)"), (math.nan, r"nan \(builtins.float\)"),
    (-math.inf, r"-inf \(builtins.float\)"),
    (torch.tensor([1.0, 2.0]), r"tensor\(\[1., 2.\]\) \(torch.Tensor\)"),
    (1 + 2j, r"\(1\+2j\) \(builtins.complex\)"),
])
def test_score_non_numbers_named(value, shown):
    with pytest.raises(RewardFunctionError, match=rf"reward function 'f' returned {shown}.*"
                                                  r"sample 0 .*finite real number"):
        score_responses(lambda p, r, g: value, ["p"], ["r"], ["g"], name="f")



def test_score_beyond_float32_is_refused():
    """1e300 is finite in Python but inf as a float32 reward: every loss would be non-finite and
    every optimizer step skipped, silently. The largest float32 passes."""
    with pytest.raises(RewardFunctionError, match=r"returned 1e\+300 on sample 1 .*beyond float32"):
        score_responses(lambda p, r, g: 1e300 if r == "b" else 0.0, ["p", "p"], ["a", "b"], [None, None], name="f")
    big = float(torch.finfo(torch.float32).max)
    assert score_responses(lambda p, r, g: -big, ["p"], ["r"], [None], name="f").tolist() == [-big]

def test_score_long_texts_are_shortened():
    with pytest.raises(RewardFunctionError) as info:
        score_responses(lambda p, r, g: None, ["x" * 1000], ["y" * 1000], ["g"], name="f")
    assert len(str(info.value)) < 400 and "xxx..." in str(info.value)


def test_score_length_mismatch():
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 ground truths"):
        score_responses(lambda p, r, g: 0, ["a", "b"], ["r"], [1, 2], name="f")


def test_task_reward_fn():
    fn = task_reward_fn("max_digit")
    assert fn("max(1,2,3,4)=", "4", "4") == 1.0 and fn("max(1,2,3,4)=", "45", "4") == 0.5
    assert pickle.loads(pickle.dumps(fn))("max(1,2,3,4)=", "4", "4") == 1.0
    scores = score_responses(fn, ["max(1,2,3,4)="] * 3, ["4", "45", "3"], ["4"] * 3,
                             name="max_digit")
    assert scores.tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_reward_fn("nope")
