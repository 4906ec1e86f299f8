"""Predicted cost of the train -> generate transition, per rank: the paper's Table 2.

For an actor of M parameter bytes trained with layout (pp, tp, dp) and generating with (pg, tg):

    mode           all-gather volume received          parameter bytes during generation   redundancy
    ds_chat        (t p d - 1) / (t p d) M              M                                    M / (t p d)
    hybridflow_v   (t p - 1) / (t p) M                  M                                    M / (t p)
    hybridflow     (t p - tg pg) / (tg pg t p) M        M / (tg pg)                          0

(t = tp, p = pp, d = dp.) ds_chat all-gathers the whole model across every rank of the role and
slices out the generation shard; hybridflow_v all-gathers across the whole training model-parallel
group (vanilla grouping) and keeps a slice; hybridflow all-gathers only inside each micro-DP group,
into a buffer that already holds the training shard, so nothing is stored twice. These are the
formulas; the resharder's own counters measure what really moved (replicated tensors such as norms
and vocab padding make the measured bytes differ by a small, stated constant).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

from hfrl.distributed.parallel_dims import ParallelDims

MODES = ("hybridflow", "hybridflow_v", "ds_chat")
MODE_GROUPING = {"hybridflow": "hybridflow", "hybridflow_v": "vanilla"}
"""The generation grouping each mode needs (ds_chat works with either)."""


def default_mode(grouping: str) -> str:
    """The mode a role's grouping implies: hybridflow, or hybridflow_v for the vanilla grouping."""
    return "hybridflow_v" if grouping == "vanilla" else "hybridflow"


@dataclass(frozen=True)
class TransitionCost:
    """Fractions of the actor's parameter bytes M, per rank (exact rationals)."""

    mode: str
    received: Fraction
    """All-gather volume one rank receives entering generation."""
    resident: Fraction
    """Parameter bytes one rank holds during generation (its peak)."""
    redundant: Fraction
    """Bytes of the training shard stored a second time during generation."""

    def in_bytes(self, model_bytes: int) -> dict[str, int]:
        """The three quantities in bytes for an actor of ``model_bytes`` parameter bytes (rounded down)."""
        return {name: int(getattr(self, name) * model_bytes) for name in ("received", "resident", "redundant")}


def predict(dims: ParallelDims, mode: str = "hybridflow") -> TransitionCost:
    """Table 2's row for ``mode`` at this layout."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    t, p, d = dims.tp, dims.pp, dims.dp
    if mode == "ds_chat":
        n = t * p * d
        return TransitionCost(mode, Fraction(n - 1, n), Fraction(1), Fraction(1, n))
    if mode == "hybridflow_v":
        n = t * p
        return TransitionCost(mode, Fraction(n - 1, n), Fraction(1), Fraction(1, n))
    g = dims.tg * dims.pg
    return TransitionCost(mode, Fraction(t * p - g, g * t * p), Fraction(1, g), Fraction(0))


def describe(dims: ParallelDims, model_bytes: int | None = None) -> list[str]:
    """One line per mode, for ``hfrl layout``: fractions of M, and bytes when M is known."""
    lines = []
    for mode in MODES:
        cost = predict(dims, mode)
        text = (f"{mode:<12} receive {_fmt(cost.received)} M, hold {_fmt(cost.resident)} M, "
                f"stored twice {_fmt(cost.redundant)} M")
        if model_bytes is not None:
            b = cost.in_bytes(model_bytes)
            text += (f" (M = {_mb(model_bytes)}: receive {_mb(b['received'])}, hold {_mb(b['resident'])}, "
                     f"twice {_mb(b['redundant'])})")
        lines.append(text)
    return lines


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def model_bytes(model_path: str, dtype: str = "float32") -> int:
    """Parameter bytes of the model in a local HF folder (from its config.json alone)."""
    import torch

    from hfrl.models.config import ModelConfig
    from hfrl.models.weights import param_plan

    config = ModelConfig.from_pretrained(model_path)
    numel = 0
    for spec in param_plan(config):
        if spec.name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # one tensor with the embedding
        numel += math.prod(spec.shape)
    return numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def layout_report(dims: ParallelDims, model_path: str | None = None, dtype: str = "float32") -> dict:
    """The transition's predicted cost for ``hfrl layout``: each mode's fractions of M, and bytes
    when the actor's checkpoint folder is given and readable here."""
    readable = bool(model_path) and os.path.isfile(os.path.join(model_path, "config.json"))
    total = model_bytes(model_path, dtype) if readable else None  # planning elsewhere: fractions only
    modes = {}
    for mode in MODES:
        cost = predict(dims, mode)
        modes[mode] = {name: _fmt(getattr(cost, name)) for name in ("received", "resident", "redundant")}
        if total is not None:
            modes[mode]["bytes"] = cost.in_bytes(total)
    return {"model_bytes": total, "modes": modes, "lines": describe(dims, total)}
