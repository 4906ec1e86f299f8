"""Workers, `@register`, and the rank-0 handle on a role's workers: `WorkerGroup`.

    class Doubler(Worker):
        @register(protocol=DP_COMPUTE)
        def double(self, batch: Batch) -> Batch:
            return Batch({"y": batch["x"] * 2})

    def main():
        group = WorkerGroup(Doubler, ResourcePool("d", (0, 1)), ParallelDims(dp=2))
        out = group.double(batch)                      # split over DP, run on ranks 0-1, concat
        fut = group.double(batch, blocking=False)      # a Future; pass it to another call

    hfrl.run(main)

A worker object lives on every rank of its pool (several workers of different roles may share a
process: colocation). Methods run on each rank with that rank's share of the data, as the
registered protocol says (see dispatch.py). `self.ctx` tells a worker where it is.
"""
from __future__ import annotations

import functools
from typing import Callable

from hfrl.controller.dispatch import Protocol, get_protocol
from hfrl.controller.entry import get_runtime
from hfrl.controller.runtime import WorkerContext
from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.resource_pool import ResourcePool


class Worker:
    """Base class of role workers. Public methods decorated with `@register` are remote."""

    ctx: WorkerContext


def register(protocol: str | Protocol = "ONE_TO_ALL") -> Callable:
    """Mark a worker method as callable from rank 0 with the given transfer protocol."""
    resolved = get_protocol(protocol)

    def decorate(fn: Callable) -> Callable:
        fn._hfrl_protocol = resolved
        return fn

    return decorate


def protocol_of(worker_cls: type, method: str) -> Protocol:
    fn = getattr(worker_cls, method, None)
    if fn is None:
        raise AttributeError(f"{worker_cls.__name__} has no method {method!r}")
    proto = getattr(fn, "_hfrl_protocol", None)
    if proto is None:
        raise AttributeError(f"{worker_cls.__name__}.{method} is not a remote method: decorate "
                             f"it with @register(protocol=...)")
    return proto


class WorkerGroup:
    """Rank 0's handle on one role's workers: attribute access gives remote methods.

    Creating it is collective over the whole world (every rank builds the layout's process
    groups in the same order); the workers are constructed on the pool's ranks with
    `worker_cls(*args, **kwargs)`, `self.ctx` already set. `links`: rank sets reaching outside
    the pool (a weight sync between two pools) whose process groups are created with the group's
    own, on every rank; their members get them with `self.ctx.runtime.cache.get(ranks)`.
    """

    def __init__(self, worker_cls: type, pool: ResourcePool, layout: ParallelDims | None = None,
                 *args, name: str | None = None, links=(), **kwargs):
        layout = layout if layout is not None else ParallelDims(dp=len(pool))
        if layout.world_size != len(pool):
            raise ValueError(f"layout {layout.describe()} needs {layout.world_size} ranks but pool "
                             f"{pool.name!r} has {len(pool)}: {list(pool.ranks)}")
        self.worker_cls = worker_cls
        self.pool = pool
        self.layout = layout
        self.name = name or worker_cls.__name__
        self._runtime = get_runtime()
        links = tuple(tuple(int(r) for r in ranks) for ranks in links)
        self.gid = self._runtime.create_group(self.name, worker_cls, pool, layout, args, kwargs, links)

    def __getattr__(self, method: str) -> Callable:
        if method.startswith("_"):
            raise AttributeError(method)
        proto = protocol_of(self.worker_cls, method)

        @functools.wraps(getattr(self.worker_cls, method))
        def call(*args, blocking: bool = True, **kwargs):
            return self._runtime.call(self, method, proto, args, kwargs, blocking)

        setattr(self, method, call)   # built once: the next `group.method` is a plain lookup
        return call

    def __repr__(self) -> str:
        return (f"WorkerGroup({self.name}, pool={self.pool.name}:{list(self.pool.ranks)}, "
                f"{self.layout.describe()})")
