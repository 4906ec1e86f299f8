"""What every role worker shares: its TrainEngine, the response <-> token column alignment, metrics.

Column conventions of the Batches that flow between roles (one row per response):

    input_ids, attention_mask   (N, T)  prompt left-padded to width P, response right-padded to R
    response_mask               (N, R)  1 on generated tokens (the stop token included)
    per-response-token values   (N, R)  column j belongs to response token j (log-probs, values,
                                        rewards, advantages), as the algorithms take them
    per-token training columns  (N, T)  column t belongs to token t (TrainEngine's convention:
                                        a loss over predicted tokens uses [:, 1:]); response
                                        token j is token P + j

P = T - R is the same on every row of a step (rank 0 pads the prompts to the step's longest), so
the columns line up on every rank and rows of different ranks concatenate.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hfrl.controller import ONE_TO_ALL, Batch, Worker, register
from hfrl.distributed.env import collective_device


def prompt_width(batch: Batch) -> int:
    """P: the columns before the response."""
    return batch["input_ids"].shape[1] - batch["response_mask"].shape[1]


def response_from_shifted(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(N, T-1) outputs where column t is about token t+1 (next-token log-probs) -> (N, R) of the
    response tokens, 0 on padding. On ``values``' device (the engine's; the batch is on the host)."""
    P, R = prompt_width(batch), batch["response_mask"].shape[1]
    return values[:, P - 1:P - 1 + R] * batch["response_mask"].to(values.device, values.dtype)


def response_from_states(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(N, T) per-position outputs of a value model -> (N, R): response token j gets the value of
    the state just before it (position P + j - 1), as its log-prob does."""
    return response_from_shifted(values[:, :-1], batch)


def to_token_columns(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(N, R) per-response-token values -> (N, T) per-token columns (0 on the prompt)."""
    return F.pad(values, (prompt_width(batch), 0))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) mask -> (N,) index of each row's last real token."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


@contextmanager
def timed(meta: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        meta[key] = meta.get(key, 0.0) + time.perf_counter() - start


class MetricSums:
    """Masked sums of per-rank values, reduced over a group into means, mins and maxes.

    Every rank of the group must add the same names in the same order (they do: the same code runs
    on every rank) and call `reduce` together."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}
        self.extremes: dict[str, list[float]] = {}
        self.totals: dict[str, float] = {}

    def total(self, name: str, value: float) -> None:
        """A quantity summed over the group (token counts), reported under its own name."""
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None,
            extremes: bool = False) -> None:
        values = values.detach().double()
        if mask is None:
            mask = torch.ones_like(values)
        mask = mask.to(values.dtype)
        total, count = float((values * mask).sum()), float(mask.sum())
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += total
        entry[1] += count
        if extremes:
            chosen = values[mask.bool()]
            lo = float(chosen.min()) if chosen.numel() else float("inf")
            hi = float(chosen.max()) if chosen.numel() else float("-inf")
            self.extremes[name] = [lo, -hi]

    def reduce(self, group=None) -> dict[str, float]:
        names, total_names = list(self.sums), list(self.totals)
        sums = torch.tensor([v for n in names for v in self.sums[n]] + [self.totals[n] for n in total_names],
                            dtype=torch.float64)
        ext_names = list(self.extremes)
        ext = torch.tensor([v for n in ext_names for v in self.extremes[n]], dtype=torch.float64)
        if group is not None and dist.get_world_size(group) > 1:
            device = collective_device(group)   # NCCL takes no host tensors
            sums, ext = sums.to(device), ext.to(device)
            dist.all_reduce(sums, group=group)
            if len(ext):
                dist.all_reduce(ext, op=dist.ReduceOp.MIN, group=group)
            sums, ext = sums.cpu(), ext.cpu()
        out = {}
        for i, name in enumerate(names):
            total, count = sums[2 * i].item(), sums[2 * i + 1].item()
            out[f"{name}/mean"] = total / count if count else float("nan")
        for i, name in enumerate(total_names):
            out[name] = sums[2 * len(names) + i].item()
        for i, name in enumerate(ext_names):
            out[f"{name}/min"], out[f"{name}/max"] = ext[2 * i].item(), -ext[2 * i + 1].item()
        return out


MODEL_SOURCES: dict[str, Callable] = {}
"""Models handed over in memory instead of read from a checkpoint, by ``model_source_key`` of the
folder a role's `engine.model_path` names (which then needs only config.json). Process-local: a
program that already holds the weights (a Megatron job, hfrl.integrations.megatron) registers a
source on every rank before hfrl.run (``model_source``). `source(ctx, engine_cfg)` returns this rank's
shard as a new model on each call (the actor and the reference must not share parameters)."""


def model_source_key(path: str | os.PathLike) -> str:
    """The one spelling of a model folder that registration and lookup share: the real path (absolute,
    ``..`` and symlinks resolved), so ``run/../x``, ``./x`` and a link to x name the same source."""
    return os.path.realpath(os.fspath(path))


@contextmanager
def model_source(path: str | os.PathLike, source: Callable) -> Iterator[None]:
    """``source`` registered in MODEL_SOURCES for the folder ``path`` inside this block."""
    key = model_source_key(path)
    MODEL_SOURCES[key] = source
    try:
        yield
    finally:
        MODEL_SOURCES.pop(key, None)


def lookup_model_source(path: str | os.PathLike | None) -> Callable | None:
    """The source registered for the folder ``path`` (None when none is, or ``path`` is empty)."""
    return MODEL_SOURCES.get(model_source_key(path)) if path else None


class EngineWorker(Worker):
    """A role worker holding one TrainEngine built on this rank's share of the role's layout."""

    def build_engine(self, engine_cfg):
        from hfrl.engine import TrainEngine

        source = lookup_model_source(engine_cfg.model_path)
        model = source(self.ctx, engine_cfg) if source is not None else None
        self.engine = TrainEngine(engine_cfg, self.ctx.groups, model=model)   # CUDA under NCCL, else the CPU
        return self.engine

    @property
    def dp_group(self):
        return self.engine.groups["dp"]

    def output_batch(self, tensors: dict, meta: dict) -> Batch:
        return Batch({k: v.detach().cpu() for k, v in tensors.items()}, meta=meta)

    # ---- checkpoints: collective over the role ------------------------------------------------
    @register(protocol=ONE_TO_ALL)
    def save(self, path: str) -> None:
        from hfrl.engine.checkpoint import save_checkpoint

        save_checkpoint(self.engine, path)

    @register(protocol=ONE_TO_ALL)
    def load(self, path: str) -> int:
        from hfrl.engine.checkpoint import load_checkpoint

        return int(load_checkpoint(self.engine, path)["step"])

    @register(protocol=ONE_TO_ALL)
    def export_hf(self, path: str) -> None:
        from hfrl.engine.checkpoint import save_hf

        save_hf(self.engine, path)
