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
from dataclasses import dataclass
from typing import Any, Callable

from hfrl.controller.dispatch import Protocol, get_protocol
from hfrl.distributed.parallel_dims import ParallelDims, RoleGroups
from hfrl.distributed.resource_pool import ResourcePool


@dataclass
class WorkerContext:
    """Where a worker object lives: set as `self.ctx` before its `__init__` runs."""

    name: str
    rank: int
    """Global rank."""
    position: int
    """Index of this rank in the pool."""
    pool: ResourcePool
    dims: ParallelDims
    groups: RoleGroups
    """This rank's process groups of the layout (tp, pp, dp, mp, gen_tp, ...)."""
    device: Any
    runtime: Any
    """The process's `Runtime` (transport counters, the control group)."""

    @property
    def coord(self):
        return self.groups.coord


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


class RemoteError(RuntimeError):
    """A worker method raised on another rank. Carries rank, role, method and traceback."""

    def __init__(self, rank: int, role: str, method: str, exc_type: str, message: str,
                 remote_traceback: str):
        self.rank, self.role, self.method = rank, role, method
        self.exc_type, self.remote_message = exc_type, message
        self.remote_traceback = remote_traceback
        super().__init__(f"{role}.{method} failed on rank {rank}: {exc_type}: {message}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback}")

    def __reduce__(self):
        return (RemoteError, (self.rank, self.role, self.method, self.exc_type,
                              self.remote_message, self.remote_traceback))


class WorkerLostError(RuntimeError):
    """A rank stopped answering: its process died or its connection broke."""


class Future:
    """The pending result of a non-blocking call. `result()` collects it on rank 0; passing the
    Future to another call lets that call's ranks fetch their rows straight from this call's
    ranks instead."""

    def __init__(self, runtime, call):
        self._runtime = runtime
        self._call = call

    @property
    def call_id(self) -> int:
        return self._call.cid

    def result(self) -> Any:
        return self._runtime.resolve(self._call)

    def wait(self) -> None:
        """Block until every rank of the call has finished (raises its RemoteError if any)."""
        self._runtime.wait_status(self._call)

    def __del__(self):
        runtime = getattr(self, "_runtime", None)
        if runtime is not None:
            runtime.forget(self._call)


class WorkerGroup:
    """Rank 0's handle on one role's workers: attribute access gives remote methods.

    Creating it is collective over the whole world (every rank builds the layout's process
    groups in the same order); the workers are constructed on the pool's ranks with
    `worker_cls(*args, **kwargs)`, `self.ctx` already set.
    """

    def __init__(self, worker_cls: type, pool: ResourcePool, layout: ParallelDims | None = None,
                 *args, name: str | None = None, **kwargs):
        from hfrl.controller.coordinator import get_runtime

        layout = layout if layout is not None else ParallelDims(dp=len(pool))
        if layout.world_size != len(pool):
            raise ValueError(f"layout {layout.describe()} needs {layout.world_size} ranks but pool "
                             f"{pool.name!r} has {len(pool)}: {list(pool.ranks)}")
        self.worker_cls = worker_cls
        self.pool = pool
        self.layout = layout
        self.name = name or worker_cls.__name__
        self._runtime = get_runtime()
        self.gid = self._runtime.create_group(self.name, worker_cls, pool, layout, args, kwargs)

    def __getattr__(self, method: str) -> Callable:
        if method.startswith("_"):
            raise AttributeError(method)
        proto = protocol_of(self.worker_cls, method)

        @functools.wraps(getattr(self.worker_cls, method))
        def call(*args, blocking: bool = True, **kwargs):
            return self._runtime.call(self, method, proto, args, kwargs, blocking)

        return call

    def __repr__(self) -> str:
        return (f"WorkerGroup({self.name}, pool={self.pool.name}:{list(self.pool.ranks)}, "
                f"{self.layout.describe()})")
