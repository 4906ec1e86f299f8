"""The single controller: Batch, transfer protocols, workers, worker groups, `run`.

Files, in the direction of their imports: `worker_group` (Worker, @register, WorkerGroup) ->
`entry` (run) -> `driver` (rank 0: calls, replies, futures) and `serve` (other ranks: the command
loop) -> `planning` (rows of chained futures), `watchdog` (liveness), `runtime` (state every
rank holds) -> `dispatch` (protocols), `transport` (messages), `batch` (the data type).
"""
from hfrl.controller.batch import Batch
from hfrl.controller.dispatch import (ALL_TO_ALL, DP_COMPUTE, DP_COMPUTE_BALANCED,
                                      MICRO_DP_COMPUTE, ONE_TO_ALL, PP_ONLY, Protocol, balanced,
                                      register_protocol)
from hfrl.controller.driver import Future
from hfrl.controller.entry import get_runtime, run
from hfrl.controller.errors import RemoteError, WorkerLostError
from hfrl.controller.runtime import WorkerContext
from hfrl.controller.worker_group import Worker, WorkerGroup, register
from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.resource_pool import ResourcePool

__all__ = ["ALL_TO_ALL", "DP_COMPUTE", "DP_COMPUTE_BALANCED", "MICRO_DP_COMPUTE", "ONE_TO_ALL",
           "PP_ONLY", "Batch", "Future", "ParallelDims", "Protocol", "RemoteError",
           "ResourcePool", "Worker", "WorkerContext", "WorkerGroup", "WorkerLostError",
           "balanced", "get_runtime", "register", "register_protocol", "run"]
