"""Rule rewards: a user's Python function, or a built-in task's, scored one response at a time.

A reward function is `fn(prompt: str, response: str, ground_truth) -> number`. It is named by
a spec "module:function" (an importable module) or "path/to/file.py:function" (a file loaded
by path). `score_responses` calls it per sample and turns every failure into one
`RewardFunctionError` naming the function, the sample and what went wrong, so a bug in a reward
function is reported as such and not as a shape error three stages later.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RewardFn = Callable[[str, str, object], float]


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not a finite real number."""


def load_reward_fn(spec: str) -> RewardFn:
    """The function named by "module:function" or "path/to/file.py:function"."""
    if not isinstance(spec, str):
        raise TypeError(f"reward function spec {spec!r} is a {type(spec).__name__}, expected a "
                        "string 'module:function' or 'path/to/file.py:function'")
    target, colon, attr = spec.rpartition(":")
    if not colon or not target or not attr:
        raise ValueError(f"reward function spec {spec!r}: expected 'module:function' or "
                         "'path/to/file.py:function' (a colon, then the function's name)")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(target, spec)
    else:
        module = _import_module(target, spec)
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_"))
        raise ValueError(f"reward function spec {spec!r}: {target!r} has no attribute {attr!r}; "
                         f"its public callables are {names}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward function spec {spec!r}: {target}.{attr} is a "
                        f"{type(fn).__name__}, not callable; name a function "
                        "fn(prompt, response, ground_truth) -> float")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: called as they are
        return fn
    try:
        signature.bind("prompt", "response", "ground_truth")
    except TypeError:
        raise TypeError(f"reward function spec {spec!r}: {target}.{attr}{signature} cannot be called as "
                        "fn(prompt, response, ground_truth): it must take those three arguments") from None
    return fn


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if name == missing or name.startswith(missing + "."):
            raise ValueError(f"reward function spec {spec!r}: module {missing!r} not found: put "
                             "its folder on PYTHONPATH, install it, or give the file as "
                             "'path/to/file.py:function'") from e
        raise ValueError(f"reward function spec {spec!r}: module {name!r} imports {missing!r}, "
                         "which is not installed") from e
    except Exception as e:  # a SyntaxError, or whatever its top level raised
        raise ValueError(f"reward function spec {spec!r}: importing {name!r} raised "
                         f"{type(e).__name__}: {e}") from e


def _module_from_file(target: str, spec: str):
    path = Path(target)
    if not path.is_file():
        raise ValueError(f"reward function spec {spec!r}: file {target!r} not found (relative "
                         f"paths start at {Path.cwd()})")
    # A name per file, so two reward files that share a stem do not overwrite each other.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"hfrl_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function spec {spec!r}: {target!r} cannot be loaded as a "
                         "Python module (give a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        raise ValueError(f"reward function spec {spec!r}: {target!r} imports {e.name!r}, which is not "
                         "installed") from e
    except Exception as e:  # a SyntaxError, or whatever its top level raised
        raise ValueError(f"reward function spec {spec!r}: loading {target!r} raised "
                         f"{type(e).__name__}: {e}") from e
    return module


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def score_responses(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str],
                    ground_truths: Sequence, *, name: str, start_index: int = 0,
                    sample_names: Sequence[str] | None = None) -> torch.Tensor:
    """(N,) float32 rewards, fn(prompts[i], responses[i], ground_truths[i]) for each sample i.

    Errors name sample start_index + i, so a caller scoring a slice reports global indices, or
    sample_names[i] when given (a trainer names the dataset row and the response's number)."""
    if not len(prompts) == len(responses) == len(ground_truths):
        raise ValueError(f"score_responses({name!r}): {len(prompts)} prompts, {len(responses)} "
                         f"responses and {len(ground_truths)} ground truths, expected as many "
                         "of each")
    scores = []
    for i, (prompt, response, truth) in enumerate(zip(prompts, responses, ground_truths)):
        label = sample_names[i] if sample_names is not None else f"sample {start_index + i}"
        where = (f"{label} (prompt {_short(prompt)}, response "
                 f"{_short(response)}, ground_truth {_short(truth)})")
        try:
            value = fn(prompt, response, truth)
        except Exception as e:
            raise RewardFunctionError(f"reward function {name!r} raised on {where}: "
                                      f"{type(e).__name__}: {e}") from e
        score = _as_real(value)
        if score is None or not math.isfinite(score):
            raise RewardFunctionError(
                f"reward function {name!r} returned {_short(value)} "
                f"({type(value).__module__}.{type(value).__qualname__}) on {where}: expected a "
                "finite real number (float, int or bool)")
        if abs(score) > FLOAT32_MAX:  # finite in float64, inf as the float32 rewards are kept
            raise RewardFunctionError(
                f"reward function {name!r} returned {score!r} on {where}: beyond float32's range "
                f"(|r| <= {FLOAT32_MAX:.3e}), where rewards are kept; scale the reward down")
        scores.append(score)
    return torch.tensor(scores, dtype=torch.float32)


def _as_real(value) -> float | None:
    """float(value) for a bool, real number, numpy real scalar or 0-dim real tensor, else None."""
    if isinstance(value, (bool, numbers.Real)):  # numpy's real scalars register as Real
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.is_complex():
            return float(value.item())
        return None
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # numpy bool_, 0-dim arrays
    if getattr(value, "ndim", None) == 0 and kind is not None and kind in "biuf":
        return float(value)
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _task_reward(task_name: str, prompt: str, response: str, ground_truth) -> float:
    from hfrl.data.tasks import get_task

    return get_task(task_name).reward(prompt, response, ground_truth)


def task_reward_fn(task_name: str) -> RewardFn:
    """The built-in task's reward as a plain (picklable) function of (prompt, response, gt)."""
    from hfrl.data.tasks import get_task

    get_task(task_name)  # fail now on an unknown name, not at the first score
    return functools.partial(_task_reward, task_name)
