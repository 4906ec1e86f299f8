"""Rank 0's side of the single controller: issuing calls, collecting replies, futures.

A call on a worker group, step by step:

    plan      split each Batch argument into the protocol's pieces (pad, maybe balance); for a
              chained Future, plan which rows of which producer rank each consumer rank gets
              (planning.py); for a large piece shared by several ranks (ONE_TO_ALL, the ranks of
              one DP replica), a relay tree so rank 0 sends it once
    encode    every message of the call, before any is sent: an argument that cannot be sent
              fails here, on rank 0, with no rank having started the call
    post      producers' send orders, relayed pieces, then one command per rank of the pool
    own rows  if rank 0 produced rows of a chained Future, it sends them now, before it
              receives anything (sends are asynchronous; rows for itself are a slice, kept)
    own share if rank 0 is in the pool, it runs its piece inline (assembling a chained argument
              from its own rows and those producer ranks send it, as any consumer rank does)
    collect   blocking calls wait for every rank's status (outputs come with it); others
              return a Future

A non-blocking call leaves every output where it was made, rank 0's own share included (kept in
its store, with the same status other ranks report: rows, mask lengths, meta). So rows flow
producer -> consumer whatever the pools, rank 0 being just another producer or consumer, and
between colocated roles of the same layout they do not move at all. `Future.result()` gathers
the rows on rank 0; `Future.meta` gives the joined output's meta (per-step scalars a worker put
there) from the statuses alone, without moving any row.

Replies arrive in each rank's order; those not yet waited for are kept (`_stash`), so futures
resolve in any order. A dropped Future's replies are discarded when they arrive, but an error
among them is kept and raised at the next call or wait, and at shutdown at the latest: no error
is silent.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hfrl.controller import planning
from hfrl.controller.batch import Batch
from hfrl.controller.dispatch import (Protocol, balanced_order, balanced_order_from_lengths,
                                      join_outputs, ordered_chunks, padded_chunks, placement)
from hfrl.controller.errors import NotRunError, RemoteError, WorkerLostError
from hfrl.controller.runtime import GroupState, Remote, Runtime, output_status
from hfrl.controller.transport import CMD, RELAY, REPLY, Message
from hfrl.controller.watchdog import Watchdog
from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.resource_pool import ResourcePool

logger = logging.getLogger(__name__)

RELAY_FANOUT = 2
"""Children per rank in a relay tree: rank 0 sends each distinct piece once."""


@dataclass
class Call:
    cid: int
    group: GroupState
    method: str
    proto: Protocol
    eager: bool
    """Outputs come back with the status (blocking calls)."""
    pad: int = 0
    num_input_rows: int | None = None
    order: list[int] | None = None
    """Balanced protocols: the padded input row behind each distributed row."""
    chunks: tuple[int, ...] = ()
    """The piece each pool position receives."""
    output_ranks: list[int] = field(default_factory=list)
    statuses: dict[int, dict] = field(default_factory=dict)
    error_seen: bool = False
    """A RemoteError of this call was raised to the program."""
    has_result: bool = False
    result: Any = None

    @property
    def what(self) -> str:
        return f"{self.group.name}.{self.method}"


@dataclass
class ChainPlan:
    key: str
    producer: Call
    runs: dict[int, list[tuple[int, int, int]]]
    """Consumer rank -> [(producer rank, start row, end row)] in order."""
    meta: dict = field(default_factory=dict)
    """The meta of the producer's first output, which the joined value carries."""


class Future:
    """The pending result of a non-blocking call, left on the ranks that made it (rank 0's own
    share too). `result()` collects it on rank 0; passing the Future to another call lets that
    call's ranks fetch their rows straight from this call's ranks instead; `meta` reads the
    joined output's meta without moving any row."""

    def __init__(self, driver: "Driver", call: Call):
        self._driver = driver
        self._call = call

    @property
    def call_id(self) -> int:
        return self._call.cid

    def result(self) -> Any:
        return self._driver.resolve(self._call)

    @property
    def meta(self) -> dict:
        """The `meta` of the joined output (a copy): the first output rank's Batch meta, which
        the joined Batch carries. Waits for the call's statuses only, no row is fetched: read
        a worker's per-step scalars this way. TypeError if that rank returned no Batch."""
        return self._driver.output_meta(self._call)

    def wait(self) -> None:
        """Block until every rank of the call has finished (raises its RemoteError if any)."""
        self._driver.check_orphans()
        self._driver.wait_status(self._call)

    def __del__(self):
        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.forget(self._call)


class Driver(Runtime):
    """Rank 0: issues every command, in one total order, and collects the replies."""

    def __init__(self, ctx, config=None, watchdog: Watchdog | None = None):
        super().__init__(ctx, config)
        self.watchdog = watchdog
        self._next_gid = 0
        self._next_cid = 0
        self._stash: dict[tuple[int, int, str], dict] = {}
        self._release: dict[int, list[int]] = defaultdict(list)
        self._discard: dict[tuple[int, int], str | None] = {}   # (rank, cid) -> 'role.method'
        """Replies nobody will wait for; the name is kept while an error would be news."""
        self._expected: dict[int, int] = defaultdict(int)   # replies still to come, per rank
        self._orphans: list[RemoteError] = []
        self._errors_seen: set[int] = set()   # calls whose RemoteError the program was given
        self._names: dict[int, str] = {}      # call id -> 'role.method', for late errors

    # ---- issuing -------------------------------------------------------------------------
    def _post_cmd(self, rank: int, cmd: dict) -> None:
        self.transport.post(self._encode_cmd(rank, cmd), rank, CMD)

    def _encode_cmd(self, rank: int, cmd: dict) -> Message:
        if self._release.get(rank):
            cmd = {**cmd, "release": self._release.pop(rank)}
        if cmd["op"] in ("call", "fetch") or (cmd["op"] == "create" and rank in cmd["pool"]):
            self._expected[rank] += 1
        return self.transport.encode_message(cmd)

    def create_group(self, name: str, worker_cls: type, pool: ResourcePool, dims: ParallelDims,
                     args: tuple, kwargs: dict, links: tuple[tuple[int, ...], ...] = ()) -> int:
        self.check_orphans()
        gid = self._next_gid
        cmd = {"op": "create", "gid": gid, "name": name, "cls": worker_cls, "pool": pool,
               "dims": dims, "args": args, "kwargs": kwargs, "links": links}
        try:
            self.transport.encode_message(cmd)
        except Exception as err:
            raise TypeError(f"WorkerGroup {name!r}: its constructor arguments cannot be sent to "
                            f"the workers: {type(err).__name__}: {err}") from err
        self._next_gid += 1
        for rank in range(1, self.world_size):
            self._post_cmd(rank, cmd)
        self.create_local(cmd)
        cid = -(gid + 1)   # create statuses use negative ids
        for rank in pool.ranks:
            if rank != 0:
                self._check(self._reply(rank, cid, "status"), name, "__init__")
        return gid

    def call(self, group, method: str, proto: Protocol, args: tuple, kwargs: dict,
             blocking: bool) -> Any:
        self.check_orphans()
        state = self.groups[group.gid]
        ranks = state.pool.ranks
        call = Call(cid=self._next_cid, group=state, method=method, proto=proto, eager=blocking)
        layout = placement(proto, state.dims)
        call.chunks = layout.chunks
        call.output_ranks = [ranks[p] for p in layout.output_positions]
        per_rank, plans, relays = self._distribute(call, args, kwargs)
        orders = [_send_orders(plan) for plan in plans]
        messages = self._encode_call(call, per_rank, plans, orders, relays)
        self._next_cid += 1
        self._names[call.cid] = call.what
        for rank, channel, msg in messages:   # nothing is sent before everything encoded
            self.transport.post(msg, rank, channel)
        # Rank 0's rows of chained futures go out before its own share receives anything:
        # consumers may wait for them while rank 0 waits for theirs (sends are asynchronous).
        for plan, by_src in zip(plans, orders):
            if 0 in by_src:
                self.send_rows(plan.producer.cid, call.cid, plan.key, by_src[0])
        if 0 in ranks:
            self._run_own_share(call, per_rank[ranks.index(0)])
        future = Future(self, call)
        return future.result() if blocking else future

    def _encode_call(self, call: Call, per_rank: list, plans: list[ChainPlan], orders: list,
                     relays: list) -> list[tuple[int, int, Message]]:
        """Every message of the call, encoded; only then are reply counts and releases noted.
        Ranks whose commands are equal (same piece, nothing rank-specific) share one encoding:
        rank 0 pickles a ONE_TO_ALL command once, a DP_COMPUTE command once per replica."""
        ranks = call.group.pool.ranks
        messages, called, encoded = [], [], {}
        try:
            for plan, by_src in zip(plans, orders):   # rank 0 carries out its own orders
                messages += [(src, CMD, self.transport.encode_message(
                                 {"op": "send", "fid": plan.producer.cid, "dst_cid": call.cid,
                                  "key": plan.key, "pieces": pieces}))
                             for src, pieces in by_src.items() if src != 0]
            for root, data in relays:
                messages.append((root, RELAY, self.transport.encode_message(data)))
            for position, rank in enumerate(ranks):
                if rank == 0:
                    continue
                cmd_args, cmd_kwargs, assemble, relay = per_rank[position]
                release = tuple(self._release.get(rank, ()))
                piece = position if call.proto.per_rank_args else call.chunks[position]
                signature = (piece, repr(assemble), repr(relay), release)
                if signature not in encoded:
                    encoded[signature] = self.transport.encode_message(
                        {"op": "call", "cid": call.cid, "gid": call.group.gid,
                         "method": call.method, "args": cmd_args, "kwargs": cmd_kwargs,
                         "assemble": assemble, "relay": relay, "eager": call.eager,
                         "release": release})
                messages.append((rank, CMD, encoded[signature]))
                called.append(rank)
        except Exception as err:
            raise TypeError(f"{call.what}: its arguments cannot be sent to the workers: "
                            f"{type(err).__name__}: {err}") from err
        for rank in called:
            self._expected[rank] += 1
            self._release.pop(rank, None)
        return messages

    def _run_own_share(self, call: Call, share: tuple) -> None:
        """Rank 0's piece, inline; its output stays in its store, with the status any output
        rank reports, so planning treats rank 0 as one producer among others."""
        cmd_args, cmd_kwargs, assemble, _ = share
        cmd = {"cid": call.cid, "args": cmd_args, "kwargs": cmd_kwargs, "assemble": assemble}
        try:
            args, kwargs = self.assemble_arguments(cmd)
            value = getattr(call.group.worker, call.method)(*args, **kwargs)
        except Exception as local_error:
            self._raise_root_cause(call, local_error)
        output = 0 in call.output_ranks
        call.statuses[0] = {"ok": True, "rank": 0,
                            **output_status(value, stored=output and not call.eager)}
        if output:
            self.store[call.cid] = value

    def _raise_root_cause(self, call: Call, local_error: Exception) -> None:
        """Rank 0's own share failed. Other ranks may be waiting for rank 0 inside a collective
        of this call: the watchdog tells them, and those still inside it after its grace period
        end themselves. Rank 0's failure may also be a consequence (a collective timed out
        because another rank failed first): report another rank's failure of the same call if
        there is one that is neither a timeout nor a share skipped because of rank 0's failure
        (NotRunError), else the local error."""
        call.error_seen = True
        self._errors_seen.add(call.cid)
        # Said now: collecting the others' status can outlast the watchdog's grace period (a rank
        # still busy with an earlier call), and the watchdog then ends this process.
        logger.error("rank 0's share of %s failed: %s: %s; collecting the other ranks' status", call.what,
                     type(local_error).__name__, local_error)
        if self.watchdog is not None:
            self.watchdog.interrupt(call.cid, call.group.pool.ranks)
        root, lost = None, None
        for rank in call.group.pool.ranks:
            if rank == 0:
                continue
            try:
                call.statuses[rank] = status = self._reply(rank, call.cid, "status")
            except WorkerLostError as err:
                lost = lost or err
                continue
            if not status["ok"] and root is None and not _is_timeout(status["error"][1]) \
                    and status["error"][0] != NotRunError.__name__:
                root = status
        if root is not None:
            try:
                self._check(root, call.group.name, call.method)
            except RemoteError as remote:
                raise remote from local_error
        if lost is not None:
            logger.error("rank 0 failed inside %s; ranks still inside it ended: %s", call.what,
                         lost)
        raise local_error

    # ---- splitting a call's arguments ------------------------------------------------------
    def _distribute(self, call: Call, args: tuple, kwargs: dict):
        """Per pool position: (args, kwargs, assemble spec, relay spec); chain plans; relayed
        pieces as (root rank, {key: piece})."""
        ranks, proto = call.group.pool.ranks, call.proto
        named = {**{f"#{i}": a for i, a in enumerate(args)}, **kwargs}
        if proto.per_rank_args:
            for key, value in named.items():
                if not isinstance(value, (list, tuple)) or len(value) != len(ranks):
                    raise ValueError(f"{call.what} uses {proto.name}: argument {key!r} must be a "
                                     f"list with one entry per rank ({len(ranks)}), got "
                                     f"{type(value).__name__}")
                if any(isinstance(v, Future) for v in value):
                    raise TypeError(f"{call.what} uses {proto.name}: argument {key!r} holds a "
                                    "Future; pass future.result() instead")
            pieces = {key: list(value) for key, value in named.items()}
            relay_tree, relayed, relays = {}, {}, []
        else:
            pieces = self._split_batches(call, named)
            relay_tree, relayed, relays = self._relay_plan(call, pieces)
        per_rank = []
        for position, rank in enumerate(ranks):
            chunk = call.chunks[position]
            mine = {}
            for key, value in pieces.items():
                if isinstance(value, ChainPlan):
                    mine[key] = Remote(key)
                elif rank in relay_tree and key in relayed[chunk]:
                    mine[key] = Remote(key, "relayed")
                else:
                    mine[key] = value[chunk] if isinstance(value, list) else value
            # Each chained argument: its runs, and the meta the joined value would carry (the
            # first output's), whichever producer rank this rank's first rows come from.
            assemble = {k: {"runs": v.runs[rank], "meta": v.meta}
                        for k, v in pieces.items() if isinstance(v, ChainPlan)}
            pos_args = tuple(mine[f"#{i}"] for i in range(len(args)))
            per_rank.append((pos_args, {k: mine[k] for k in kwargs}, assemble,
                             relay_tree.get(rank)))
        plans = [v for v in pieces.values() if isinstance(v, ChainPlan)]
        return per_rank, plans, relays

    def _relay_plan(self, call: Call, pieces: dict):
        """Large pieces shared by several ranks go from rank 0 to one of them and down a tree
        (`_tree`), so rank 0 sends each distinct piece once, whatever tp and pp are.
        Returns (rank -> {parent, children}, chunk -> relayed keys, [(root, {key: piece})])."""
        members: dict[int, list[int]] = defaultdict(list)     # chunk -> remote ranks
        for position, rank in enumerate(call.group.pool.ranks):
            if rank != 0:
                members[call.chunks[position]].append(rank)
        tree, relayed, relays = {}, defaultdict(set), []
        for chunk, receivers in members.items():
            shared = {}
            for key, value in pieces.items():
                piece = value[chunk] if isinstance(value, list) else value
                if not isinstance(value, ChainPlan) and _relayable(piece):
                    shared[key] = piece
            if len(receivers) > 1 and \
                    sum(_nbytes(v) for v in shared.values()) > self.transport.INLINE_MAX:
                tree.update(_tree(receivers, RELAY_FANOUT))
                relayed[chunk] = set(shared)
                relays.append((receivers[0], shared))
        return tree, relayed, relays

    def _split_batches(self, call: Call, named: dict) -> dict:
        n = call.proto.num_chunks(call.group.dims)
        # A future whose outputs already came to rank 0 (an eager call's) is a value.
        named = {k: (v.result() if isinstance(v, Future) and v._call.eager else v)
                 for k, v in named.items()}
        producers = {k: self.producer_rows(v._call) for k, v in named.items()
                     if isinstance(v, Future)}
        rows = {k: len(v) for k, v in named.items() if isinstance(v, Batch)}
        rows.update({k: len(p) for k, p in producers.items()})
        if len(set(rows.values())) > 1:
            raise ValueError(f"{call.what}: Batch arguments have different sizes {rows}; they "
                             "are split together, so they must match")
        num_rows = next(iter(rows.values()), None)
        if num_rows == 0:
            raise ValueError("cannot dispatch an empty Batch: there is no row to give each of "
                             f"{n} workers; skip the call or pass at least one row")
        if call.proto.balance_key and rows:
            call.order = self._balance(call, named, producers, n)
        pieces = dict(named)
        for key, value in named.items():
            if isinstance(value, Batch) and call.order is not None:
                pieces[key], call.pad = ordered_chunks(value, n, call.order)
            elif isinstance(value, Batch):
                pieces[key], call.pad = padded_chunks(value, n)
            elif isinstance(value, Future):
                pieces[key] = self._chain(key, producers[key], value._call, call, n, num_rows)
        call.num_input_rows = num_rows
        return pieces

    def _balance(self, call: Call, named: dict, producers: dict, n: int) -> list[int] | None:
        """One regrouping for every Batch argument, from the first that has the mask column
        (a Batch on rank 0, or a Future whose producers reported its token counts)."""
        key = call.proto.balance_key
        for name, value in named.items():
            if isinstance(value, Batch) and key in value.tensors:
                return balanced_order(value, n, key)
            if isinstance(value, Future) and key in self._lengths(value._call):
                per_rank = self._lengths(value._call)[key]
                rows = producers[name]
                lengths = [per_rank[i][local] for i, local in map(rows.locate, range(len(rows)))]
                return balanced_order_from_lengths(lengths, n)
        batches = [v for v in named.values() if isinstance(v, Batch)]
        return balanced_order(batches[0], n, key) if batches else None

    # ---- chained futures: consumers fetch rows straight from producers -------------------
    def producer_rows(self, producer: Call) -> planning.ProducerRows:
        """Where the rows of a producer's joined output live; waits for its statuses only."""
        self.wait_status(producer)
        counts = [producer.statuses[r]["rows"] for r in producer.output_ranks]
        if producer.proto.join != "concat" or any(c is None for c in counts):
            raise TypeError(f"{producer.what} did not return a Batch per output rank (or its "
                            "protocol does not concatenate), so its Future cannot be split for "
                            "another call; pass future.result() instead")
        return planning.ProducerRows(
            tuple(counts), producer.num_input_rows, producer.pad,
            None if producer.order is None else tuple(producer.order), what=producer.what)

    def _lengths(self, producer: Call) -> dict[str, list[list[int]]]:
        """Token counts per output row of the producer's mask columns, per output rank."""
        keys = set.intersection(*(set(producer.statuses[r].get("lengths") or {})
                                  for r in producer.output_ranks))
        return {k: [producer.statuses[r]["lengths"][k] for r in producer.output_ranks]
                for k in keys}

    def _chain(self, key: str, rows: planning.ProducerRows, producer: Call, consumer: Call,
               num_chunks: int, num_rows: int) -> ChainPlan:
        """Which rows of which producer rank each consumer rank receives, in order."""
        consumer.pad = -(-num_rows // num_chunks) * num_chunks - num_rows
        plan_runs, by_chunk = {}, {}
        for position, rank in enumerate(consumer.group.pool.ranks):
            chunk = consumer.chunks[position]
            if chunk not in by_chunk:
                logical = planning.consumer_rows(num_rows, num_chunks, chunk, consumer.order)
                by_chunk[chunk] = [(producer.output_ranks[i], lo, hi)
                                   for i, lo, hi in planning.runs(rows, logical)]
            plan_runs[rank] = by_chunk[chunk]
        meta = producer.statuses[producer.output_ranks[0]].get("meta") or {}
        return ChainPlan(key=key, producer=producer, runs=plan_runs, meta=meta)

    # ---- collecting ----------------------------------------------------------------------
    def _reply(self, src: int, cid: int, kind: str) -> dict:
        """The reply (cid, kind) from `src`, receiving and keeping earlier ones as they come."""
        key = (src, cid, kind)
        while key not in self._stash:
            msg = self._recv_reply(src, f"call {cid}")
            if (src, msg["cid"]) not in self._discard:
                self._stash[(src, msg["cid"], msg["kind"])] = msg
            else:
                self._discarded(src, msg)
        return self._stash.pop(key)

    def _recv_reply(self, src: int, waiting_for: str) -> dict:
        try:
            msg = self.transport.recv(src, REPLY)
        except RuntimeError as err:   # gloo: connection closed, or the timeout
            raise WorkerLostError(f"lost contact with rank {src} while waiting for its reply to "
                                  f"{waiting_for}: {err}") from None
        self._expected[src] -= 1
        return msg

    def _discarded(self, src: int, msg: dict) -> None:
        """A reply nobody waits for: dropped, unless it is an error nobody has seen."""
        what = self._discard.pop((src, msg["cid"]))
        if what is not None and not msg["ok"]:
            self._orphans.append(_remote_error(msg, what))

    def _check(self, status: dict, name: str, method: str) -> dict:
        if not status["ok"]:
            raise _remote_error(status, f"{name}.{method}")
        return status

    def check_orphans(self) -> None:
        """Raise the first error of a call whose Future was dropped, if one has arrived."""
        if self._orphans:
            first, rest = self._orphans[0], len(self._orphans) - 1
            self._orphans.clear()
            if rest:
                first.add_note(f"({rest} more dropped call(s) failed too)")
            first.add_note("nobody waited for this call's Future; its error is raised at the "
                           "next call or wait, or when the program ends")
            raise first

    def wait_status(self, call: Call) -> None:
        """Every rank's status (rank 0's was recorded when it ran its share)."""
        for rank in call.group.pool.ranks:
            if rank not in call.statuses:
                call.statuses[rank] = self._reply(rank, call.cid, "status")
            if not call.statuses[rank]["ok"]:
                call.error_seen = True    # the other ranks' errors of this call are not news
                self._errors_seen.add(call.cid)
                self._check(call.statuses[rank], call.group.name, call.method)

    def resolve(self, call: Call) -> Any:
        if call.has_result:
            return call.result
        self.check_orphans()
        self.wait_status(call)
        values = []
        for rank in call.output_ranks:
            if rank == 0:
                values.append(self.store[call.cid])
            elif call.eager:
                values.append(call.statuses[rank].pop("value"))
            else:
                self._post_cmd(rank, {"op": "fetch", "cid": call.cid})
                reply = self._check(self._reply(rank, call.cid, "data"), call.group.name,
                                    call.method)
                values.append(reply["value"])
        call.result = join_outputs(values, call.proto.join, call.pad, call.num_input_rows,
                                   call.order)
        call.has_result = True
        # Rank 0's share stays stored, as the other ranks' do: the Future may still be chained.
        # `forget` frees it.
        return call.result

    def output_meta(self, call: Call) -> dict:
        """`Future.meta`: the first output rank's Batch meta, from its status (eager calls:
        from the result, which came back anyway)."""
        if call.eager or call.has_result:
            value = self.resolve(call)
            first = value[0] if isinstance(value, list) and value else value
            meta = first.meta if isinstance(first, Batch) else None
        else:
            self.check_orphans()
            self.wait_status(call)
            meta = call.statuses[call.output_ranks[0]].get("meta")
        if meta is None:
            raise TypeError(f"{call.what} did not return a Batch on rank "
                            f"{call.output_ranks[0]}, so its Future has no meta; use "
                            "future.result() instead")
        return dict(meta)

    def forget(self, call: Call) -> None:
        """A Future was dropped: its ranks may free the stored output (rank 0 at once, the
        others told with their next command), and late replies are discarded, errors kept for
        `check_orphans`."""
        self.store.pop(call.cid, None)
        if not call.eager:
            for rank in call.output_ranks:
                if rank != 0:
                    self._release[rank].append(call.cid)
        for rank in call.group.pool.ranks:
            if rank in call.statuses:   # rank 0's always is
                continue
            seen = call.error_seen or call.has_result
            status = self._stash.pop((rank, call.cid, "status"), None)
            if status is None:
                self._discard[(rank, call.cid)] = None if seen else call.what
            elif not status["ok"] and not seen:
                self._orphans.append(_remote_error(status, call.what))

    # ---- ending ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Collect every reply still in flight (so each worker's sends complete), then stop
        every rank. Any error among them, or among replies kept for futures nobody resolved,
        that the program was never given is raised here: no error is silent."""
        for rank in range(1, self.world_size):
            while self._expected[rank] > 0:
                msg = self._recv_reply(rank, "shutdown")
                if (rank, msg["cid"]) in self._discard:
                    self._discarded(rank, msg)
                else:
                    self._stash[(rank, msg["cid"], msg["kind"])] = msg
        for (rank, cid, _), msg in sorted(self._stash.items()):
            if not msg["ok"] and cid not in self._errors_seen:
                self._errors_seen.add(cid)
                self._orphans.append(_remote_error(msg, self._names.get(cid, "?.?")))
        self._stash.clear()
        self.check_orphans()
        for rank in range(1, self.world_size):
            self._post_cmd(rank, {"op": "shutdown"})
        self.transport.flush()
        if self.watchdog is not None:
            self.watchdog.close()

    def abort(self) -> None:
        """Every rank exits non-zero: told over the command channel, and over the watchdog's
        channel for ranks blocked in a collective."""
        if self.watchdog is not None:
            self.watchdog.abort_all()
        for rank in range(1, self.world_size):
            try:
                self.transport.send({"op": "abort"}, rank, CMD)
            except Exception:  # noqa: BLE001 - a dead peer must not stop the others' abort
                pass
        time.sleep(0.2)   # let gloo put the messages on the wire before the process exits


def _send_orders(plan: ChainPlan) -> dict[int, list[tuple[int, int, int]]]:
    """Per producer rank: the runs to send, as (consumer rank, start, end), in order."""
    orders: dict[int, list] = defaultdict(list)
    for dst, dst_runs in plan.runs.items():
        for src, lo, hi in dst_runs:
            orders[src].append((dst, lo, hi))
    return orders


def _remote_error(status: dict, what: str) -> RemoteError:
    exc_type, message, tb = status["error"]
    role, _, method = what.partition(".")
    return RemoteError(status["rank"], role, method, exc_type, message, tb)


def _is_timeout(message: str) -> bool:
    message = message.lower()
    return "timed out" in message or "timeout" in message


def _relayable(value: Any) -> bool:
    import torch

    return isinstance(value, (Batch, torch.Tensor))


def _nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, Batch) else value.numel() * value.element_size()


def _tree(members: list[int], fanout: int) -> dict[int, dict]:
    """Relay tree over `members` (rank 0 sends to the first): member i's parent is member
    (i - 1) // fanout, so rank 0 sends one copy and no rank more than `fanout`."""
    tree = {}
    for i, rank in enumerate(members):
        parent = 0 if i == 0 else members[(i - 1) // fanout]
        children = members[i * fanout + 1:i * fanout + 1 + fanout]
        tree[rank] = {"parent": parent, "children": children}
    return tree
