"""Data parallelism: bucketed gradient all-reduce (ZeRO-0) and ZeRO-1 sharded AdamW.

Both average gradients over the DP group, so a step on `dp` ranks that each hold 1/dp of the batch
equals a single-process step on the whole batch (provided each rank's loss is its share of the
global mean, see ``hfrl.engine.microbatch``).

- ``GradBucketer`` packs ``.grad`` into flat buckets of about ``bucket_mb`` (reverse parameter
  order, as DDP does: the last layers' gradients are ready first in backward), launches one
  all-reduce per bucket, divides by dp and copies back.
- ``ZeroOneOptimizer`` is AdamW with its state sharded over DP. All parameters live in one flat
  buffer padded to a multiple of dp (the parameters become views of it); DP rank r owns the
  contiguous slice r and keeps fp32 master weights and Adam moments only for that slice. A step is:
  reduce-scatter the flat fp32 gradients (average), AdamW on the owned slice, all-gather the
  updated slices into the buffer, which updates every parameter in place.

Both reductions can also start during the last micro-batch's backward, bucket by bucket, from
gradient hooks: ``hfrl.distributed.grad_overlap`` drives them through ``GradBucketer.launch`` /
``finish`` and ``ZeroOneOptimizer.accumulate_grad`` / ``take_reduced_slice``.

Collectives use SUM and divide by dp: gloo lacks PREMUL_SUM, and AVG is not implemented by every
backend build. torch 2.13 renames ``reduce_scatter_tensor``/``all_gather_into_tensor`` to
``reduce_scatter_single``/``all_gather_single`` (the old names warn); the new names are used when
present. If the backend cannot reduce-scatter or all-gather into one flat tensor, the fallback is an
all-reduce of the whole buffer (then the slice is taken) and an all-gather into a list of equal,
padded chunk views.

Parameters without a gradient count as zero gradients on that rank (as DDP without
``find_unused_parameters``), so a parameter unused on every rank is still updated by weight decay,
unlike single-process AdamW, which skips parameters whose ``.grad`` is None.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_update

from hfrl.distributed.tensor_parallel import DUPLICATE_ATTR, REPLICATED_ROWS_ATTR, SHARD_ATTR

LOW_PRECISION = (torch.bfloat16,)


def group_size_rank(group: Any) -> tuple[int, int]:
    """(size, rank) of this process in ``group``.

    Throughout hfrl's parallel code a group of None means "this axis has size 1" (no
    communication), never torch's default world group: a role may span only part of the world.
    Pass ``dist.group.WORLD`` explicitly to mean the world.
    """
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def unique_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters in order, each once (tied weights appear once)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# ---- flat collectives with fallbacks -------------------------------------------------------------

_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_UNSUPPORTED: set[str] = set()  # collectives this process's backend refused (same on every rank)


def _is_unsupported(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(
        s in text for s in ("not supported", "unsupported", "not implemented", "does not support"))


def _native(name: str, collective: Callable | None, *args, **kwargs) -> bool:
    """Run the tensor-API collective if this backend has it; False means "use the fallback".

    "Unsupported" is raised before any data moves and on every rank alike, so falling back stays
    in step; anything else (a dead peer, a timeout) propagates.
    """
    if name in _UNSUPPORTED or collective is None:
        return False
    try:
        collective(*args, **kwargs)
        return True
    except (RuntimeError, NotImplementedError) as err:
        if not _is_unsupported(err):
            raise
        _UNSUPPORTED.add(name)
        return False


def reduce_scatter_sum(output: torch.Tensor, flat: torch.Tensor, group: Any) -> None:
    """output (n,) <- slice ``rank`` of the sum over ``group`` of flat (size * n,)."""
    size, rank = group_size_rank(group)
    if _native("reduce_scatter", _REDUCE_SCATTER, output, flat, group=group):
        return
    # Fallback: all-reduce everything (dp times the traffic) and keep our slice.
    summed = flat.clone()
    dist.all_reduce(summed, group=group)
    n = output.numel()
    output.copy_(summed[rank * n:(rank + 1) * n])


def all_gather_flat(flat: torch.Tensor, shard: torch.Tensor, group: Any) -> None:
    """flat (size * n,) <- concatenation over ``group`` of each rank's shard (n,)."""
    if _native("all_gather", _ALL_GATHER, flat, shard, group=group):
        return
    # Fallback: a list of equal chunk views (the buffer is padded so every chunk has n elements).
    dist.all_gather(list(flat.chunk(group_size_rank(group)[0])), shard, group=group)


# ---- ZeRO-0: bucketed all-reduce -----------------------------------------------------------------

class GradBucketer:
    """Averages the ``.grad`` of ``params`` over ``dp_group`` in flat buckets of ~``bucket_mb``.

    Buckets are formed once, in reverse parameter order, each holding parameters of one dtype and
    device; a parameter larger than the bucket size gets a bucket of its own, and so does each of
    ``separate`` (placed after all the others, to be launched last: see ``hfrl.distributed.grad_overlap``). The flat
    buffers are allocated on first use and reused. Reduce fp32 gradients: under mixed precision
    pass the fp32 master parameters (``MixedPrecisionAdamW.master_params``), not the bf16 model
    parameters. ``dp_group`` None means dp = 1: nothing to do.

    ``allreduce()`` does a whole step; ``launch(i)`` (bucket i's grads are final) and ``finish()``
    (launch the rest, wait, copy the averages back) split it for overlap with backward.
    """

    def __init__(self, params: Iterable[torch.Tensor], dp_group: Any = None, bucket_mb: float = 25.0, *,
                 separate: Iterable[torch.Tensor] = ()):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb={bucket_mb!r} must be positive (megabytes per all-reduce bucket)")
        self.params = [p for p in unique_params(params) if p.requires_grad]
        self.dp_group = dp_group
        self.dp = group_size_rank(dp_group)[0]
        self.buckets = self._assign(int(bucket_mb * 2**20), {id(p) for p in separate})
        self._buffers: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._works: list[Any] = [None] * len(self.buckets)

    def _assign(self, bucket_bytes: int, separate: set[int]) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []
        current_bytes, key = 0, None
        for p in reversed(self.params):
            if id(p) in separate:
                continue
            nbytes = p.numel() * p.element_size()
            if current and ((p.dtype, p.device) != key or current_bytes + nbytes > bucket_bytes):
                buckets.append(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
            key = (p.dtype, p.device)
        if current:
            buckets.append(current)
        return buckets + [[p] for p in reversed(self.params) if id(p) in separate]

    def allreduce(self) -> None:
        """Replace every ``.grad`` by its DP average (a missing grad counts as zeros and is created)."""
        for i in range(len(self.buckets)):
            # Asynchronous, so packing the next bucket overlaps this one's communication.
            self.launch(i)
        self.finish()

    @torch.no_grad()
    def launch(self, i: int) -> None:
        """Pack bucket ``i``'s ``.grad`` into its flat buffer and start its all-reduce (asynchronous)."""
        if self.dp == 1:
            return
        assert self._works[i] is None, f"bucket {i} launched twice in one step"
        bucket = self.buckets[i]
        if self._buffers[i] is None:
            self._buffers[i] = torch.empty(sum(p.numel() for p in bucket), dtype=bucket[0].dtype,
                                           device=bucket[0].device)
        buf, offset = self._buffers[i], 0
        for p in bucket:
            n = p.numel()
            if p.grad is None:
                buf[offset:offset + n].zero_()
            else:
                buf[offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        self._works[i] = dist.all_reduce(buf, group=self.dp_group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets not launched yet, wait for all, and copy the averages into ``.grad``."""
        if self.dp == 1:
            return
        for i, work in enumerate(self._works):
            if work is None:
                self.launch(i)
        for i, (bucket, buf) in enumerate(zip(self.buckets, self._buffers)):
            self._works[i].wait()
            self._works[i] = None
            buf.div_(self.dp)
            offset = 0
            for p in bucket:
                n = p.numel()
                chunk = buf[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = chunk.clone()
                else:
                    p.grad.copy_(chunk)
                offset += n

    def reset(self) -> None:
        """Forget launched collectives without waiting (after a failed step: they may never complete)."""
        self._works = [None] * len(self.buckets)


def allreduce_gradients(params: Iterable[torch.Tensor], dp_group: Any = None, bucket_mb: float = 25.0) -> None:
    """One-off bucketed DP average of ``.grad`` (build a ``GradBucketer`` once to reuse buffers)."""
    GradBucketer(params, dp_group, bucket_mb).allreduce()


# ---- ZeRO-1 -----------------------------------------------------------------------------------------

class ZeroOneOptimizer(torch.optim.Optimizer):
    """AdamW whose fp32 master weights and moments are sharded over ``dp_group`` (ZeRO stage 1).

    Takes parameters or param groups like ``torch.optim.AdamW`` (per-group ``lr`` and
    ``weight_decay``; an LR scheduler works on ``param_groups`` as usual) and gives the same
    updates (``dp_group`` None: dp = 1, one shard holding everything). All parameters must share
    one dtype (fp32, or bf16 with fp32 master weights) and one device. Construction makes every
    parameter a view of ``param_buffer``: build it after the model is moved, parallelized and
    loaded; ``step`` raises if a parameter was re-bound since.

    Engine-facing protocol (shared with ``hfrl.engine.optim.MixedPrecisionAdamW``):
    ``accumulate_grads()`` after a micro-batch's backward (optional: moves bf16 ``.grad`` into the
    fp32 flat gradient), ``reduce_gradients()`` once per step, the clipped norm over
    ``master_params`` (with ``grads_sharded_over_dp``: sum over DP too), ``step()``, ``zero_grad()``.
    """

    grads_sharded_over_dp = True

    def __init__(self, params: Iterable[Any], dp_group: Any = None, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.dp_group = dp_group
        self.dp, self.dp_rank = group_size_rank(dp_group)
        self.params = [p for g in self.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("ZeroOneOptimizer got no parameters")
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:  # they would sit in the flat buffer and still be decayed; AdamW would skip them
            raise ValueError(f"parameters {frozen} do not require grad; pass only trainable parameters "
                             "(hfrl.engine.optim.param_groups leaves frozen ones out)")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"ZeroOneOptimizer needs parameters of one dtype and device, got dtypes "
                             f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}; cast the model first")
        self.param_dtype = dtypes.pop()
        if self.param_dtype not in (torch.float32, *LOW_PRECISION):
            raise ValueError(f"parameters are {self.param_dtype}; ZeroOneOptimizer supports float32 and "
                             "bfloat16 (fp16 would need loss scaling, which hfrl does not implement)")
        device = devices.pop()
        self.numel = sum(p.numel() for p in self.params)
        self.shard_numel = math.ceil(self.numel / self.dp)
        padded = self.shard_numel * self.dp
        lo, hi = self.dp_rank * self.shard_numel, (self.dp_rank + 1) * self.shard_numel
        self.param_buffer, self._offsets = self._flatten_params(padded, device)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.grad_buffer = torch.zeros(padded, dtype=torch.float32, device=device)  # local, accumulated
        own = self.param_buffer[lo:hi]
        # fp32 parameters: the master shard *is* the owned slice, updated in place.
        self.master_shard = own if self.param_dtype == torch.float32 else own.float()
        self.grad_shard = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)  # DP-averaged
        self.exp_avg = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.step_count = 0
        self._grads_reduced = False
        self._segments = self._group_segments(lo, hi)
        self.master_params = self._master_views(lo, hi)

    @torch.no_grad()
    def _flatten_params(self, padded: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Flat buffer in the model dtype; the parameters become views of it (no second copy)."""
        buffer = torch.zeros(padded, dtype=self.param_dtype, device=device)
        offsets, offset = [], 0
        for p in self.params:
            n = p.numel()
            buffer[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = buffer[offset:offset + n].view_as(p)
            offsets.append(offset)
            offset += n
        return buffer, offsets

    def _group_segments(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """Per param group, the [a, b) range of the owned shard (local offsets) it covers."""
        segments, start = [], 0
        for group in self.param_groups:
            end = start + sum(p.numel() for p in group["params"])
            a, b = max(start, lo), min(end, hi)
            segments.append((a - lo, b - lo) if b > a else (0, 0))
            start = end
        return segments

    def _master_views(self, lo: int, hi: int) -> list[torch.Tensor]:
        """One fp32 view of the master shard per (piece of a) parameter this rank owns.

        Each view's ``.grad`` is the matching piece of the DP-averaged gradient shard. It carries the
        parameter's TP tags so the global norm counts every element once: ``hfrl_shard``, and
        ``hfrl_replicated_rows`` translated from rows of the parameter to elements of the 1-D view.
        """
        views = []
        for p, offset in zip(self.params, self._offsets):
            a, b = max(offset, lo), min(offset + p.numel(), hi)
            if b <= a:
                continue
            view = self.master_shard[a - lo:b - lo]
            view.grad = self.grad_shard[a - lo:b - lo]
            for attr in (SHARD_ATTR, DUPLICATE_ATTR):
                if hasattr(p, attr):
                    setattr(view, attr, getattr(p, attr))
            rows = getattr(p, REPLICATED_ROWS_ATTR, None)
            if rows is not None:
                start, stop, num_replicas = rows
                row_numel = p.numel() // p.shape[0]
                s, e = max(offset + start * row_numel, a), min(offset + stop * row_numel, b)
                if e > s:
                    setattr(view, REPLICATED_ROWS_ATTR, (s - a, e - a, num_replicas))
            views.append(view)
        return views

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "param_buffer"):  # during __init__ the base class adds the groups
            raise RuntimeError("ZeroOneOptimizer's flat layout is fixed at construction; "
                               "pass every param group to the constructor")
        super().add_param_group(param_group)

    # ---- the step, in stages --------------------------------------------------------------------

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add every ``.grad`` into the fp32 flat gradient and drop it (fp32 accumulation for bf16)."""
        for i in range(len(self.params)):
            self.accumulate_grad(i)

    @torch.no_grad()
    def accumulate_grad(self, i: int) -> None:
        """``accumulate_grads`` for ``self.params[i]`` alone."""
        p = self.params[i]
        if p.grad is not None:
            offset = self._offsets[i]
            self.grad_buffer[offset:offset + p.numel()].add_(p.grad.reshape(-1))
            p.grad = None

    @torch.no_grad()
    def grad_of(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s slice of the fp32 flat gradient (a view), valid after ``accumulate_grads``."""
        offset = self._offsets[self._index[id(param)]]
        return self.grad_buffer[offset:offset + param.numel()].view(param.shape)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter the flat gradients: ``grad_shard`` <- DP average of the owned slice."""
        self.accumulate_grads()
        if self.dp == 1:
            self.grad_shard.copy_(self.grad_buffer)
        else:
            reduce_scatter_sum(self.grad_shard, self.grad_buffer, self.dp_group)
            self.grad_shard.div_(self.dp)
        self._grads_reduced = True

    @torch.no_grad()
    def take_reduced_slice(self) -> None:
        """``grad_shard`` <- the owned slice of ``grad_buffer`` / dp, once something else (overlapped
        reduction, ``hfrl.distributed.grad_overlap``) has summed that slice over DP in place."""
        lo = self.dp_rank * self.shard_numel
        self.grad_shard.copy_(self.grad_buffer[lo:lo + self.shard_numel]).div_(self.dp)
        self._grads_reduced = True

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """AdamW on the owned slice (reducing gradients first if not done), then all-gather params."""
        if closure is not None:
            raise ValueError("ZeroOneOptimizer.step does not take a closure")
        if not self._grads_reduced:
            self.reduce_gradients()
        self._check_views()
        step = float(self.step_count)
        for group, (a, b) in zip(self.param_groups, self._segments):
            if b <= a:
                continue
            beta1, beta2 = group["betas"]
            # torch's own AdamW kernel (single-tensor path): same arithmetic as torch.optim.AdamW.
            adamw_update([self.master_shard[a:b]], [self.grad_shard[a:b]], [self.exp_avg[a:b]],
                         [self.exp_avg_sq[a:b]], [], [torch.tensor(step)], foreach=False,
                         amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        self.step_count += 1
        self._gather_params()
        self._grads_reduced = False

    def _gather_params(self) -> None:
        if self.dp == 1:
            if self.master_shard.data_ptr() != self.param_buffer.data_ptr():
                self.param_buffer.copy_(self.master_shard)
            return
        # A fresh tensor as input: all-gathering from a slice of the output buffer is not safe on gloo.
        shard = self.master_shard.to(self.param_dtype, copy=True)
        all_gather_flat(self.param_buffer, shard, self.dp_group)

    def _check_views(self) -> None:
        base = self.param_buffer.data_ptr()
        size = self.param_buffer.element_size()
        for i, (p, offset) in enumerate(zip(self.params, self._offsets)):
            if p.data_ptr() != base + offset * size:
                raise RuntimeError(
                    f"parameter {i} (shape {tuple(p.shape)}) is no longer a view of the ZeRO-1 buffer: it "
                    "was re-bound (model.to(), p.data = ...) after the optimizer was built; build the "
                    "optimizer after moving and loading the model")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.grad_buffer.zero_()
        self._grads_reduced = False

    @torch.no_grad()
    def sync_master_from_params(self) -> None:
        """Re-read the master shard from the parameters (bf16 only) after loading weights into the model."""
        if self.param_dtype != torch.float32:
            lo = self.dp_rank * self.shard_numel
            self.master_shard.copy_(self.param_buffer[lo:lo + self.shard_numel])

    # ---- checkpoints: each rank saves and loads its own shard -----------------------------------

    def layout(self) -> dict[str, Any]:
        """What must match for a shard to be loaded back: the DP layout and the parameter list."""
        return {"dp": self.dp, "dp_rank": self.dp_rank, "numel": self.numel, "shard_numel": self.shard_numel,
                "param_dtype": str(self.param_dtype).removeprefix("torch."),
                "shapes": [list(p.shape) for p in self.params],
                "group_sizes": [len(g["params"]) for g in self.param_groups]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: moments, fp32 master slice, step count, hyperparameters, layout.

        The moments are references (save them before the next step); the master slice is a copy,
        since for fp32 it is a view of the whole parameter buffer, which ``torch.save`` would write.
        """
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": {"step": self.step_count, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                          "master_shard": self.master_shard.clone()},
                "param_groups": groups, "layout": self.layout()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard saved by ``state_dict``; collective (all-gathers the parameters)."""
        saved, mine = state_dict.get("layout") or {}, self.layout()
        if saved != mine:
            diff = {k: (saved.get(k), mine[k]) for k in mine if saved.get(k) != mine[k]}
            raise ValueError(
                f"ZeRO-1 state was saved with a different layout; (saved, current) per key: {diff}. A shard "
                "loads only into the same dp size, DP rank and parameter list; reshard the checkpoint first")
        state = state_dict["state"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.master_shard.copy_(state["master_shard"])
        self.step_count = int(state["step"])
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved_group)
        self._gather_params()
