"""Real processes on gloo: every rank builds every group, and a collective on each one works.

The same body runs under pytest-mpi (`mpiexec -n 4 python -m pytest --with-mpi`), where the
launcher's variables come from MPICH/Open MPI and the master address from an mpi4py broadcast.
"""
import pytest
import torch
import torch.distributed as dist

from hfrl.config import load_config
from hfrl.distributed.env import destroy_distributed, init_distributed
from hfrl.distributed.layout import _expected_view, check_groups
from hfrl.distributed.parallel_dims import GroupCache
from hfrl.distributed.resource_pool import build_plan, build_process_groups
from tests.multiproc import run_ranks

LAYOUTS = {
    2: [["roles.actor.tp=2"], ["placement.mode=split"]],
    4: [["roles.actor.tp=4", "roles.actor.tg=2"],
        ["roles.actor.pp=2", "roles.actor.tp=2", "roles.actor.tg=1", "roles.critic.pp=2"],
        ["roles.actor.tp=4", "roles.actor.tg=2", "roles.actor.grouping=vanilla"],
        ["placement.mode=split", "roles.actor.tp=2", "roles.critic.tp=2"],
        ["placement.mode=custom", "placement.pools={a: [0, 3], b: [1, 2]}",
         "roles.actor.pool=a", "roles.ref.pool=a", "roles.critic.pool=b",
         "roles.reward.pool=b", "roles.actor.tp=2", "roles.actor.tg=1"]],
    8: [["roles.actor.pp=2", "roles.actor.tp=2", "roles.actor.pg=1", "roles.actor.tg=1",
         "roles.critic.tp=4"],
        ["placement.mode=standalone", "roles.actor.tp=2"]],
}


def layout_body(rank, world_size, layouts):
    """For each layout: build, check and exercise every group; one result per layout."""
    ctx = init_distributed("gloo", timeout_s=60)
    try:
        assert ctx.rank == rank and ctx.world_size == world_size
        return [_check_layout(rank, world_size, overrides) for overrides in layouts]
    finally:
        destroy_distributed()


def _check_layout(rank, world_size, overrides):
    cfg = load_config(None, overrides)
    plan = build_plan(cfg.placement, cfg.roles, world_size)
    groups = build_process_groups(plan, rank, GroupCache())
    report = check_groups(groups, rank)
    # all_gather on the micro-DP group returns members in group-rank order: the all-gather
    # the hybrid engine does to assemble a generation shard.
    actor = groups["actor"]
    gathered = None
    if actor.is_member:
        out = [torch.zeros(1, dtype=torch.int64) for _ in actor.ranks["micro_dp"]]
        dist.all_gather(out, torch.tensor([rank]), group=actor.groups["micro_dp"])
        gathered = [int(t) for t in out]
    return report["view"], gathered, report["groups_checked"]


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_groups_on_real_processes(world):
    results = run_ranks(world, layout_body, LAYOUTS[world])   # one process set, all layouts
    for i, overrides in enumerate(LAYOUTS[world]):
        cfg = load_config(None, overrides)
        plan = build_plan(cfg.placement, cfg.roles, world)
        for rank, per_layout in enumerate(results):
            view, gathered, checked = per_layout[i]
            assert view == _expected_view(plan, rank), overrides
            assert checked == sum(len(v) for v in view.values())
            if gathered is not None:
                assert gathered == view["actor"]["micro_dp"]


@pytest.mark.mpi(min_size=2)
def test_groups_under_mpi():
    from mpi4py import MPI

    world = MPI.COMM_WORLD.Get_size()
    overrides = ["roles.actor.tp=2", "roles.actor.tg=1"] if world % 2 == 0 else []
    cfg = load_config(None, overrides)
    plan = build_plan(cfg.placement, cfg.roles, world)
    [(view, gathered, _)] = layout_body(MPI.COMM_WORLD.Get_rank(), world, [overrides])
    assert view == _expected_view(plan, MPI.COMM_WORLD.Get_rank())
    if gathered is not None:
        assert gathered == view["actor"]["micro_dp"]
