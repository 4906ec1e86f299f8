"""Dispatch overhead of the single controller: no-op round trips and batch throughput.

    torchrun --nproc-per-node 4 benchmarks/dispatch_overhead.py [--quick] [--profile]
    mpiexec -n 4 python benchmarks/dispatch_overhead.py [--quick]

Rank 0 prints one JSON line per case (and one "env" line first):

- ``noop_one_to_all_pool_all``: a ONE_TO_ALL call of a method doing nothing, on a pool of every
  rank (rank 0 runs its share inline); ``noop_one_to_all_pool_remote``: the same on ranks 1..W-1;
  ``noop_dp_compute_1row``: a DP_COMPUTE identity call on ranks 1..W-1 with a 1-row batch (padded
  to one row per rank). ``per_rank_ms`` is the per-call time divided by the remote ranks.
- ``replicated_one_to_all_16MB`` / ``replicated_dp_compute_tp2_16MB``: a 16 MB Batch every rank
  (ONE_TO_ALL, pool of every rank) or both ranks of each tp2 replica (DP_COMPUTE) need;
  ``rank0_sent_copies`` is rank 0's payload bytes over the batch's.
- ``through_rank0_<N>MB``: rank 0 splits a batch of one float32 column over ranks 1..W-1
  (DP_COMPUTE), each returns its rows, rank 0 concatenates them (a blocking call).
- ``chained_future_<N>MB``: a producer pool (ranks 1..) makes the batch itself from a size
  argument and returns a Future; a consumer pool (the last ranks) takes that Future, so its ranks
  fetch their rows straight from the producers, and returns a few Python numbers.

MB means 2**20 bytes. ``mb_per_s`` is batch MB / median call time (each batch byte crosses the
wire twice through rank 0, once in the chained case). Byte counts come from the transports'
counters (tensor payload only, per call): ``bytes_through_rank0`` is what rank 0 sent plus
received, ``bytes_through_rank0_seen_by_workers`` the same from the workers' counters, and
``worker_to_worker_bytes`` what workers sent each other directly. ``rss_mb`` and
``pending_sends`` (per rank, after the case) show whether sent buffers are ever released.

``--profile`` runs rank 0's timed loops under cProfile and prints the top functions to stderr.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

import hfrl
from hfrl.controller import (DP_COMPUTE, ONE_TO_ALL, Batch, ParallelDims, ResourcePool, Worker,
                             WorkerGroup, get_runtime, register)

MB = 2**20
ROW_FLOATS = 1024   # one 4 KiB row of float32
FULL = {"noop_iters": 300, "warmup": 20, "sizes_mb": (1, 16, 256),
        "batch_iters": {1: 50, 16: 20, 256: 6}}
QUICK = {"noop_iters": 40, "warmup": 5, "sizes_mb": (1, 16), "batch_iters": {1: 5, 16: 3}}


class BenchWorker(Worker):
    def __init__(self):
        self._made: dict[tuple[int, int], torch.Tensor] = {}

    @register(protocol=ONE_TO_ALL)
    def noop(self):
        return None

    @register(protocol=DP_COMPUTE)
    def identity(self, batch: Batch) -> Batch:
        return batch

    @register(protocol=DP_COMPUTE)
    def make(self, num_rows: int, row_floats: int) -> Batch:
        """This rank's share: ``num_rows`` rows of ``row_floats`` float32. Made once per shape
        and reused, so the timed calls measure moving it, not filling it (rank 0's batch in the
        through-rank-0 case is also made once)."""
        shape = (num_rows, row_floats)
        if shape not in self._made:
            self._made[shape] = torch.full(shape, float(self.ctx.rank))
        return Batch({"x": self._made[shape]})

    @register(protocol=ONE_TO_ALL)
    def consume_all(self, batch: Batch) -> int:
        return batch.nbytes

    @register(protocol=DP_COMPUTE)
    def consume(self, batch: Batch) -> int:
        return batch.nbytes

    @register(protocol=DP_COMPUTE)
    def summarize(self, batch: Batch) -> dict:
        """A few Python numbers (a plain dict travels in the header, no tensor payload)."""
        return {"rows": len(batch), "nbytes": batch.nbytes, "first": float(batch["x"][0, 0])}

    @register(protocol=ONE_TO_ALL)
    def stats(self) -> dict:
        return self.ctx.runtime.transport.stats.snapshot()

    @register(protocol=ONE_TO_ALL)
    def probe(self) -> dict:
        """Resident memory and the transport's count of sends it still holds (private state,
        read here to show whether sent buffers are ever released)."""
        pending = self.ctx.runtime.transport.num_pending_sends
        return {"rss_mb": round(_rss_bytes() / MB), "pending_sends": pending}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:   # not Linux: the peak instead
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- measurement


class Profiler:
    """cProfile over several timed loops when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool):
        self.profile = cProfile.Profile() if enabled else None

    def run(self, fn: Callable[[], Any]) -> Any:
        if self.profile is None:
            return fn()
        self.profile.enable()
        try:
            return fn()
        finally:
            self.profile.disable()

    def report(self, title: str, top: int = 30) -> None:
        if self.profile is None:
            return
        text = io.StringIO()
        pstats.Stats(self.profile, stream=text).sort_stats("tottime").print_stats(top)
        print(f"==== cProfile on rank 0: {title} (sorted by own time) ====\n{text.getvalue()}",
              file=sys.stderr, flush=True)
        self.profile = cProfile.Profile()


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary_ms(times: list[float]) -> dict[str, float]:
    """Median, nearest-rank 90th percentile and minimum, in ms."""
    ms = sorted(t * 1e3 for t in times)
    return {"iters": len(ms), "median_ms": round(statistics.median(ms), 4),
            "p90_ms": round(ms[math.ceil(0.9 * len(ms)) - 1], 4), "min_ms": round(ms[0], 4)}


def _payload(snapshot: dict, direction: str, channel: str | None = None) -> int:
    values = snapshot[f"payload_{direction}"]
    return values.get(channel, 0) if channel else sum(values.values())


def _header(snapshot: dict) -> int:
    return sum(snapshot["header_sent"].values()) + sum(snapshot["header_recv"].values())


class ByteCounters:
    """Transport counters of every rank, read before and after a timed loop (outside it)."""

    def __init__(self, group_all: WorkerGroup):
        self.group_all = group_all

    def snapshot(self) -> tuple[dict, list[dict]]:
        workers = self.group_all.stats()[1:]   # position 0 is rank 0's own transport
        return get_runtime().transport.stats.snapshot(), workers

    @staticmethod
    def per_call(before, after, calls: int) -> dict[str, int]:
        """Tensor payload bytes per call, from rank 0's counters and from the workers'."""
        (r0_before, w_before), (r0_after, w_after) = before, after
        sent = _payload(r0_after, "sent") - _payload(r0_before, "sent")
        recv = _payload(r0_after, "recv") - _payload(r0_before, "recv")
        header = _header(r0_after) - _header(r0_before)

        def workers(count) -> int:
            return sum(count(a) - count(b) for b, a in zip(w_before, w_after))

        seen = workers(lambda s: _payload(s, "recv", "cmd") + _payload(s, "sent", "reply"))
        direct = workers(lambda s: _payload(s, "sent", "data") + _payload(s, "sent", "relay"))
        return {"bytes_through_rank0": round((sent + recv) / calls),
                "rank0_payload_sent": round(sent / calls),
                "rank0_payload_recv": round(recv / calls),
                "bytes_through_rank0_seen_by_workers": round(seen / calls),
                "worker_to_worker_bytes": round(direct / calls),
                "rank0_header_bytes": round(header / calls)}

    def memory(self) -> dict[str, list[int]]:
        probes = self.group_all.probe()
        return {"rss_mb": [p["rss_mb"] for p in probes],
                "pending_sends": [p["pending_sends"] for p in probes]}


def emit(case: str, **fields: Any) -> None:
    line = {"bench": "dispatch_overhead", "case": case, "world_size": dist.get_world_size()}
    print(json.dumps({**line, **fields}), flush=True)


# ---------------------------------------------------------------------------------- cases


def measure(fn: Callable[[], Any], iters: int, warmup: int, counters: ByteCounters,
            profiler: Profiler) -> tuple[dict, list[float]]:
    """(JSON fields, seconds per call). Warm-up calls are neither timed nor counted."""
    for _ in range(warmup):
        fn()
    before = counters.snapshot()
    times = profiler.run(lambda: time_calls(fn, iters, warmup=0))
    after = counters.snapshot()
    fields = {**summary_ms(times), **counters.per_call(before, after, iters), **counters.memory()}
    return fields, times


def noop_cases(groups: dict, cfg: dict, counters: ByteCounters, profiler: Profiler) -> None:
    one_row = Batch({"x": torch.zeros(1, 1)})
    cases = [("noop_one_to_all_pool_all", groups["all"], lambda: groups["all"].noop()),
             ("noop_one_to_all_pool_remote", groups["remote"], lambda: groups["remote"].noop()),
             ("noop_dp_compute_1row", groups["remote"], lambda: groups["remote"].identity(one_row))]
    for case, group, fn in cases:
        fields, _ = measure(fn, cfg["noop_iters"], cfg["warmup"], counters, profiler)
        remote = sum(1 for r in group.pool.ranks if r != 0)
        emit(case, pool=list(group.pool.ranks), remote_ranks=remote, **fields,
             per_rank_ms=round(fields["median_ms"] / remote, 4))
        profiler.report(case)


def batch_rows(size_mb: int, multiple: int) -> int:
    """Rows of ROW_FLOATS float32 at most size_mb MB, a multiple of `multiple` (no padding)."""
    rows = size_mb * MB // (ROW_FLOATS * 4)
    return max(multiple, rows // multiple * multiple)


def throughput_cases(groups: dict, cfg: dict, counters: ByteCounters, profiler: Profiler) -> None:
    remote, producer, consumer = groups["remote"], groups["producer"], groups["consumer"]
    # Rows divisible by every pool size, so no case pays for padding.
    multiple = int(np.lcm.reduce([len(remote.pool), len(producer.pool), len(consumer.pool)]))
    for size_mb in cfg["sizes_mb"]:
        rows = batch_rows(size_mb, multiple)
        nbytes = rows * ROW_FLOATS * 4
        iters, warmup = cfg["batch_iters"][size_mb], 1 if size_mb >= 64 else 2
        batch = Batch({"x": torch.randn(rows, ROW_FLOATS)})

        def through_rank0():
            out = remote.identity(batch)
            assert out.nbytes == nbytes

        # The producer gets plain ints (no Batch argument: every producer rank makes its share).
        # Not a Batch of non-tensor row ids: a Batch without tensor columns cannot be received
        # (transport.recv passes payload None to decode, which slices it).
        rows_per_producer = rows // len(producer.pool)

        def chained():
            made = producer.make(rows_per_producer, ROW_FLOATS, blocking=False)
            parts = consumer.summarize(made)
            assert sum(p["nbytes"] for p in parts) == nbytes

        for case, fn, pools in (
                (f"through_rank0_{size_mb}MB", through_rank0, {"pool": list(remote.pool.ranks)}),
                (f"chained_future_{size_mb}MB", chained,
                 {"producer_pool": list(producer.pool.ranks),
                  "consumer_pool": list(consumer.pool.ranks)})):
            fields, times = measure(fn, iters, warmup, counters, profiler)
            emit(case, size_mb=size_mb, batch_bytes=nbytes, **pools, **fields,
                 mb_per_s=round(nbytes / MB / statistics.median(times), 1))
            profiler.report(case)
        del batch


def replicated_cases(groups: dict, cfg: dict, counters: ByteCounters, profiler: Profiler) -> None:
    """A 16 MB Batch that several ranks need whole: ONE_TO_ALL on every rank, and DP_COMPUTE at
    tp2 (both ranks of a replica get its half). ``rank0_payload_sent`` shows whether rank 0 sends
    it once or once per rank."""
    size_mb = 16
    rows = batch_rows(size_mb, 2)
    batch = Batch({"x": torch.randn(rows, ROW_FLOATS)})
    cases = [("replicated_one_to_all_16MB", groups["all"], lambda: groups["all"].consume_all(batch)),
             ("replicated_dp_compute_tp2_16MB", groups["tp2"], lambda: groups["tp2"].consume(batch))]
    for case, group, fn in cases:
        fields, times = measure(fn, cfg["batch_iters"][16], 2, counters, profiler)
        emit(case, size_mb=size_mb, batch_bytes=batch.nbytes, pool=list(group.pool.ranks),
             layout=group.layout.describe(), **fields,
             rank0_sent_copies=round(fields["rank0_payload_sent"] / batch.nbytes, 2))
        profiler.report(case)


def main(quick: bool, profile: bool) -> None:
    world = dist.get_world_size()
    if world < 3:
        raise ValueError(f"dispatch_overhead needs at least 3 ranks (rank 0 plus a producer and a "
                         f"consumer pool), got a world of {world}; run it with torchrun "
                         "--nproc-per-node 4 or mpiexec -n 4")
    cfg = QUICK if quick else FULL
    runtime = get_runtime()
    emit("env", torch=torch.__version__, python=platform.python_version(),
         backend=runtime.ctx.backend, launcher=runtime.ctx.env.launcher,
         cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), quick=quick)
    remote_ranks = tuple(range(1, world))
    num_consumers = len(remote_ranks) // 2   # 4 ranks: producers (1, 2), consumer (3,)
    groups = {"all": WorkerGroup(BenchWorker, ResourcePool("all", tuple(range(world)))),
              "remote": WorkerGroup(BenchWorker, ResourcePool("remote", remote_ranks)),
              "producer": WorkerGroup(BenchWorker, ResourcePool(
                  "producer", remote_ranks[:-num_consumers])),
              "consumer": WorkerGroup(BenchWorker, ResourcePool(
                  "consumer", remote_ranks[-num_consumers:]))}
    if world % 2 == 0:
        groups["tp2"] = WorkerGroup(BenchWorker, ResourcePool("tp2", tuple(range(world))),
                                    ParallelDims(tp=2, dp=world // 2))
    counters = ByteCounters(groups["all"])
    profiler = Profiler(profile)
    noop_cases(groups, cfg, counters, profiler)
    if "tp2" in groups:
        replicated_cases(groups, cfg, counters, profiler)
    throughput_cases(groups, cfg, counters, profiler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 and 16 MB only, few iterations (seconds; for tests)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile rank 0's timed loops; top functions go to stderr")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    hfrl.run(main, args.quick, args.profile)
