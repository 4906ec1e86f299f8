"""The single controller: Batch, transfer protocols, workers, worker groups, the coordinator."""
from hfrl.controller.coordinator import run
from hfrl.controller.dispatch import (ALL_TO_ALL, DP_COMPUTE, DP_COMPUTE_BALANCED,
                                      MICRO_DP_COMPUTE, ONE_TO_ALL, PP_ONLY, Protocol, balanced,
                                      register_protocol)
from hfrl.controller.protocol import Batch
from hfrl.controller.worker_group import (Future, RemoteError, Worker, WorkerContext,
                                          WorkerGroup, WorkerLostError, register)
from hfrl.distributed.parallel_dims import ParallelDims
from hfrl.distributed.resource_pool import ResourcePool

__all__ = ["ALL_TO_ALL", "DP_COMPUTE", "DP_COMPUTE_BALANCED", "balanced", "MICRO_DP_COMPUTE", "ONE_TO_ALL", "PP_ONLY", "Batch",
           "Future", "ParallelDims", "Protocol", "RemoteError", "ResourcePool", "Worker",
           "WorkerContext", "WorkerGroup", "WorkerLostError", "register", "register_protocol", "run"]
