"""What every rank of a single-controller job holds: the transport, process groups, workers.

`Driver` (rank 0, driver.py) and `Server` (every other rank, serve.py) extend `Runtime`. What
they share runs here, the same way on every rank, rank 0 included: worker-group creation, the
status an output rank reports (`output_status`), and both ends of a chained Future (a producer
sending rows of its stored output, `send_rows`; a consumer assembling its argument from the
producers' pieces, `assemble_arguments`).
"""
from __future__ import annotations

import datetime
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from hfrl.controller.batch import Batch
from hfrl.controller.dispatch import row_lengths
from hfrl.controller.transport import DATA, Transport
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
        self.inbox: dict[tuple[int, str], list] = defaultdict(list)
        """Pieces this rank sent itself (producer and consumer on one rank), per (call, key)."""

    def create_local(self, cmd: dict) -> None:
        """Build the role's process groups and its `links` (rank sets reaching outside the pool;
        their members find them in `self.cache`), collective over the world, and, on the pool's
        ranks, construct the worker."""
        pool, dims = cmd["pool"], cmd["dims"]
        role_groups = build_groups(cmd["name"], dims, pool.ranks, self.rank, self.cache)
        for ranks in cmd.get("links", ()):   # groups spanning pools (a weight sync), same order everywhere
            self.cache.get(tuple(ranks))
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

    # ---- chained futures: both ends ---------------------------------------------------------
    def send_rows(self, fid: int, dst_cid: int, key: str, pieces: list) -> None:
        """Send rows [lo, hi) of stored output `fid` to each consumer rank `dst` of call
        `dst_cid`, in order (to itself: into the inbox, no transport); a consumer gets an error
        piece instead when they cannot be sent, so it never waits for rows that will not come."""
        output = self.store.get(fid)
        for dst, lo, hi in pieces:
            if isinstance(output, Batch):
                piece = output[lo:hi]
            else:
                piece = {"error": f"no stored Batch output of call {fid} on rank {self.rank} "
                                  "(the producing call failed or was released)"}
            if dst == self.rank:
                self.inbox[(dst_cid, key)].append(piece)
                continue
            try:
                msg = self.transport.encode_message(piece)
            except Exception as err:  # noqa: BLE001 - the consumer must get its piece or why
                msg = self.transport.encode_message(
                    {"error": f"rows {lo}:{hi} cannot be encoded: {type(err).__name__}: {err}"})
            self.transport.post(msg, dst, DATA)

    def assemble_arguments(self, cmd: dict, relayed: dict | None = None) -> tuple[tuple, dict]:
        """A call's arguments with each `Remote` placeholder filled: relayed ones from
        `relayed`, chained ones concatenated from the producers' pieces (`cmd["assemble"]`: per
        key, the runs and the meta the joined value carries). Every piece sent for this call is
        read, even after one turned out to be an error, so none is left for the next call."""
        chained, errors = {}, []
        for key, spec in cmd["assemble"].items():
            pieces = []
            for src, lo, hi in spec["runs"]:
                if src == self.rank:
                    piece = self.inbox[(cmd["cid"], key)].pop(0)
                else:
                    piece = self.transport.recv(src, DATA)
                if isinstance(piece, dict):   # the producer could not send its rows
                    errors.append(f"rank {src} could not send rows {lo}:{hi} of argument "
                                  f"{key!r}: {piece['error']}")
                pieces.append(piece)
            self.inbox.pop((cmd["cid"], key), None)
            if not errors:
                chained[key] = (Batch.concat(pieces, check_meta=False) if len(pieces) > 1
                                else pieces[0])
                chained[key].meta = dict(spec["meta"])   # as in the joined value
        if errors:
            raise RuntimeError("; ".join(errors))

        def value(key: str, v: Any) -> Any:
            if not isinstance(v, Remote):
                return v
            return relayed[key] if v.kind == "relayed" else chained[key]

        args = tuple(value(f"#{i}", a) for i, a in enumerate(cmd["args"]))
        return args, {k: value(k, v) for k, v in cmd["kwargs"].items()}


def output_status(value: Any, stored: bool) -> dict:
    """What a rank reports about its output with its status: its rows and, for an output kept
    on the rank (`stored`), the token counts of its mask columns (a balanced consumer regroups
    by them) and its meta (small; a chained consumer's pieces and `Future.meta` carry it)."""
    status: dict[str, Any] = {"rows": len(value) if isinstance(value, Batch) else None}
    if stored and isinstance(value, Batch):
        status["lengths"] = {k: row_lengths(t) for k, t in value.tensors.items()
                             if k.endswith("mask") and t.dim() >= 2}
        status["meta"] = value.meta
    return status
