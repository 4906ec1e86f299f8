"""A searched mapping as an hfrl config: pools, roles and layouts that `hfrl layout` and `hfrl train`
read as they are (placement.mode=custom).

Each colocated set of the mapping becomes a pool of consecutive global ranks, named after its roles
("actor+ref"); each role gets its pool and its training layout (pp, tp, dp), the actor also its
generation layout (pg, tg). The algorithm and the roles it uses are set too (a critic-free algorithm
disables the critic, Safe-RLHF enables the cost model); model folders are the user's to add
(engine.model_path and roles.<role>.engine.model_path), since the plan only knew model shapes.
"""
from __future__ import annotations

from typing import Any

ROLE_OF = {"cost_critic": "critic"}
"""Simulator roles that hfrl runs as part of another role (Safe-RLHF's cost critic shares the
critic's pool and layout)."""


def mapping_to_config(mapping, algorithm: str) -> dict[str, Any]:
    """The config (plain data) that runs `mapping`; dump it with yaml.safe_dump."""
    pools: dict[str, list[int]] = {}
    roles: dict[str, dict[str, Any]] = {}
    start = 0
    for members, size in zip(mapping.placement, mapping.allocation):
        hfrl_roles = [r for r in members if r not in ROLE_OF]
        name = "+".join(hfrl_roles or members)
        pools[name] = list(range(start, start + size))
        start += size
        for role in members:
            if role in ROLE_OF:
                continue
            plan = mapping.plan(role)
            entry: dict[str, Any] = {"enabled": True, "pool": name, "pp": plan.train.pp, "tp": plan.train.tp,
                                     "dp": plan.train.dp}
            if plan.gen is not None:
                entry.update(pg=plan.gen.pg, tg=plan.gen.tg)
            roles[role] = entry
    for role in ("actor", "critic", "ref", "reward", "cost"):
        roles.setdefault(role, {"enabled": False})
    return {"distributed": {"world_size": start},
            "placement": {"mode": "custom", "pools": pools},
            "roles": roles,
            "algorithm": {"name": algorithm}}
