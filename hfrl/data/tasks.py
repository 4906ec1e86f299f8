"""Built-in verifiable tasks: generated prompts, a ground truth and a rule reward in [0, 1].

A task names its alphabet and brings its own per-character tokenizer (`char_tokenizer`), so a
tiny model can learn it from scratch in minutes. `make_prompts(num, seed, split)` is a pure
function of (task, seed, split); each split draws from its own random stream, so "train" and
"val" prompts are independent draws (the prompt spaces are small, so the same prompt may occur
in both). `reward(prompt, response, ground_truth)` gets the decoded response with special
tokens removed; a response ends at its first eos.

    max_digit  "max(3,7,2,5)=" -> "7"     1.0 exact, 0.5 right first digit with more after it
    add        "23+58=" -> "81"           1.0 exact; else, when the length is right,
                                          0.5 * (digits right, position by position) / len(gt)
                                          (so below 0.5); a wrong length scores 0
    copy       "copy:4821=" -> "4821"     positions right / max(len(gt), len(response))

max_digit is the default task of `hfrl train`: a policy emitting uniformly random characters of
its 17-character alphabet scores about 1/17 ~ 0.06, emitting high digits already raises the
mean, and answering the exact max gets it to 1.
"""
from __future__ import annotations

import random

SPLITS = ("train", "val", "test")
DIGITS = "0123456789"


class Task:
    """A verifiable task; subclasses set `name` and `alphabet` and define `sample` and `reward`."""

    name: str = ""
    alphabet: str = ""

    def __init__(self) -> None:
        self._tokenizer = None

    def tokenizer(self):
        """The task's char tokenizer, built once per task object and shared: do not modify it."""
        if self._tokenizer is None:
            from hfrl.data.tokenizer import char_tokenizer

            self._tokenizer = char_tokenizer(self.alphabet)
        return self._tokenizer

    def make_prompts(self, num: int, seed: int, split: str = "train") -> list[dict]:
        """`num` rows {"prompt": str, "ground_truth": str}, the same for the same (seed, split)."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 0:
            raise ValueError(f"task {self.name!r}: num={num!r} prompts, expected an int >= 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"task {self.name!r}: seed={seed!r}, expected an int")
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: split={split!r}, expected one of {SPLITS}")
        # A string seed is hashed with SHA-512 by `random`: stable across runs and processes, and
        # a different stream for every (task, split, seed).
        rng = random.Random(f"hfrl.tasks/{self.name}/{split}/{seed}")
        rows = []
        for _ in range(num):
            prompt, ground_truth = self.sample(rng)
            rows.append({"prompt": prompt, "ground_truth": ground_truth})
        return rows

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """One (prompt, ground_truth) drawn with `rng`."""
        raise NotImplementedError

    def reward(self, prompt: str, response: str, ground_truth: str) -> float:
        """The rule reward in [0, 1] of `response` (decoded, special tokens removed)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name!r}>"


TASKS: dict[str, Task] = {}
"""The registered tasks by name (also valid values of data.task)."""


def register_task(task: Task) -> Task:
    """Add `task` to TASKS under task.name (a name is registered once) and return it."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task({task!r}): expected a hfrl.data.tasks.Task instance")
    if not task.name or not task.alphabet:
        raise ValueError(f"register_task({task!r}): the task needs a name and an alphabet")
    known = TASKS.get(task.name)
    if known is not None and known is not task:
        raise ValueError(f"a different task named {task.name!r} is already registered: pick "
                         "another name")
    TASKS[task.name] = task
    return task


def get_task(name: str | Task) -> Task:
    """The registered task `name` (a Task is returned as is)."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in and registered tasks: "
                         f"{sorted(TASKS)} (data.task takes one of these names)")
    return TASKS[name]


class MaxDigit(Task):
    name = "max_digit"
    alphabet = DIGITS + "max(,)="

    def sample(self, rng: random.Random) -> tuple[str, str]:
        digits = [rng.choice(DIGITS) for _ in range(4)]
        return f"max({','.join(digits)})=", max(digits)

    def reward(self, prompt: str, response: str, ground_truth: str) -> float:
        answer = response.strip()
        if answer == ground_truth:
            return 1.0
        return 0.5 if answer.startswith(ground_truth) else 0.0


class Add(Task):
    name = "add"
    alphabet = DIGITS + "+="

    def sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}=", str(a + b)

    def reward(self, prompt: str, response: str, ground_truth: str) -> float:
        # Partial credit stays below 0.5, so any wrong answer scores under any exact one.
        answer = response.strip()
        if answer == ground_truth:
            return 1.0
        if len(answer) != len(ground_truth):
            return 0.0
        return 0.5 * sum(a == b for a, b in zip(answer, ground_truth)) / len(ground_truth)


class Copy(Task):
    name = "copy"
    alphabet = DIGITS + "copy:="

    def sample(self, rng: random.Random) -> tuple[str, str]:
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 6)))
        return f"copy:{digits}=", digits

    def reward(self, prompt: str, response: str, ground_truth: str) -> float:
        answer = response.strip()
        longest = max(len(answer), len(ground_truth))
        if longest == 0:
            return 1.0
        return sum(a == b for a, b in zip(answer, ground_truth)) / longest


MAX_DIGIT = register_task(MaxDigit())
ADD = register_task(Add())
COPY = register_task(Copy())
DEFAULT_TASK = MAX_DIGIT.name
"""The task `hfrl train` runs when neither data.train_files nor data.task is given."""
