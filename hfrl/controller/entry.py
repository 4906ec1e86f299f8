"""`hfrl.run(main)`: the entry point every rank calls, under torchrun / srun / mpirun / python.

Rank 0 becomes the single controller (`Driver`) and calls `main()`; every other rank becomes a
`Server` and runs rank 0's commands until it shuts them down. Rank 0 issues one total order of
commands and every rank runs its commands in that order, so the collectives inside worker
methods always match: there is no deadlock by design.

Failure: an exception in a worker method becomes a `RemoteError` on rank 0, raised where the
program waits for that call; the program may catch it. If `main` raises, every rank is told to
abort and every process exits non-zero. A dead peer, or rank 0 failing while others wait for
it in a collective, ends the job within seconds under every launcher (watchdog.py); the
collective timeout is only the last resort.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

import torch.distributed as dist

from hfrl.controller import runtime as _runtime
from hfrl.controller.driver import Driver
from hfrl.controller.serve import Server
from hfrl.controller.watchdog import MIN_HANG_S, Watchdog
from hfrl.distributed.env import init_distributed

WATCHDOG_GRACE_S = 3.0
"""How long a rank waits, after losing a peer or after rank 0 failed inside a call it is still
running, before it ends itself (the main thread gets this long to fail the ordinary way)."""


def get_runtime() -> Driver:
    """Rank 0's driver of the running `hfrl.run`."""
    current = _runtime.current()
    if current is None:
        raise RuntimeError("no hfrl runtime: create worker groups inside a function run by "
                           "hfrl.run(main)")
    if current.rank != 0:
        raise RuntimeError(f"worker groups are driven from rank 0; rank {current.rank} only "
                           "serves (create them inside main, which hfrl.run runs on rank 0)")
    return current


def run(main: Callable[..., Any], *args, config: Any = None, backend: str | None = None,
        timeout_s: float | None = None, adopted_groups: Any = None, **kwargs) -> Any:
    """Run `main(*args, **kwargs)` on rank 0 as the single controller; serve on other ranks.

    `config`: an `hfrl.config.Config` or a YAML path, validated on every rank before the first
    collective, with its placement plan checked against the launched world
    (`hfrl.config.resolve_for_run`): a bad config fails every rank the same way, with no rank
    waiting for another. Its `distributed.backend` and `distributed.timeout_s` set up the process
    groups; workers see it as `self.ctx.config`, the program as `get_runtime().config`.
    `backend`/`timeout_s` given here win over the config's.

    `adopted_groups`: existing process groups hfrl uses instead of creating its own for the same
    ranks, as (ranks, group) pairs, the same rank sets in the same order on every rank (a
    Megatron job's groups: `hfrl.integrations.megatron`; see `GroupCache.adopt`).

    Returns main's result on rank 0 and None on the others. If main raises, every rank exits
    non-zero: rank 0 re-raises, the others raise SystemExit(1).
    """
    config = _resolve_config(config)
    if config is not None:
        backend = backend or config.distributed.backend
        timeout_s = timeout_s if timeout_s is not None else config.distributed.timeout_s
    owns_group = not dist.is_initialized()
    ctx = init_distributed(backend or "auto", 600.0 if timeout_s is None else timeout_s)
    watchdog = Watchdog(ctx.rank, ctx.world_size, WATCHDOG_GRACE_S, hang_s=max(ctx.timeout_s, MIN_HANG_S))
    role = Driver if ctx.rank == 0 else Server
    runtime = role(ctx, config, watchdog)
    for ranks, group in adopted_groups or ():
        runtime.cache.adopt(ranks, group)
    watchdog.start()
    _runtime.set_current(runtime)
    clean = False
    try:
        if ctx.rank != 0:
            code = runtime.serve()
            if code:
                raise SystemExit(code)
            clean = True
            return None
        try:
            result = main(*args, **kwargs)
            runtime.shutdown()
        except BaseException:
            # Printed before the others are told: a launcher's agent (torchrun) may stop this
            # process as soon as the first of them exits.
            print(f"hfrl: the program failed on rank 0; ending all {ctx.world_size} ranks:\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            failure = sys.exc_info()[1]
            try:
                failure.hfrl_reported = True   # the CLI prints its one line, not the traceback again
            except AttributeError:
                pass
            runtime.abort()
            raise
        clean = True
        return result
    finally:
        _runtime.set_current(None)
        # After a failure the watchdog's threads may still wait on peers: leave the groups to
        # the process's exit rather than tear them down under those threads.
        if owns_group and clean and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_config(config: Any) -> Any:
    if config is None:
        return None
    from hfrl.config import resolve_for_run

    return resolve_for_run(config)
