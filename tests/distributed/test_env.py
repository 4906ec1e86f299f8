"""Launcher detection: each launcher's variables give the same rank/world/local/master answers."""
import pytest
import torch.distributed as dist

from hfrl.distributed.env import (detect_env, expand_first_host, init_distributed, slurm_port,
                                  destroy_distributed)


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 8, 1, 2)
    assert (d.master_addr, d.master_port, d.launcher) == ("node7", 1234, "torchrun")


def test_torchrun_wins_inside_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect_env(env).launcher == "torchrun"
    assert detect_env(env).rank == 1


def test_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODELIST": "gpu[007-010,012]", "SLURM_JOB_ID": "123456",
           "SLURM_TASKS_PER_NODE": "2(x4)"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 8, 1, 2)
    assert d.master_addr == "gpu007"
    assert d.master_port == slurm_port("123456") == 20000 + 123456 % 10000
    assert d.launcher == "slurm"


def test_slurm_step_task_count_beats_the_jobs():
    # srun -n 4 inside an allocation made with --ntasks-per-node=1: the job-level variable is
    # inherited, the step-level one is right.
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3",
           "SLURM_NODELIST": "vm", "SLURM_JOB_ID": "5", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4"}
    assert detect_env(env).local_world_size == 4


def test_slurm_step_nodelist_and_explicit_master_win():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a[1-9]",
           "SLURM_STEP_NODELIST": "b[3-4]", "SLURM_JOB_ID": "7"}
    assert detect_env(env).master_addr == "b3"
    env.update(MASTER_ADDR="10.0.0.1", MASTER_PORT="4000")
    d = detect_env(env)
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 4000)


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("a1,a2", "a1"), ("gpu[007-009,012],cpu1", "gpu007"),
    ("rack[2-3]-n[1-2]", "rack2-n1"), ("x[5]", "x5"), ("host-01.cluster", "host-01.cluster"),
])
def test_expand_first_host(nodelist, first):
    assert expand_first_host(nodelist) == first


def test_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (2, 4, 0, 2)
    assert d.launcher == "openmpi" and d.master_addr is None   # broadcast by mpi4py later


def test_mpich_variables():
    env = {"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.launcher) == \
        (1, 3, 1, 3, "mpich")


def test_no_launcher_is_world_of_one():
    d = detect_env({})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (0, 1, 0, "none")


@pytest.mark.parametrize("env,match", [
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "world size 0"),
])
def test_bad_variables(env, match):
    with pytest.raises(ValueError, match=match):
        detect_env(env)


def test_init_world_of_one_without_launcher():
    ctx = init_distributed("auto", timeout_s=30, environ={})
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, "gloo")
        assert dist.get_world_size() == 1
    finally:
        destroy_distributed()


def test_bad_backend():
    with pytest.raises(ValueError, match="backend='mpi'"):
        init_distributed("mpi", environ={})
