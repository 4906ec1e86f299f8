"""The optimizer side of the training engine: AdamW (plain DP or ZeRO-1), LR schedules, clipping.

One training step, as the engine runs it::

    opt = build_optimizer(model.parameters(), cfg, dp_group)
    sched = build_scheduler(opt, cfg)
    for mb in micro_batches:
        (loss_fn(model, mb) * mb.loss_weight).backward()
        opt.accumulate_grads()                      # optional: fp32 accumulation of bf16 grads
    opt.reduce_gradients()                          # DP average: bucketed all-reduce or reduce-scatter
    norm = clip_optimizer_grads(opt, cfg.grad_clip, tp_group, pp_group)
    if not should_skip_step(norm, cfg.skip_nonfinite, groups=(mp_group, dp_group)):
        opt.step()
        sched.step()
    opt.zero_grad()

Both optimizers keep fp32 master weights: with bf16 parameters (CUDA) the master copy lives in the
optimizer and the bf16 parameters are refreshed from it after each step; with fp32 parameters (CPU)
the master weights are the parameters themselves and the mixed-precision path does nothing.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from hfrl.distributed.env import collective_device
from hfrl.distributed.data_parallel import (LOW_PRECISION, GradBucketer, ZeroOneOptimizer,
                                            group_size_rank, unique_params)
from hfrl.distributed.tensor_parallel import DUPLICATE_ATTR, REPLICATED_ROWS_ATTR, SHARD_ATTR
from hfrl.engine.config import LR_SCHEDULES as SCHEDULES, OptimConfig  # noqa: F401 (re-exported)


# ---- optimizers ---------------------------------------------------------------------------------

def param_groups(params: Iterable[torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: >= 2-D tensors decay, 1-D tensors (norm weights, biases) do not.

    Tied parameters appear once; parameters that do not require grad are left out.
    """
    params = [p for p in unique_params(params) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class MixedPrecisionAdamW(torch.optim.AdamW):
    """torch AdamW over fp32 master weights, with the DP gradient average (ZeRO-0) built in.

    bf16 parameters get an fp32 master copy (``master_params``, with the parameter's TP tags);
    fp32 parameters are their own master. ``accumulate_grads`` adds bf16 ``.grad``
    into the fp32 master ``.grad`` (call it after each micro-batch's backward to accumulate in fp32;
    ``reduce_gradients`` calls it too), ``reduce_gradients`` averages the master grads over DP in
    buckets, ``step`` updates the masters and copies them back into the bf16 parameters.
    """

    grads_sharded_over_dp = False

    def __init__(self, params: Iterable[Any], dp_group: Any = None, *, bucket_mb: float = 25.0, **adamw_kwargs):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        self.master_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                if p.dtype not in (torch.float32, *LOW_PRECISION):
                    raise ValueError(f"parameter of dtype {p.dtype}: MixedPrecisionAdamW supports float32 and "
                                     "bfloat16 (fp16 would need loss scaling, which hfrl does not implement)")
                master = p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                for attr in (SHARD_ATTR, REPLICATED_ROWS_ATTR, DUPLICATE_ATTR):  # tags for the global norm
                    if master is not p and hasattr(p, attr):
                        setattr(master, attr, getattr(p, attr))
                self.model_params.append(p)
                self.master_params.append(master)
                masters.append(master)
            master_groups.append({**group, "params": masters})
        self._low_precision = [(p, m) for p, m in zip(self.model_params, self.master_params) if m is not p]
        self._index = {id(p): i for i, p in enumerate(self.model_params)}
        super().__init__(master_groups, **adamw_kwargs)
        self.dp_group = dp_group
        self._bucketer = GradBucketer(self.master_params, dp_group, bucket_mb)

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move the bf16 parameters' ``.grad`` into the fp32 master ``.grad`` (no-op for fp32)."""
        for p, master in self._low_precision:
            if p.grad is not None:
                if master.grad is None:
                    master.grad = p.grad.float()
                else:
                    master.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def grad_of(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor accumulating ``param``'s gradient (its fp32 master's ``.grad`` under bf16,
        else ``param.grad``), created as zeros if absent; valid after ``accumulate_grads``."""
        master = self.master_params[self._index[id(param)]]
        if master.grad is None:
            master.grad = torch.zeros_like(master)
        return master.grad

    def reduce_gradients(self) -> None:
        """Master ``.grad`` <- its average over the DP group (bucketed all-reduce)."""
        self.accumulate_grads()
        self._bucketer.allreduce()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        self.accumulate_grads()  # in case the engine went straight from backward to step
        loss = super().step(closure)
        for p, master in self._low_precision:
            p.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self._low_precision:
            p.grad = None

    @torch.no_grad()
    def sync_master_from_params(self) -> None:
        """Re-read the fp32 masters from the bf16 parameters after loading weights into the model."""
        for p, master in self._low_precision:
            master.copy_(p)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # The fp32 masters are the real weights under mixed precision: bf16 params alone lose bits.
        state["master_params"] = {i: m for i, m in enumerate(self.master_params) if m is not self.model_params[i]}
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params", {})
        super().load_state_dict(state_dict)
        for i, saved in masters.items():
            self.master_params[i].copy_(saved)
            self.model_params[i].copy_(saved)


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig,
                    dp_group: Any = None) -> MixedPrecisionAdamW | ZeroOneOptimizer:
    """AdamW without decay on 1-D params: ``MixedPrecisionAdamW`` (zero_stage 0) or ``ZeroOneOptimizer``.

    ``dp_group`` is the role's "dp" group; None means dp = 1 (not the default world group).
    """
    cfg.validate()
    groups = param_groups(params, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.zero_stage == 1:
        return ZeroOneOptimizer(groups, dp_group, **kwargs)
    return MixedPrecisionAdamW(groups, dp_group, bucket_mb=cfg.bucket_mb, **kwargs)


# ---- learning-rate schedule --------------------------------------------------------------------

def lr_multiplier(step: int, cfg: OptimConfig) -> float:
    """Factor on cfg.lr for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """LambdaLR with ``lr_multiplier``; call ``step()`` once after each optimizer step that was taken."""
    cfg.validate()

    def multiplier(step: int) -> float:  # a closure, so the config is not saved in the scheduler state
        return lr_multiplier(step, cfg)

    return LambdaLR(optimizer, multiplier)


# ---- global gradient norm and clipping ------------------------------------------------------------

def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.nn.utils.get_total_norm(grads, 2.0).to(device=device, dtype=torch.float32).square()


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, tp_group: Any = None,
                   pp_group: Any = None, dp_group: Any = None) -> float:
    """Clip ``.grad`` in place to a global L2 norm of ``max_norm``; return that norm (same on every rank).

    The norm is over the whole model, across every parallel axis: gradients of TP-sharded
    parameters (attribute ``hfrl_shard``) are summed over the TP group, replicated ones are counted
    once (by TP rank 0), rows that ``num_replicas`` consecutive TP ranks hold alike (attribute
    ``hfrl_replicated_rows`` = (start, stop, num_replicas): kv heads when num_kv_heads < tp) once
    (by the first replica), and stages are summed over the PP group; a tied copy tagged ``hfrl_duplicate``
    is clipped but not counted (its twin is). Gradients must already be DP-averaged;
    pass ``dp_group`` only when each DP rank holds a disjoint slice (ZeRO-1's master shards). The
    scaling is ``torch.nn.utils.clip_grad_norm_``'s (``max_norm / (norm + 1e-6)``, at most 1).
    ``max_norm`` 0 only computes the norm; a non-finite norm leaves the gradients untouched.
    A group of None means that axis has size 1 (as everywhere in hfrl; never the default world).
    """
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else collective_device(tp_group if tp_group is not None else pp_group)
    total_sq = _sum_of_squares(_grads_counted_here(params, group_size_rank(tp_group)[1]), device)
    for group in (tp_group, pp_group, dp_group):
        if group is not None and group_size_rank(group)[0] > 1:
            dist.all_reduce(total_sq, group=group)
    total = total_sq.sqrt()
    norm = float(total)
    if max_norm > 0 and math.isfinite(norm) and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def _grads_counted_here(params: list[torch.Tensor], tp_rank: int) -> list[torch.Tensor]:
    """The (pieces of) gradients this TP rank contributes, so that each element counts once over TP."""
    grads = []
    for p in params:
        if getattr(p, DUPLICATE_ATTR, False):  # a tied copy: its twin on another stage is counted
            continue
        if getattr(p, SHARD_ATTR, None) is None:
            if tp_rank == 0:  # replicated over TP: the same on every TP rank
                grads.append(p.grad)
            continue
        rows = getattr(p, REPLICATED_ROWS_ATTR, None)
        if rows is None or tp_rank % rows[2] == 0:
            grads.append(p.grad)
        else:  # rows [start, stop) are counted by the first of their replicas
            grads.extend((p.grad[:rows[0]], p.grad[rows[1]:]))
    return grads


def clip_optimizer_grads(optimizer: MixedPrecisionAdamW | ZeroOneOptimizer, max_norm: float,
                         tp_group: Any = None, pp_group: Any = None) -> float:
    """``clip_grad_norm`` over the gradients the optimizer will apply (call after ``reduce_gradients``)."""
    dp_group = optimizer.dp_group if optimizer.grads_sharded_over_dp else None
    return clip_grad_norm(optimizer.master_params, max_norm, tp_group, pp_group, dp_group)


def should_skip_step(grad_norm: float, skip_nonfinite: bool, groups: Sequence[Any] = ()) -> bool:
    """True on every rank of ``groups`` if the norm is inf/NaN on any of them.

    ``groups`` must together connect every rank of the role (e.g. its "mp" and "dp" groups), so
    that one rank's bad norm reaches all: the flag is max-reduced over each group in turn. When
    ``skip_nonfinite`` is False a non-finite norm raises FloatingPointError, on every rank alike.
    The engine should then zero the gradients and not advance the LR schedule.
    """
    bad = torch.tensor(0.0 if math.isfinite(grad_norm) else 1.0)
    for group in groups:
        if group is not None and group_size_rank(group)[0] > 1:
            bad = bad.to(collective_device(group))
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if float(bad) == 0.0:
        return False
    if not skip_nonfinite:
        raise FloatingPointError(f"non-finite gradient norm (local value {grad_norm}) on some rank; set "
                                 "optim.skip_nonfinite=true to skip such steps instead of failing")
    return True
