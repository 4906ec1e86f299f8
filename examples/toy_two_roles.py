"""A toy two-role program: a "doubler" on ranks 0-1 and a "summer" on ranks 2-3.

    python examples/toy_two_roles.py                                   # world of 1: both on rank 0
    torchrun --nproc-per-node 4 examples/toy_two_roles.py
    mpiexec -n 4 python examples/toy_two_roles.py

The program is the same plain function everywhere; it prints one JSON line on rank 0.
"""
import json

import torch
import torch.distributed as dist

import hfrl
from hfrl.controller import DP_COMPUTE, Batch, ResourcePool, Worker, WorkerGroup, register


class Doubler(Worker):
    @register(protocol=DP_COMPUTE)
    def double(self, batch: Batch) -> Batch:
        return Batch({"x": batch["x"] * 2, "src": torch.full((len(batch),), self.ctx.rank)})


class Summer(Worker):
    @register(protocol=DP_COMPUTE)
    def total(self, batch: Batch) -> Batch:
        # A collective inside the role: the sum over the whole pool, on every row.
        local = batch["x"].sum().reshape(1)
        dist.all_reduce(local, group=self.ctx.groups.groups["dp"])
        return Batch({"x": batch["x"], "pool_sum": local.expand(len(batch)).clone()})


def main():
    world = dist.get_world_size()
    pools = ((0, 1), (2, 3)) if world >= 4 else ((0,), (0,)) if world == 1 else ((0,), (1,))
    doubler = WorkerGroup(Doubler, ResourcePool("doubler", pools[0]))
    summer = WorkerGroup(Summer, ResourcePool("summer", pools[1]))
    batch = Batch({"x": torch.arange(10, dtype=torch.float32)})
    # A Future: the doubled rows stay on the doubler's ranks (rank 0 included) ...
    doubled = doubler.double(batch, blocking=False)
    # ... and the summer's ranks fetch their rows straight from them; only this blocking
    # call's result comes back to rank 0.
    out = summer.total(doubled)
    return {"world_size": world, "x": out["x"].tolist(), "pool_sum": out["pool_sum"].tolist()}


if __name__ == "__main__":
    result = hfrl.run(main)
    if result is not None:
        print(json.dumps(result))
