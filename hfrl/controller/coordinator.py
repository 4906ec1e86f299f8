"""The single controller without Ray: rank 0 runs the program, every other rank serves.

    hfrl.run(main)      # on every rank, under torchrun / srun / mpirun / plain python

Rank 0 calls `main()`. Each other rank enters `serve()`: it receives commands from rank 0 over
its own FIFO channel and runs them in that order. Rank 0 issues one total order of commands and
every rank runs its commands in that order, so the collectives inside worker methods always
match: there is no deadlock by design. Rank 0 runs its own share of a call inline.

Commands (rank 0 -> rank, CMD channel): create a worker group (sent to every rank: building
process groups is collective over the world), call a method, send a stored output's rows to
another rank (chained futures), fetch a stored output, shutdown, abort. Replies (rank -> rank 0,
REPLY channel): a status per call carrying the output (blocking calls), its row count, or the
remote error. Rank 0 receives replies in each rank's order and keeps those it is not yet waiting
for, so futures can be resolved in any order.

Failure: an exception in a worker method becomes a `RemoteError` on rank 0, raised where the
program waits for that call; the program may catch it. If `main` raises, rank 0 tells every rank
to abort and every process exits non-zero. A dead peer is seen by gloo as a closed connection
within about a second, and any other stall ends at the collective timeout.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from hfrl.controller.dispatch import (Protocol, balanced_order, chunk_row_ranges, join_outputs,
                                      ordered_chunks, padded_chunks, source_rows)
from hfrl.controller.protocol import Batch
from hfrl.controller.transport import CMD, DATA, REPLY, Transport
from hfrl.controller.worker_group import Future, RemoteError, WorkerContext, WorkerLostError
from hfrl.distributed.env import DistContext, init_distributed
from hfrl.distributed.parallel_dims import GroupCache, ParallelDims, build_groups
from hfrl.distributed.resource_pool import ResourcePool

logger = logging.getLogger(__name__)
_RUNTIME: "Runtime | None" = None


def get_runtime() -> "Runtime":
    if _RUNTIME is None:
        raise RuntimeError("no hfrl runtime: create worker groups inside a function run by "
                           "hfrl.run(main)")
    if _RUNTIME.rank != 0:
        raise RuntimeError(f"worker groups are driven from rank 0; rank {_RUNTIME.rank} only "
                           "serves (create them inside main, which hfrl.run runs on rank 0)")
    return _RUNTIME


@dataclass
class _GroupState:
    gid: int
    name: str
    pool: ResourcePool
    dims: ParallelDims
    worker: Any = None
    """The worker object, on the pool's ranks."""


@dataclass
class _Call:
    cid: int
    group: _GroupState
    method: str
    proto: Protocol
    eager: bool
    pad: int = 0
    num_input_rows: int | None = None
    order: list[int] | None = None
    """Balanced protocols: the padded input row behind each distributed row."""
    output_ranks: list[int] = field(default_factory=list)
    statuses: dict[int, dict] = field(default_factory=dict)
    has_result: bool = False
    result: Any = None


@dataclass(frozen=True)
class _Remote:
    """Placeholder for a Batch argument the rank assembles from pieces sent by other ranks."""

    key: str


class Runtime:
    """One per process: the transport, the process-group cache, worker objects, stored outputs."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.rank, self.world_size = ctx.rank, ctx.world_size
        # On CUDA, GPU tensors travel GPU to GPU over a dedicated NCCL group (p2p there never
        # interleaves with the models' collectives); everything else over the gloo control group.
        data_group = dist.new_group(backend="nccl") if ctx.backend == "nccl" else None
        self.transport = Transport(ctx.control_group, data_group, ctx.device)
        self.cache = GroupCache(timeout=datetime.timedelta(seconds=ctx.timeout_s))
        self.groups: dict[int, _GroupState] = {}
        self.store: dict[int, Any] = {}
        self.inbox: dict[tuple[int, str], list] = defaultdict(list)
        self._next_gid = 0
        self._next_cid = 0
        self._stash: dict[tuple[int, int, str], dict] = {}
        self._release: dict[int, list[int]] = defaultdict(list)
        self._discard: set[tuple[int, int]] = set()    # (rank, cid) replies nobody waits for
        self._expected: dict[int, int] = defaultdict(int)   # replies still to come, per rank

    # ---- rank 0: issuing commands -------------------------------------------------------
    def _send_cmd(self, rank: int, cmd: dict) -> None:
        if self._release.get(rank):
            cmd["release"] = self._release.pop(rank)
        if cmd["op"] in ("call", "fetch") or (cmd["op"] == "create" and rank in cmd["pool"]):
            self._expected[rank] += 1
        self.transport.send(cmd, rank, CMD)

    def create_group(self, name: str, worker_cls: type, pool: ResourcePool, dims: ParallelDims,
                     args: tuple, kwargs: dict) -> int:
        gid = self._next_gid
        self._next_gid += 1
        cmd = {"op": "create", "gid": gid, "name": name, "cls": worker_cls, "pool": pool,
               "dims": dims, "args": args, "kwargs": kwargs}
        for rank in range(1, self.world_size):
            self._send_cmd(rank, dict(cmd))
        self._create(cmd)
        cid = -(gid + 1)   # create statuses use negative ids
        for rank in pool.ranks:
            if rank != 0:
                self._check(self._reply(rank, cid, "status"), name, "__init__")
        return gid

    def call(self, group, method: str, proto: Protocol, args: tuple, kwargs: dict,
             blocking: bool) -> Any:
        state = self.groups[group.gid]
        dims, ranks = state.dims, state.pool.ranks
        include_self = 0 in ranks
        if include_self:   # rank 0 computes too: it needs the values itself
            args, kwargs = self._resolve_local_futures(args, kwargs)
        call = _Call(cid=self._next_cid, group=state, method=method, proto=proto,
                     eager=blocking or include_self)
        self._next_cid += 1
        outputs = proto.output_positions(dims)
        call.output_ranks = [ranks[p] for p in outputs]
        per_rank, plans = self._distribute(call, args, kwargs)
        for plan in plans:
            self._issue_sends(plan, call)
        for position, rank in enumerate(ranks):
            if rank == 0:
                continue
            cmd_args, cmd_kwargs, assemble = per_rank[position]
            self._send_cmd(rank, {"op": "call", "cid": call.cid, "gid": state.gid,
                                  "method": method, "args": cmd_args, "kwargs": cmd_kwargs,
                                  "assemble": assemble, "eager": call.eager,
                                  "want_output": position in outputs})
        if include_self:
            position = ranks.index(0)
            cmd_args, cmd_kwargs, _ = per_rank[position]
            try:
                value = getattr(state.worker, method)(*cmd_args, **cmd_kwargs)
            except Exception as local_error:
                self._raise_root_cause(call, local_error)
            if position in outputs:
                self.store[call.cid] = value
        future = Future(self, call)
        return future.result() if blocking else future

    def _raise_root_cause(self, call: _Call, local_error: Exception) -> None:
        """Rank 0's own share failed. Often that is a consequence (a collective timed out because
        another rank failed first): report another rank's non-timeout failure of the same call
        if there is one, else the local error."""
        root = None
        for rank in call.group.pool.ranks:
            if rank == 0:
                continue
            try:
                call.statuses[rank] = status = self._reply(rank, call.cid, "status")
            except WorkerLostError as lost:
                raise lost from local_error
            if not status["ok"] and root is None and not _is_timeout(status["error"][1]):
                root = status
        if root is not None:
            try:
                self._check(root, call.group.name, call.method)
            except RemoteError as remote:
                raise remote from local_error
        raise local_error

    def _resolve_local_futures(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def value(a):
            return a.result() if isinstance(a, Future) else a
        return tuple(value(a) for a in args), {k: value(v) for k, v in kwargs.items()}

    def _distribute(self, call: _Call, args: tuple, kwargs: dict) -> tuple[list[tuple], list]:
        """Per pool position: (args, kwargs, assemble spec for chained futures); chain plans."""
        dims, ranks, proto = call.group.dims, call.group.pool.ranks, call.proto
        named = {**{f"#{i}": a for i, a in enumerate(args)}, **kwargs}
        if proto.per_rank_args:
            for key, value in named.items():
                if not isinstance(value, (list, tuple)) or len(value) != len(ranks):
                    raise ValueError(f"{call.group.name}.{call.method} uses {proto.name}: "
                                     f"argument {key!r} must be a list with one entry per rank "
                                     f"({len(ranks)}), got {type(value).__name__}")
            pieces = {key: list(value) for key, value in named.items()}
        else:
            pieces = self._split_batches(call, named)
        per_rank = []
        for position in range(len(ranks)):
            chunk = proto.chunk_of(dims, position)
            mine = {k: (v[chunk] if isinstance(v, list) else v) for k, v in pieces.items()}
            assemble = {k: v.runs[ranks[position]] for k, v in pieces.items()
                        if isinstance(v, _ChainPlan)}
            mine = {k: (_Remote(k) if isinstance(v, _ChainPlan) else v) for k, v in mine.items()}
            pos_args = tuple(mine[f"#{i}"] for i in range(len(args)))
            per_rank.append((pos_args, {k: mine[k] for k in kwargs}, assemble))
        return per_rank, [v for v in pieces.values() if isinstance(v, _ChainPlan)]

    def _split_batches(self, call: _Call, named: dict) -> dict:
        n = call.proto.num_chunks(call.group.dims)
        # A future whose outputs already came to rank 0 (its pool includes rank 0) is a value.
        named = {k: (v.result() if isinstance(v, Future) and v._call.eager else v)
                 for k, v in named.items()}
        rows = {k: len(v) for k, v in named.items() if isinstance(v, Batch)}
        rows.update({k: self._future_rows(v._call) for k, v in named.items()
                     if isinstance(v, Future)})
        if len(set(rows.values())) > 1:
            raise ValueError(f"{call.group.name}.{call.method}: Batch arguments have different "
                             f"sizes {rows}; they are split together, so they must match")
        pieces = dict(named)
        batches = [v for v in named.values() if isinstance(v, Batch)]
        chained = any(isinstance(v, Future) for v in named.values())
        if call.proto.balance_key and batches and not chained:
            # One regrouping for every Batch argument, from the first that has the mask column.
            # (With a chained Future among the arguments, everything is split in order.)
            key = call.proto.balance_key
            source = next((b for b in batches if key in b.tensors), batches[0])
            call.order = balanced_order(source, n, key)
        for key, value in named.items():
            if isinstance(value, Batch) and call.order is not None:
                pieces[key], call.pad = ordered_chunks(value, n, call.order)
            elif isinstance(value, Batch):
                pieces[key], call.pad = padded_chunks(value, n)
            elif isinstance(value, Future):
                pieces[key] = self._chain(key, value._call, call, n)
        call.num_input_rows = next(iter(rows.values()), None)
        return pieces

    # ---- chained futures: consumers fetch rows straight from producers -------------------
    def _future_rows(self, producer: _Call) -> int:
        """Rows of a producer's joined (unpadded) output; waits for its statuses only."""
        self.wait_status(producer)
        counts = [producer.statuses[r]["rows"] for r in producer.output_ranks]
        if producer.proto.join != "concat" or any(c is None for c in counts):
            raise TypeError(f"{producer.group.name}.{producer.method} did not return a Batch per "
                            "output rank (or its protocol does not concatenate), so its Future "
                            "cannot be split for another call; pass future.result() instead")
        total = sum(counts)
        if producer.pad:
            per_row = total // (producer.num_input_rows + producer.pad)
            total = per_row * producer.num_input_rows
        return total

    def _chain(self, key: str, producer: _Call, consumer: _Call, num_chunks: int) -> "_ChainPlan":
        """Which rows of which producer rank each consumer rank receives, in order."""
        counts = [producer.statuses[r]["rows"] for r in producer.output_ranks]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        num_rows = self._future_rows(producer)
        ranges, consumer.pad = chunk_row_ranges(num_rows, num_chunks)
        dims, ranks = consumer.group.dims, consumer.group.pool.ranks
        runs = {}
        for position, rank in enumerate(ranks):
            start, end = ranges[consumer.proto.chunk_of(dims, position)]
            runs[rank] = [(producer.output_ranks[i], lo, hi)
                          for i, lo, hi in _runs(source_rows(range(start, end), num_rows),
                                                 starts, counts)]
        return _ChainPlan(key=key, producer=producer, runs=runs)

    def _issue_sends(self, plan: "_ChainPlan", consumer: _Call) -> None:
        for dst, runs in plan.runs.items():
            for src, lo, hi in runs:
                self._send_cmd(src, {"op": "send", "fid": plan.producer.cid, "dst": dst,
                                     "start": lo, "end": hi, "dst_cid": consumer.cid,
                                     "key": plan.key})

    # ---- rank 0: collecting ----------------------------------------------------------------
    def _reply(self, src: int, cid: int, kind: str) -> dict:
        """The reply (cid, kind) from `src`, receiving and keeping earlier ones as they come."""
        key = (src, cid, kind)
        while key not in self._stash:
            msg = self._recv_reply(src, f"call {cid}")
            if (src, msg["cid"]) in self._discard:
                self._discard.remove((src, msg["cid"]))
            else:
                self._stash[(src, msg["cid"], msg["kind"])] = msg
        return self._stash.pop(key)

    def _recv_reply(self, src: int, waiting_for: str) -> dict:
        try:
            msg = self.transport.recv(src, REPLY)
        except RuntimeError as err:   # gloo: connection closed, or the timeout
            raise WorkerLostError(f"lost contact with rank {src} while waiting for its reply to "
                                  f"{waiting_for}: {err}") from None
        self._expected[src] -= 1
        return msg

    def _check(self, status: dict, name: str, method: str) -> dict:
        if not status["ok"]:
            exc_type, message, tb = status["error"]
            raise RemoteError(status["rank"], name, method, exc_type, message, tb)
        return status

    def wait_status(self, call: _Call) -> None:
        for rank in call.group.pool.ranks:
            if rank != 0 and rank not in call.statuses:
                status = self._reply(rank, call.cid, "status")
                call.statuses[rank] = status
            if rank != 0:
                self._check(call.statuses[rank], call.group.name, call.method)

    def resolve(self, call: _Call) -> Any:
        if call.has_result:
            return call.result
        self.wait_status(call)
        values = []
        for rank in call.output_ranks:
            if rank == 0:
                values.append(self.store[call.cid])
            elif call.eager:
                values.append(call.statuses[rank].pop("value"))
            else:
                self._send_cmd(rank, {"op": "fetch", "cid": call.cid})
                reply = self._check(self._reply(rank, call.cid, "data"), call.group.name,
                                    call.method)
                values.append(reply["value"])
        call.result = join_outputs(values, call.proto.join, call.pad, call.num_input_rows,
                                   call.order)
        call.has_result = True
        self.store.pop(call.cid, None)
        return call.result

    def forget(self, call: _Call) -> None:
        """A Future was dropped: its ranks may free the stored output (told with the next
        command), and late replies are discarded."""
        if not call.eager:
            for rank in call.output_ranks:
                if rank != 0:
                    self._release[rank].append(call.cid)
        for rank in call.group.pool.ranks:
            if rank != 0 and rank not in call.statuses and \
                    self._stash.pop((rank, call.cid, "status"), None) is None:
                self._discard.add((rank, call.cid))

    # ---- every rank: executing commands ------------------------------------------------------
    def _create(self, cmd: dict) -> None:
        pool, dims = cmd["pool"], cmd["dims"]
        role_groups = build_groups(cmd["name"], dims, pool.ranks, self.rank, self.cache)
        state = _GroupState(cmd["gid"], cmd["name"], pool, dims)
        self.groups[state.gid] = state
        if self.rank in pool:
            ctx = WorkerContext(name=cmd["name"], rank=self.rank,
                                position=pool.ranks.index(self.rank), pool=pool, dims=dims,
                                groups=role_groups, device=self.ctx.device, runtime=self)
            worker = cmd["cls"].__new__(cmd["cls"])
            worker.ctx = ctx
            worker.__init__(*cmd["args"], **cmd["kwargs"])
            state.worker = worker

    def _assemble(self, cmd: dict, value: Any) -> Any:
        if not isinstance(value, _Remote):
            return value
        pieces = []
        for src, lo, hi in cmd["assemble"][value.key]:
            if src == self.rank:
                piece = self.inbox[(cmd["cid"], value.key)].pop(0)
            else:
                piece = self.transport.recv(src, DATA)
            if isinstance(piece, dict):   # the producer could not send its rows
                raise RuntimeError(f"rank {src} could not send rows {lo}:{hi}: {piece['error']}")
            pieces.append(piece)
        return Batch.concat(pieces, check_meta=False) if len(pieces) > 1 else pieces[0]

    def _serve_call(self, cmd: dict) -> dict:
        state = self.groups[cmd["gid"]]
        args = tuple(self._assemble(cmd, a) for a in cmd["args"])
        kwargs = {k: self._assemble(cmd, v) for k, v in cmd["kwargs"].items()}
        value = getattr(state.worker, cmd["method"])(*args, **kwargs)
        reply = {"rows": len(value) if isinstance(value, Batch) else None}
        if cmd["want_output"]:
            if cmd["eager"]:
                reply["value"] = value
            else:
                self.store[cmd["cid"]] = value
        return reply

    def _serve_send(self, cmd: dict) -> None:
        output = self.store.get(cmd["fid"])
        if isinstance(output, Batch):
            piece = output[cmd["start"]:cmd["end"]]
        else:
            piece = {"error": f"no stored Batch output of call {cmd['fid']} on rank {self.rank}"}
        if cmd["dst"] == self.rank:
            self.inbox[(cmd["dst_cid"], cmd["key"])].append(piece)
        else:
            self.transport.send(piece, cmd["dst"], DATA)

    def serve(self) -> int:
        """Run rank 0's commands until shutdown (returns 0) or abort (returns 1)."""
        while True:
            try:
                cmd = self.transport.recv(0, CMD)
            except RuntimeError as err:
                logger.error("rank %d: lost contact with rank 0 (the controller): %s", self.rank,
                             err)
                return 1
            for cid in cmd.get("release", ()):
                self.store.pop(cid, None)
            op = cmd["op"]
            if op == "shutdown":
                self.transport.flush()
                return 0
            if op == "abort":
                logger.error("rank %d: aborting because rank 0 failed", self.rank)
                return 1
            if op == "send":
                self._serve_send(cmd)
            elif op == "fetch":
                self._reply_to_zero(cmd["cid"], "data", lambda: {"value": self.store[cmd["cid"]]})
            elif op == "create":
                cid = -(cmd["gid"] + 1)
                self._reply_to_zero(cid, "status", lambda: self._create(cmd) or {},
                                    send=self.rank in cmd["pool"])
            elif op == "call":
                self._reply_to_zero(cmd["cid"], "status", lambda: self._serve_call(cmd))

    def _reply_to_zero(self, cid: int, kind: str, fn: Callable[[], dict], send: bool = True):
        try:
            reply = {"ok": True, **fn()}
        except Exception as err:  # noqa: BLE001 - every failure goes back to rank 0
            reply = {"ok": False, "error": (type(err).__name__, str(err), traceback.format_exc())}
        if send:
            self.transport.send({"cid": cid, "kind": kind, "rank": self.rank, **reply}, 0, REPLY)
        elif not reply["ok"]:
            # Nobody waits for this rank's reply, and a rank that missed a collective step must
            # not go on: fail loudly (peers see the connection close).
            raise RuntimeError(f"rank {self.rank}: {reply['error'][2]}")

    # ---- rank 0: ending ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Collect every reply still in flight (so each worker's sends complete), then stop."""
        for rank in range(1, self.world_size):
            while self._expected[rank] > 0:
                self._recv_reply(rank, "shutdown")
            self._send_cmd(rank, {"op": "shutdown"})
        self.transport.flush()

    def abort(self) -> None:
        """Best effort: ranks blocked in a collective with a failed rank may not read this; they
        see rank 0's connection close when it exits, or time out."""
        for rank in range(1, self.world_size):
            try:
                self.transport.send({"op": "abort"}, rank, CMD)
            except Exception:  # noqa: BLE001 - a dead peer must not stop the others' abort
                pass
        time.sleep(0.2)   # let gloo put the messages on the wire before the process exits


@dataclass
class _ChainPlan:
    key: str
    producer: _Call
    runs: dict[int, list[tuple[int, int, int]]]
    """Consumer rank -> [(producer rank, start row, end row)] in order."""


def _is_timeout(message: str) -> bool:
    message = message.lower()
    return "timed out" in message or "timeout" in message


def _runs(rows: list[int], starts: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """Group global row indices into (producer index, local start, local end) runs."""
    runs: list[list[int]] = []
    for row in rows:
        i = max(j for j, s in enumerate(starts) if s <= row and counts[j] > 0)
        local = row - starts[i]
        if runs and runs[-1][0] == i and runs[-1][2] == local:
            runs[-1][2] += 1
        else:
            runs.append([i, local, local + 1])
    return [tuple(r) for r in runs]


def run(main: Callable[..., Any], *args, backend: str = "auto", timeout_s: float = 600.0,
        **kwargs) -> Any:
    """Run `main(*args, **kwargs)` on rank 0 as the single controller; serve on other ranks.

    Returns main's result on rank 0 and None on the others. If main raises, every rank exits
    non-zero: rank 0 re-raises, the others raise SystemExit(1).
    """
    global _RUNTIME
    owns_group = not dist.is_initialized()
    ctx = init_distributed(backend, timeout_s)
    runtime = _RUNTIME = Runtime(ctx)
    try:
        if ctx.rank != 0:
            code = runtime.serve()
            if code:
                raise SystemExit(code)
            return None
        try:
            result = main(*args, **kwargs)
        except BaseException:
            runtime.abort()
            raise
        runtime.shutdown()
        return result
    finally:
        _RUNTIME = None
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
