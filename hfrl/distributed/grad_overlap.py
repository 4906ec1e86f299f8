"""Data-parallel gradient reduction overlapped with backward, as DDP and Megatron do it.

Without overlap a step runs every micro-batch's backward and only then reduces the gradients over
DP (``GradBucketer.allreduce`` or ``ZeroOneOptimizer.reduce_gradients``). With it, the reduction of
each bucket starts inside the step's *last* backward, as soon as the bucket's gradients are final:

    reducer = overlapped_allreduce(opt.model_params, opt.master_params, dp_group)   # ZeRO-0
    reducer = overlapped_zero_one(zero_one_optimizer)                               # ZeRO-1
    reducer.begin_step(num_micro_batches)
    for mb in micro_batches:
        (loss(mb) * weight).backward()     # hooks launch buckets during the last backward only
        reducer.after_backward()
    reducer.finish()                       # launch what is left, wait: grads are DP-averaged

The arithmetic is that of the non-overlapped path: the same gradients summed over DP and divided
by dp. Buckets follow the model's parameter order rather than the optimizer's, so at dp > 2 the
order of the fp32 additions, and so their rounding, may differ; at dp = 2 the results are equal bit
for bit. Whether overlap pays depends on the backend: NCCL runs collectives beside the compute;
gloo on a CPU runs them on threads that compete with backward for the same cores (see
``EngineConfig.overlap_grad_reduce`` for the measurement behind the CPU default).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from hfrl.distributed.data_parallel import GradBucketer, ZeroOneOptimizer


class OverlappedGradReduce:
    """Starts the DP gradient reduction inside the step's last backward, bucket by bucket (as DDP does).

    Each of ``params`` but the ``deferred`` ones gets a post-accumulate-grad hook. The hooks act only
    while armed: during the backward of the step's last micro-batch (``begin_step(num_micro_batches)``,
    then ``after_backward()`` after every micro-batch's backward). Earlier micro-batches accumulate
    locally with no communication, as under DDP's ``no_sync``. In the last backward a hook moves the
    parameter's gradient to where the optimizer accumulates it (``move_grad(i)``: the fp32 master's
    ``.grad`` under bf16, ZeRO-1's flat buffer) and marks it ready. A bucket whose parameters are all
    ready is launched (``launch(b)``) as soon as every bucket before it is, so all ranks start the
    collectives in one order even if their gradients become ready in different ones.

    ``finish()`` moves the gradients no hook moved, launches the remaining buckets (those holding a
    parameter that got no gradient in the last micro-batch, and the deferred ones, which must come
    last: tied embedding copies, whose gradients are summed across pipeline stages in between) and
    waits for all (``wait()``, which launches whatever is left in order and completes the reduction).

    ``launched_in_backward``: buckets the current or last step launched from hooks (0: no overlap).
    """

    def __init__(self, params: Sequence[torch.Tensor], buckets: Sequence[Sequence[int]],
                 launch: Callable[[int], None], wait: Callable[[], None], *,
                 move_grad: Callable[[int], None] | None = None, reset: Callable[[], None] | None = None,
                 deferred: Iterable[torch.Tensor] = ()):
        self.params = list(params)
        self.buckets = [sorted(set(members)) for members in buckets]
        self._launch, self._wait, self._move_grad, self._reset = launch, wait, move_grad, reset
        deferred_ids = {id(p) for p in deferred}
        with_deferred = [any(id(self.params[i]) in deferred_ids for i in b) for b in self.buckets]
        assert with_deferred == sorted(with_deferred), "buckets with deferred parameters must come last"
        self._buckets_of: list[list[int]] = [[] for _ in self.params]
        for b, members in enumerate(self.buckets):
            for i in members:
                self._buckets_of[i].append(b)
        self._handles = [p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
                         for i, p in enumerate(self.params) if id(p) not in deferred_ids]
        self._backwards_left = 0
        self._new_step()

    def _new_step(self) -> None:
        self._armed = False
        self._ready = [False] * len(self.params)
        self._pending = [len(members) for members in self.buckets]
        self._next = 0  # buckets [0, _next) are launched
        self.launched_in_backward = 0

    def begin_step(self, num_micro_batches: int) -> None:
        """A step of ``num_micro_batches`` backwards starts; the hooks arm for the last one."""
        if self._next > 0 and self._reset is not None:  # the previous step failed after launching
            self._reset()
        self._new_step()
        self._backwards_left = num_micro_batches
        self._armed = num_micro_batches == 1

    def after_backward(self) -> None:
        """Call after each micro-batch's backward (the pipeline schedule's ``after_backward``)."""
        self._backwards_left -= 1
        self._armed = self._backwards_left == 1

    def _on_grad(self, i: int, param: torch.Tensor) -> None:
        if not self._armed:
            return
        if self._ready[i]:
            raise RuntimeError(f"parameter {i} (shape {tuple(param.shape)}) received its gradient twice in one "
                               "backward (reentrant activation checkpointing?); its bucket was already reduced")
        if self._move_grad is not None:
            self._move_grad(i)
        self._ready[i] = True
        for b in self._buckets_of[i]:
            self._pending[b] -= 1
        while self._next < len(self.buckets) and self._pending[self._next] == 0:
            self._launch(self._next)
            self._next += 1
            self.launched_in_backward += 1

    def finish(self) -> None:
        """Move the remaining gradients, launch the remaining buckets in order, wait for every bucket."""
        self._armed = False
        if self._move_grad is not None:
            for i, ready in enumerate(self._ready):
                if not ready:
                    self._move_grad(i)
        self._wait()
        launched = self.launched_in_backward
        self._new_step()
        self.launched_in_backward = launched

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def overlapped_allreduce(model_params: Sequence[torch.Tensor], master_params: Sequence[torch.Tensor],
                         dp_group: Any = None, bucket_mb: float = 25.0, deferred: Iterable[torch.Tensor] = (),
                         order: Iterable[torch.Tensor] | None = None) -> OverlappedGradReduce:
    """``GradBucketer.allreduce`` of the masters' ``.grad``, started from hooks on the model parameters.

    ``master_params[i]`` is the fp32 master of ``model_params[i]`` (``MixedPrecisionAdamW``'s lists;
    the parameter itself when it is fp32). A bf16 gradient is added into its master's fp32 ``.grad``
    as ``MixedPrecisionAdamW.accumulate_grads`` does. Buckets follow ``order`` reversed: pass
    ``model.parameters()``, whose order backward roughly reverses (the optimizer's lists put 1-D
    parameters after all matrices). Each ``deferred`` parameter gets a bucket of its own, launched last.
    """
    position = _positions(model_params, order)
    pairs = sorted(zip(model_params, master_params), key=lambda pair: position[id(pair[0])])
    model_params, master_params = [p for p, _ in pairs], [m for _, m in pairs]
    master_of = {id(p): m for p, m in pairs}
    bucketer = GradBucketer(master_params, dp_group, bucket_mb, separate=[master_of[id(p)] for p in deferred])
    index = {id(m): i for i, m in enumerate(master_params)}

    @torch.no_grad()
    def move_grad(i: int) -> None:
        p, master = model_params[i], master_params[i]
        if master is not p and p.grad is not None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    return OverlappedGradReduce(model_params, [[index[id(m)] for m in b] for b in bucketer.buckets],
                                bucketer.launch, bucketer.finish, move_grad=move_grad, reset=bucketer.reset,
                                deferred=deferred)


def _positions(params: Sequence[torch.Tensor], order: Iterable[torch.Tensor] | None) -> dict[int, int]:
    """id -> position of each of ``params`` in ``order`` (default: their own order)."""
    position = {id(p): i for i, p in enumerate(params if order is None else order)}
    missing = [i for i, p in enumerate(params) if id(p) not in position]
    assert not missing, f"parameters {missing} are not in the given order"
    return position


def plan_flat_buckets(numels: Sequence[int], shard_numel: int, dp: int, bucket_numel: int,
                      deferred: Sequence[bool], positions: Sequence[int] | None = None
                      ) -> list[tuple[int, int, list[int]]]:
    """Reduction buckets over ZeRO-1's flat buffer: ``[(start, stop, parameter indices), ...]`` in launch order.

    Parameters lie in order in a buffer padded to ``dp * shard_numel``. Ranges are cut from the end
    down, hold about ``bucket_numel`` elements (a larger parameter's piece goes alone) and never
    cross a shard boundary (each is reduced to one DP rank). They launch in the order their
    gradients should be complete: by the smallest model position (``positions``, default the
    buffer order) among their parameters, highest first; the padding's range first; deferred
    parameters' ranges last.
    """
    positions = list(range(len(numels))) if positions is None else positions
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    pieces = [(offsets[-1], dp * shard_numel, None)] if dp * shard_numel > offsets[-1] else []
    for i in reversed(range(len(numels))):
        a, b = offsets[i], offsets[i + 1]
        while b > a:  # split at shard boundaries, highest piece first
            cut = max(a, (b - 1) // shard_numel * shard_numel)
            pieces.append((cut, b, i))
            b = cut
    regular: list[list] = []
    late: list[list] = []
    for a, b, i in pieces:
        out = late if i is not None and deferred[i] else regular
        last = out[-1] if out else None
        if (last is None or last[0] != b or last[0] // shard_numel != a // shard_numel
                or last[1] - a > bucket_numel):
            out.append([a, b, []])
            last = out[-1]
        last[0] = a
        if i is not None and i not in last[2]:
            last[2].append(i)
    regular.sort(key=lambda r: -min((positions[i] for i in r[2]), default=len(numels)))
    return [(a, b, members) for a, b, members in regular + late]


def overlapped_zero_one(opt: ZeroOneOptimizer, bucket_mb: float = 25.0, deferred: Iterable[torch.Tensor] = (),
                        order: Iterable[torch.Tensor] | None = None) -> OverlappedGradReduce:
    """``opt.reduce_gradients`` started from backward hooks, in ranges of ~``bucket_mb`` of the flat gradient.

    Each range (``plan_flat_buckets``) lies in one DP rank's shard and is summed onto that rank
    alone (``dist.reduce``); ``finish()`` then fills ``grad_shard`` as ``reduce_gradients`` does.
    Every element still travels dp - 1 times in all, as in one reduce-scatter; a reduce-scatter
    per bucket would need shards laid out per bucket (Megatron's distributed optimizer), and so
    another checkpoint layout. Ranges launch in reverse ``order`` (pass ``model.parameters()``;
    the flat buffer puts 1-D parameters after all matrices); ``deferred`` parameters' ranges last.
    """
    deferred = list(deferred)
    deferred_ids = {id(p) for p in deferred}
    position = _positions(opt.params, order)
    bucket_numel = max(1, int(bucket_mb * 2**20) // opt.grad_buffer.element_size())
    plan = plan_flat_buckets([p.numel() for p in opt.params], opt.shard_numel, opt.dp, bucket_numel,
                             [id(p) in deferred_ids for p in opt.params], [position[id(p)] for p in opt.params])
    works: list[Any] = [None] * len(plan)

    def launch(b: int) -> None:
        if opt.dp > 1:
            start, stop, _ = plan[b]
            owner = dist.get_global_rank(opt.dp_group, start // opt.shard_numel)
            works[b] = dist.reduce(opt.grad_buffer[start:stop], dst=owner, group=opt.dp_group, async_op=True)

    def wait() -> None:
        for b, work in enumerate(works):
            if work is None:
                launch(b)
        for b, work in enumerate(works):
            if work is not None:
                work.wait()
            works[b] = None
        opt.take_reduced_slice()

    def reset() -> None:
        works[:] = [None] * len(works)

    return OverlappedGradReduce(opt.params, [members for _, _, members in plan], launch, wait,
                                move_grad=opt.accumulate_grad, reset=reset, deferred=deferred)
