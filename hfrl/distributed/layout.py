"""`hfrl layout`: build the placement plan and every process group, check them, report them.

Under a launcher every rank builds its groups, runs one all-reduce on each of them and checks the
result, and rank 0 compares every rank's view of the plan before printing it. With `--world-size N`
and no launcher it is a dry run: rank 0 of a fake N-rank world builds every group through the same
code (`torch.distributed`'s fake backend), so a 100k-rank plan can be checked on a laptop in
seconds. Both paths load and validate the config the same way, so they refuse the same configs.
"""
from __future__ import annotations

import datetime
import json
from typing import Any

from hfrl.config import Config
from hfrl.distributed.env import DistContext, collective_device, detect_env, init_distributed
from hfrl.distributed.parallel_dims import AXES, AXIS_DOCS, GroupCache, RoleGroups
from hfrl.distributed.resource_pool import (MAX_WORLD_SIZE, PlacementPlan, build_process_groups,
                                            plan_for_config)


def check_groups(groups: dict[str, RoleGroups], rank: int) -> dict[str, Any]:
    """All-reduce this rank's global rank over each of its groups; the sum must be the members'."""
    import torch
    import torch.distributed as dist

    checked = 0
    for role_groups in groups.values():
        for axis in AXES:
            if axis not in role_groups.groups:
                continue
            members = role_groups.ranks[axis]
            value = torch.tensor([rank], dtype=torch.int64, device=collective_device(role_groups.groups[axis]))
            dist.all_reduce(value, group=role_groups.groups[axis])
            if value.item() != sum(members):
                raise RuntimeError(f"{role_groups.role}/{axis} group {list(members)}: all-reduce "
                                   f"of ranks gave {value.item()}, expected {sum(members)}")
            if dist.get_rank(role_groups.groups[axis]) != members.index(rank):
                raise RuntimeError(f"{role_groups.role}/{axis}: rank {rank} has group rank "
                                   f"{dist.get_rank(role_groups.groups[axis])}, expected "
                                   f"{members.index(rank)}")
            checked += 1
    return {"rank": rank, "groups_checked": checked,
            "view": {role: {axis: list(g.ranks[axis]) for axis in AXES if axis in g.ranks}
                     for role, g in groups.items()}}


def _expected_view(plan: PlacementPlan, rank: int) -> dict[str, dict[str, list[int]]]:
    view = {}
    for p in plan.roles:
        if rank not in p.pool:
            view[p.role] = {}
            continue
        position = p.pool.positions[rank]
        view[p.role] = {axis: [p.pool.ranks[i] for i in p.dims.group_of(axis, position)]
                        for axis in AXES}
    return view


def run_layout(config: Config, dry_run_world_size: int | None = None) -> dict[str, Any] | None:
    """Build and check the plan; returns the report on rank 0 and None on the other ranks."""
    if dry_run_world_size is not None:
        return _dry_run(config, dry_run_world_size)
    denv = detect_env()
    plan = plan_for_config(config, denv.world_size)   # before any collective, and before torch loads
    import torch.distributed as dist

    ctx: DistContext = init_distributed(config.distributed.backend, config.distributed.timeout_s)
    try:
        cache = GroupCache(timeout=datetime.timedelta(seconds=ctx.timeout_s))
        groups = build_process_groups(plan, ctx.rank, cache)
        local = check_groups(groups, ctx.rank)
        views = [None] * ctx.world_size
        dist.all_gather_object(views, local, group=ctx.control_group)
        if ctx.rank != 0:
            return None
        for r, got in enumerate(views):
            if got["view"] != _expected_view(plan, r):
                raise RuntimeError(f"rank {r}'s process groups differ from the plan: "
                                   f"{got['view']} vs {_expected_view(plan, r)}")
        return {"world_size": ctx.world_size, "launcher": ctx.env.launcher,
                "backend": ctx.backend, "num_process_groups": len(cache),
                "groups_checked": sum(v["groups_checked"] for v in views),
                "plan": plan.to_dict()}
    finally:
        dist.barrier(group=ctx.control_group)
        dist.destroy_process_group()


def _dry_run(config: Config, world_size: int) -> dict[str, Any]:
    if world_size < 1:
        raise ValueError(f"--world-size {world_size} must be >= 1")
    if world_size > MAX_WORLD_SIZE:
        raise ValueError(f"--world-size {world_size}: hfrl plans for at most {MAX_WORLD_SIZE} "
                         "ranks (MAX_WORLD_SIZE in hfrl/distributed/resource_pool.py)")
    denv = detect_env()
    if denv.world_size > 1:
        raise ValueError(f"--world-size is a dry run without a launcher, but this process was "
                         f"started by {denv.launcher} with {denv.world_size} ranks; drop "
                         f"--world-size to check the launched world")
    plan = plan_for_config(config, world_size)   # a bad plan answers before torch loads
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        cache = GroupCache()
        build_process_groups(plan, 0, cache)
        return {"world_size": world_size, "launcher": "none", "backend": "fake (dry run)",
                "num_process_groups": len(cache), "groups_checked": 0, "plan": plan.to_dict()}
    finally:
        dist.destroy_process_group()


def format_report(report: dict[str, Any], max_groups: int | None = 16) -> str:
    """Human-readable plan: pools, each role's layouts, and its groups per axis."""
    plan = report["plan"]
    lines = [f"world size {report['world_size']} | launcher {report['launcher']} | backend "
             f"{report['backend']} | placement {plan['mode']} | "
             f"{report['num_process_groups']} distinct process groups"
             + (f", {report['groups_checked']} checked by all-reduce"
                if report["groups_checked"] else "")]
    lines.append("pools:")
    for name, ranks in plan["pools"].items():
        roles = [r for r, info in plan["roles"].items() if info["pool"] == name]
        lines.append(f"  {name:<8} {len(ranks):>5} ranks {_span(ranks):<14} roles: "
                     f"{', '.join(roles)}")
    for role, info in plan["roles"].items():
        lay = info["layout"]
        lines.append(f"{role} on '{info['pool']}': train pp={lay['pp']} tp={lay['tp']} "
                     f"dp={lay['dp']} | generate pg={lay['pg']} tg={lay['tg']} dg={lay['dg']} "
                     f"({lay['grouping']})")
        trivial = []
        for axis in AXES:
            groups = info["groups"][axis]
            if len(groups[0]) == 1:
                trivial.append(axis)
                continue
            limit = len(groups) if max_groups is None else max_groups
            shown = " ".join(_fmt_group(g, full=max_groups is None) for g in groups[:limit])
            more = f" ... (+{len(groups) - limit} more)" if len(groups) > limit else ""
            lines.append(f"  {axis:<9} {len(groups):>4} x {len(groups[0]):<4} {shown}{more}")
        if trivial:
            lines.append(f"  (size-1 groups: {', '.join(trivial)})")
    if "transition" in report:
        lines.append("actor train -> generate transition, per rank (M = actor parameter bytes; Table 2):")
        lines += [f"  {line}" for line in report["transition"]["lines"]]
    lines.append("axes: " + "; ".join(f"{a} = {d}" for a, d in AXIS_DOCS.items()))
    return "\n".join(lines)


def _span(ranks: list[int]) -> str:
    if ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"[{ranks[0]}..{ranks[-1]}]"
    return json.dumps(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, ...]"


def _fmt_group(group: list[int], full: bool = False) -> str:
    if len(group) > 8 and not full:
        return f"[{group[0]},{group[1]},..,{group[-1]}]"
    return "[" + ",".join(map(str, group)) + "]"
