"""The single controller under real launchers: the same plain program gives the same answer.

- The toy two-role program (examples/toy_two_roles.py) runs under torchrun (4 ranks), mpiexec
  (4 ranks) and as a single process (world 1); `x` and `pool_sum` must be identical.
- benchmarks/dispatch_overhead.py --quick runs under torchrun and reports exact byte counts:
  a chained future moves no tensor byte through rank 0, a blocking call moves the batch there
  and back.
- Under `mpiexec -n 4 python -m pytest --with-mpi -m mpi tests/controller`, every rank calls
  `hfrl.run(main)` itself (hfrl reads MPICH's/Open MPI's variables; the master address comes
  from an mpi4py broadcast).

A missing launcher skips its test, or fails it with HFRL_REQUIRE_LAUNCHERS=1 (as in
tests/launch/test_launchers.py, whose command helpers this file reuses).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import hfrl
from hfrl.controller import DP_COMPUTE, Batch, ResourcePool, Worker, WorkerGroup, register
from tests.launch.test_launchers import _describe, _need, free_port, mpi_flavour
from tests.launch.test_launchers import run as run_command

NPROC = 4
TOY = ["examples/toy_two_roles.py"]
BENCH = ["benchmarks/dispatch_overhead.py", "--quick"]
MB = 2**20


def json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    """Every non-empty stdout line as JSON (rank 0 prints them; other ranks print nothing)."""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    try:
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as err:
        pytest.fail(_describe(result.args, result.returncode, result.stdout, result.stderr,
                              f"a stdout line is not JSON ({err})"))


def launch(launcher: str, script: list[str]) -> subprocess.CompletedProcess:
    """Run a script on NPROC ranks under `launcher`, or as one plain process ("none")."""
    if launcher == "none":
        return run_command([sys.executable, *script])
    if launcher == "torchrun":
        return run_command([_need("torchrun"), "--nproc-per-node", str(NPROC),
                            "--master-port", str(free_port()), *script])
    mpiexec = _need("mpiexec")
    flags = ["--oversubscribe", "--allow-run-as-root"] if mpi_flavour(mpiexec) == "openmpi" else []
    return run_command([mpiexec, "-n", str(NPROC), *flags, sys.executable, *script])


# ---- the toy program under every launcher ---------------------------------------------------


@pytest.fixture(scope="module")
def single_process_toy() -> dict:
    [result] = json_lines(launch("none", TOY))
    return result


def test_toy_single_process(single_process_toy):
    out = single_process_toy
    assert out["world_size"] == 1
    # Doubled by the first role, summed over its pool by the second.
    assert out["x"] == [2.0 * i for i in range(10)]
    assert out["pool_sum"] == [90.0] * 10


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_toy_same_under_launcher(launcher, single_process_toy):
    [out] = json_lines(launch(launcher, TOY))
    assert out["world_size"] == NPROC, f"{launcher}: each rank saw a world of {out['world_size']}"
    assert out["x"] == single_process_toy["x"]
    assert out["pool_sum"] == single_process_toy["pool_sum"]


# ---- the dispatch benchmark ------------------------------------------------------------------


def test_dispatch_benchmark_quick_under_torchrun():
    lines = json_lines(launch("torchrun", BENCH))
    cases = {line["case"]: line for line in lines}
    assert len(cases) == len(lines), f"a case was printed twice: {[x['case'] for x in lines]}"
    assert all(line["bench"] == "dispatch_overhead" and line["world_size"] == NPROC
               for line in lines)
    env = cases.pop("env")
    assert env["launcher"] == "torchrun" and env["backend"] == "gloo" and env["quick"] is True
    assert set(cases) == {"noop_one_to_all_pool_all", "noop_one_to_all_pool_remote",
                          "noop_dp_compute_1row", "through_rank0_1MB", "chained_future_1MB",
                          "through_rank0_16MB", "chained_future_16MB",
                          "replicated_one_to_all_16MB", "replicated_dp_compute_tp2_16MB"}
    for name, case in cases.items():
        assert 0 < case["min_ms"] <= case["median_ms"] <= case["p90_ms"], name
        if not name.startswith("replicated"):   # relayed bytes: workers cannot tell the source
            assert case["bytes_through_rank0"] == case["bytes_through_rank0_seen_by_workers"], name
    # Rank 0 sends a batch that every rank (or each tp2 replica) needs exactly once.
    assert cases["replicated_one_to_all_16MB"]["rank0_sent_copies"] == 1.0
    assert cases["replicated_dp_compute_tp2_16MB"]["rank0_sent_copies"] == 1.0
    for name in ("noop_one_to_all_pool_all", "noop_one_to_all_pool_remote"):
        assert cases[name]["bytes_through_rank0"] == 0 and cases[name]["remote_ranks"] == 3
    # A 1-row batch padded to 3 rows of one float32, each row 16-byte aligned, out and back.
    assert cases["noop_dp_compute_1row"]["bytes_through_rank0"] == 2 * 3 * 16
    for size_mb in (1, 16):
        through, chained = cases[f"through_rank0_{size_mb}MB"], cases[f"chained_future_{size_mb}MB"]
        nbytes = through["batch_bytes"]
        assert 0.95 * size_mb * MB < nbytes <= size_mb * MB and chained["batch_bytes"] == nbytes
        # Through rank 0: the batch goes out to the workers and comes back, exactly.
        assert through["rank0_payload_sent"] == through["rank0_payload_recv"] == nbytes
        assert through["worker_to_worker_bytes"] == 0
        # Chained: producers send straight to the consumer; not one tensor byte via rank 0.
        assert chained["bytes_through_rank0"] == 0
        assert chained["worker_to_worker_bytes"] == nbytes
        assert through["mb_per_s"] > 0 and chained["mb_per_s"] > 0


# ---- every rank calls hfrl.run itself, under pytest-mpi --------------------------------------


class Squarer(Worker):
    """Squares its rows and sums them over the DP group (a collective inside the method)."""

    @register(protocol=DP_COMPUTE)
    def square(self, batch: Batch) -> Batch:
        total = (batch["x"] ** 2).sum().reshape(1)
        dist.all_reduce(total, group=self.ctx.groups.groups["dp"])
        return Batch({"y": batch["x"] ** 2, "rank": torch.full((len(batch),), self.ctx.rank),
                      "total": total.expand(len(batch)).clone()})


def squares_main(num_rows: int) -> dict:
    world = dist.get_world_size()
    group = WorkerGroup(Squarer, ResourcePool("all", tuple(range(world))))
    out = group.square(Batch({"x": torch.arange(num_rows, dtype=torch.float64)}))
    return {"y": out["y"].tolist(), "rank": out["rank"].tolist(), "total": out["total"].tolist()}


@pytest.mark.mpi(min_size=2)
def test_hfrl_run_on_every_mpi_rank():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    num_rows = 2 * world + 1          # not divisible by the world: padded to 3 rows per rank
    result = hfrl.run(squares_main, num_rows, backend="gloo", timeout_s=120)
    # Every rank got here: run returned main's value on rank 0 and None on the others.
    returned = comm.allgather(result is not None if rank == 0 else result is None)
    assert returned == [True] * world
    if rank == 0:
        # Padding repeats rows 0, 1, ... and the all-reduce sums over padded rows too.
        padded_total = sum(i * i for i in range(num_rows)) + sum(i * i for i in range(world - 1))
        assert result["y"] == [float(i * i) for i in range(num_rows)]
        assert result["rank"] == [i // 3 for i in range(num_rows)]
        assert result["total"] == [float(padded_total)] * num_rows
