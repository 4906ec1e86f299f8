"""Run a function on N real processes with a gloo process group, as torchrun would.

    results = run_ranks(4, my_test_body, arg1, arg2)   # list of return values, rank order

`fn(rank, world_size, *args)` must be a module-level function (it is pickled into spawned
processes). Each rank gets torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so code under test initialises itself exactly as under a launcher;
pass `init=True` to have the harness call `init_process_group("gloo")` first. A failure on any
rank is re-raised in the test with that rank's traceback; a hang fails after `timeout` seconds.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import traceback
from typing import Any, Callable

import torch

from hfrl.distributed.env import free_port  # noqa: F401 - tests import it from here

DEFAULT_TIMEOUT = 180.0




def _entry(fn, rank, world_size, port, init, env, args, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **env})
    try:
        import torch

        torch.set_num_threads(1)
        if init:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    init_method=f"tcp://127.0.0.1:{port}")
        value = fn(rank, world_size, *args)
        # Plain bytes: a tensor put on the queue as-is travels as a shared-memory file
        # descriptor that must be fetched from this process while it is still alive (a race).
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable[..., Any], *args, init: bool = False,
              timeout: float = DEFAULT_TIMEOUT, env: dict[str, str] | None = None) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, init, env or {}, args,
                                              results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(values) - set(failures))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout} s; "
                                   f"failures so far: {failures}") from None
            if ok:
                values[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                failures[rank] = value
            if failures:
                break   # the others may be blocked in a collective with the failed rank
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        rank = min(failures)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{failures[rank]}")
    return [values[r] for r in range(world_size)]
