"""What every rank of a single-controller job holds: the transport, process groups, workers.

`Driver` (rank 0, driver.py) and `Server` (every other rank, serve.py) extend `Runtime`; the
worker-group creation they share runs here, on every rank, in the order rank 0 issued it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from hfrl.controller.transport import Transport
from hfrl.distributed.env import DistContext
from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, RoleGroups, build_groups
from hfrl.distributed.resource_pool import ResourcePool

_CURRENT: "Runtime | None" = None


def current() -> "Runtime | None":
    """The runtime of the running `hfrl.run`, or None outside one."""
    return _CURRENT


def set_current(runtime: "Runtime | None") -> None:
    global _CURRENT
    _CURRENT = runtime


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
    config: Any = None
    """The job's validated `hfrl.config.Config`, when hfrl.run was given one."""

    @property
    def coord(self):
        return self.groups.coord


@dataclass(frozen=True)
class Remote:
    """Placeholder, in a call command, for an argument the rank receives separately: assembled
    from producers' pieces (`chained`) or relayed down its replica's tree (`relayed`)."""

    key: str
    kind: str = "chained"


@dataclass
class GroupState:
    gid: int
    name: str
    pool: ResourcePool
    dims: ParallelDims
    worker: Any = None
    """The worker object, on the pool's ranks."""


class Runtime:
    """One per process: the transport, the process-group cache, worker objects, stored outputs."""

    def __init__(self, ctx: DistContext, config: Any = None):
        self.ctx = ctx
        self.config = config
        self.rank, self.world_size = ctx.rank, ctx.world_size
        timeout = datetime.timedelta(seconds=ctx.timeout_s)
        # On CUDA, GPU tensors travel GPU to GPU over dedicated NCCL groups, one per direction
        # of a pair (see Transport), with the job's timeout; everything else over gloo.
        data_groups = None
        if ctx.backend == "nccl":
            data_groups = (dist.new_group(backend="nccl", timeout=timeout),
                           dist.new_group(backend="nccl", timeout=timeout))
        self.transport = Transport(ctx.control_group, data_groups, ctx.device)
        self.cache = GroupCache(timeout=timeout)
        self.groups: dict[int, GroupState] = {}
        self.store: dict[int, Any] = {}
        """Outputs of non-eager calls kept on this rank until fetched, sent on, or released."""

    def create_local(self, cmd: dict) -> None:
        """Build the role's process groups (collective over the world) and, on the pool's
        ranks, construct the worker."""
        pool, dims = cmd["pool"], cmd["dims"]
        role_groups = build_groups(cmd["name"], dims, pool.ranks, self.rank, self.cache)
        state = GroupState(cmd["gid"], cmd["name"], pool, dims)
        self.groups[state.gid] = state
        if self.rank in pool:
            ctx = WorkerContext(name=cmd["name"], rank=self.rank,
                                position=pool.ranks.index(self.rank), pool=pool, dims=dims,
                                groups=role_groups, device=self.ctx.device, runtime=self,
                                config=self.config)
            worker = cmd["cls"].__new__(cmd["cls"])
            worker.ctx = ctx
            worker.__init__(*cmd["args"], **cmd["kwargs"])
            state.worker = worker
