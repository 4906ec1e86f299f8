"""Resource pools and the placement plan: which global ranks each role runs on, in which layout.

A pool is a set of global ranks. The plan maps every enabled role to one pool and gives it a
`ParallelDims` over that pool. Placements (HybridFlow §6):

- colocate:   one pool of every rank; every role lives on it (verl's default).
- split:      pool "actor" holds actor + ref, pool "critic" holds critic + reward + cost.
- standalone: one pool per role.
- custom:     pools named in `placement.pools`, each role names its pool (`roles.<role>.pool`).

The optional `rollout` role (OpenRLHF's placement) generates for the actor on a pool of its own,
in the layout pp=1, tp=tg, dp=the rest of its pool (a generation layout only), and receives the
actor's weights after every update over `weight_sync_groups`: one group per actor pipeline stage,
that stage's first rank of training replica 0 followed by every rollout rank.

Pools never partially overlap and together cover the world exactly: a rank belonging to no pool
would sit idle for the whole job, which is always a configuration mistake. Several roles sharing
one pool is how colocation is expressed.

Plan building is pure: every rank builds the same plan from the same config and world size, and
every error is raised on every rank before the first collective.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

from hfrl.distributed.parallel_dims import AXES, GroupCache, ParallelDims, RoleGroups, build_groups

if TYPE_CHECKING:   # the schema lives above this module; plans only read its fields
    from hfrl.config import Config, PlacementConfig, RoleConfig, RolesConfig

ROLE_NAMES = ("actor", "critic", "ref", "reward", "cost", "rollout")
PLACEMENT_MODES = ("colocate", "split", "standalone", "custom")
SPLIT_POOLS = {"actor": ("actor", "ref"), "critic": ("critic", "reward", "cost")}
# The largest world hfrl plans for, about ten times today's largest GPU clusters. Planning is
# linear: a dry run (`hfrl layout --world-size N`, every group built on the fake backend) takes
# about 9 s and 0.6 GiB at 100k ranks and 1 min and 4 GiB at this bound on a 2-core machine;
# beyond it a size is a typo, refused with a message rather than a MemoryError.
MAX_WORLD_SIZE = 1 << 20


@dataclass(frozen=True)
class ResourcePool:
    name: str
    ranks: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ranks)

    def __contains__(self, rank: int) -> bool:
        return rank in self.positions

    @functools.cached_property
    def positions(self) -> dict[int, int]:
        """Global rank -> position in the pool (computed once: pools can hold 100k ranks)."""
        return {rank: i for i, rank in enumerate(self.ranks)}

    def __getstate__(self) -> dict[str, Any]:
        # Pools travel in commands: send the ranks, not the cached index of them.
        return {k: v for k, v in self.__dict__.items() if k != "positions"}


@dataclass(frozen=True)
class RolePlacement:
    role: str
    pool: ResourcePool
    dims: ParallelDims


@dataclass(frozen=True)
class PlacementPlan:
    world_size: int
    mode: str
    pools: tuple[ResourcePool, ...]
    roles: tuple[RolePlacement, ...]
    """Enabled roles in ROLE_NAMES order; this is also the order their groups are created in."""

    def role(self, name: str) -> RolePlacement:
        for placement in self.roles:
            if placement.role == name:
                return placement
        enabled = [p.role for p in self.roles]
        raise KeyError(f"role {name!r} is not in the plan (enabled roles: {enabled})")

    def weight_sync_groups(self) -> tuple[tuple[int, ...], ...]:
        """With a rollout role: per actor pipeline stage, (its sender, *every rollout rank); the
        sender is the stage's rank at dp=0, tp=0. Empty without a rollout role."""
        if not any(p.role == "rollout" for p in self.roles):
            return ()
        actor, rollout = self.role("actor"), self.role("rollout")
        per_stage = actor.dims.dp * actor.dims.tp
        return tuple((actor.pool.ranks[stage * per_stage], *rollout.pool.ranks)
                     for stage in range(actor.dims.pp))

    def roles_on(self, rank: int) -> list[str]:
        return [p.role for p in self.roles if rank in p.pool]

    def to_dict(self) -> dict[str, Any]:
        """Plain data: pools, each role's layout and every group's global ranks."""
        return {
            "world_size": self.world_size,
            "mode": self.mode,
            "pools": {pool.name: list(pool.ranks) for pool in self.pools},
            "roles": {
                p.role: {
                    "pool": p.pool.name,
                    "layout": p.dims.to_dict(),
                    "groups": {axis: p.dims.groups(axis, p.pool.ranks) for axis in AXES},
                }
                for p in self.roles
            },
            **({"weight_sync": [list(g) for g in self.weight_sync_groups()]}
               if self.weight_sync_groups() else {}),
        }


def _even_sizes(world_size: int, names: list[str], mode: str) -> dict[str, int]:
    if world_size % len(names):
        raise ValueError(
            f"placement.mode={mode}: {world_size} ranks cannot be split evenly over pools "
            f"{names}; give sizes, e.g. placement.pools={{{', '.join(f'{n}: N' for n in names)}}}")
    return {name: world_size // len(names) for name in names}


def _make_pools(spec: dict[str, int | list[int]], world_size: int, mode: str) -> list[ResourcePool]:
    """Sizes are laid out consecutively in the given order; rank lists are taken as they are, and must
    be ascending: a process group orders its members by global rank, so a pool listed out of order
    would give a rank one TP/DP coordinate in the plan and another in its groups (the wrong shards)."""
    pools, next_rank, owner = [], 0, {}
    for name, value in spec.items():
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"placement.pools.{name}={value}: a pool needs at least 1 rank")
            ranks = tuple(range(next_rank, next_rank + value))
            next_rank += value
        else:
            ranks = tuple(value)
            if not ranks:
                raise ValueError(f"placement.pools.{name}: empty rank list")
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"placement.pools.{name}={list(ranks)} lists a rank twice")
            if list(ranks) != sorted(ranks):
                raise ValueError(f"placement.pools.{name}={list(ranks)}: list the ranks in ascending order "
                                 f"({sorted(ranks)}); process groups order their members by global rank, so "
                                 "a pool's rank order is fixed")
        for rank in ranks:
            if not 0 <= rank < world_size:
                raise ValueError(f"placement.pools.{name} uses rank {rank}, outside the world of "
                                 f"{world_size} ranks (0..{world_size - 1})")
            if rank in owner:
                raise ValueError(
                    f"placement.mode={mode}: pools '{owner[rank]}' and '{name}' overlap at rank "
                    f"{rank}; pools must be disjoint (put roles on one pool to colocate them)")
            owner[rank] = name
        pools.append(ResourcePool(name, ranks))
    uncovered = [r for r in range(world_size) if r not in owner]
    if uncovered:
        sizes = {p.name: len(p) for p in pools}
        raise ValueError(
            f"placement.mode={mode}: pools {sizes} cover {len(owner)} of {world_size} ranks; "
            f"ranks {_ranges(uncovered)} would sit idle. Make the pool sizes add up to "
            f"{world_size} (or launch {len(owner)} ranks)")
    return pools


def _ranges(ranks: list[int]) -> str:
    if len(ranks) > 6:
        return f"{ranks[:3]}...{ranks[-2:]}".replace("][", ", ")
    return str(ranks)


def _role_pool_names(mode: str, enabled: dict[str, RoleConfig],
                     placement: PlacementConfig) -> tuple[dict[str, str], list[str]]:
    """(role -> pool name, pool names in layout order) for a mode."""
    if mode == "colocate":
        if placement.pools:
            raise ValueError("placement.mode=colocate uses one pool of every rank; "
                             f"placement.pools={placement.pools} is only for split/standalone/"
                             "custom placements: remove it or change the mode")
        return {role: "all" for role in enabled}, ["all"]
    if mode == "split":
        role_pool = {role: name for name, members in SPLIT_POOLS.items()
                     for role in members if role in enabled}
        names = [n for n in SPLIT_POOLS if n in role_pool.values()]
        return role_pool, names
    if mode == "standalone":
        return {role: role for role in enabled}, list(enabled)
    role_pool = {}
    for role, cfg in enabled.items():
        if cfg.pool is None:
            raise ValueError(f"placement.mode=custom: roles.{role}.pool is not set; name one of "
                             f"the pools {list(placement.pools)}")
        if cfg.pool not in placement.pools:
            raise ValueError(f"roles.{role}.pool={cfg.pool!r} is not a pool in placement.pools "
                             f"{list(placement.pools)}")
        role_pool[role] = cfg.pool
    return role_pool, list(placement.pools)


def rollout_tg(cfg: RoleConfig) -> int:
    """The rollout role's tensor-parallel degree: roles.rollout.tg (or its tp, the same thing)."""
    return cfg.tg if cfg.tg is not None else cfg.tp


def _check_rollout_placement(mode: str, role_pool: dict[str, str], cfg: RoleConfig) -> None:
    """The rollout role needs ranks of its own and generates in one pipeline stage."""
    if mode in ("colocate", "split"):
        raise ValueError(
            f"roles.rollout.enabled=true with placement.mode={mode} would put the rollout on the "
            "actor's ranks: generating there is what the hybrid engine already does (set "
            "roles.rollout.enabled=false); for the OpenRLHF placement give the rollout a pool of "
            "its own with placement.mode=standalone or custom (roles.rollout.pool)")
    if role_pool.get("rollout") == role_pool.get("actor"):
        raise ValueError(
            f"roles.rollout.pool={role_pool['rollout']!r} is the actor's pool: to generate on the "
            "actor's own ranks use the hybrid engine instead (roles.rollout.enabled=false), or "
            "give the rollout a pool of its own in placement.pools")
    if cfg.pp != 1 or cfg.pg not in (None, 1):
        key, value = ("pp", cfg.pp) if cfg.pp != 1 else ("pg", cfg.pg)
        raise ValueError(f"roles.rollout.{key}={value}: the rollout generates in one pipeline stage; "
                         f"set roles.rollout.{key}=1 and split the pool with roles.rollout.tg and dp")
    if cfg.tg is not None and cfg.tp not in (1, cfg.tg):
        raise ValueError(f"roles.rollout.tp={cfg.tp} and roles.rollout.tg={cfg.tg}: the rollout has "
                         "only a generation layout; set roles.rollout.tg alone")
    if cfg.grouping != "hybridflow":
        raise ValueError(f"roles.rollout.grouping={cfg.grouping!r}: the grouping picks how the hybrid "
                         "engine regroups a training layout, which the rollout does not have; remove it")


def plan_for_config(config: Config, world_size: int) -> PlacementPlan:
    """Check the launched world size against the config and build the plan.

    Pure (no collective): every rank raises the same ValueError. Used by `hfrl layout` (launched
    and dry run alike) and by hfrl.config.resolve_for_run.
    """
    expected = config.distributed.world_size
    if expected is not None and expected != world_size:
        raise ValueError(f"distributed.world_size={expected} but {world_size} ranks were "
                         f"launched; launch {expected} ranks or change distributed.world_size")
    return build_plan(config.placement, config.roles, world_size)


def build_plan(placement: PlacementConfig, roles: RolesConfig, world_size: int) -> PlacementPlan:
    """Validate the placement and every role's layout against `world_size`; pure, no collective."""
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"a world of {world_size} ranks: hfrl plans for 1 to {MAX_WORLD_SIZE} "
                         "ranks (MAX_WORLD_SIZE)")
    if placement.mode not in PLACEMENT_MODES:
        raise ValueError(f"placement.mode={placement.mode!r}: expected one of {PLACEMENT_MODES}")
    enabled = {name: getattr(roles, name) for name in ROLE_NAMES if getattr(roles, name).enabled}
    if "actor" not in enabled:
        raise ValueError("roles.actor.enabled=false: every algorithm needs an actor")
    for name, cfg in enabled.items():
        if cfg.pool is not None and placement.mode != "custom":
            raise ValueError(f"roles.{name}.pool={cfg.pool!r} is only used with "
                             f"placement.mode=custom (mode is {placement.mode!r})")
    role_pool, pool_names = _role_pool_names(placement.mode, enabled, placement)
    if "rollout" in enabled:
        _check_rollout_placement(placement.mode, role_pool, enabled["rollout"])
    if placement.mode in ("split", "standalone") and placement.pools:
        if set(placement.pools) != set(pool_names):
            raise ValueError(
                f"placement.mode={placement.mode} with roles {list(enabled)} uses pools "
                f"{pool_names}, but placement.pools names {list(placement.pools)}")
        spec = {name: placement.pools[name] for name in pool_names}
    elif placement.mode == "custom":
        unused = [n for n in placement.pools if n not in role_pool.values()]
        if unused:
            raise ValueError(f"placement.pools {unused} hold no role; remove them or assign "
                             "roles.<role>.pool")
        spec = dict(placement.pools)
    else:
        spec = _even_sizes(world_size, pool_names, placement.mode)
    pools = {pool.name: pool for pool in _make_pools(spec, world_size, placement.mode)}

    placements = []
    for name, cfg in enabled.items():
        pool = pools[role_pool[name]]
        where = f"roles.{name} on pool '{pool.name}'"
        if name == "rollout":   # a generation layout only: its tp is tg
            tg = rollout_tg(cfg)
            if len(pool) % tg:
                raise ValueError(f"roles.rollout.tg={tg} does not divide the rollout's pool '{pool.name}' of "
                                 f"{len(pool)} ranks (tg ranks per replica): pick tg in "
                                 f"{[d for d in range(1, len(pool) + 1) if len(pool) % d == 0]}")
            dims = ParallelDims.create(len(pool), tp=rollout_tg(cfg), dp=cfg.dp, where=where)
        else:
            dims = ParallelDims.create(len(pool), pp=cfg.pp, tp=cfg.tp, dp=cfg.dp, pg=cfg.pg,
                                       tg=cfg.tg, grouping=cfg.grouping, where=where)
        placements.append(RolePlacement(role=name, pool=pool, dims=dims))
    return PlacementPlan(world_size=world_size, mode=placement.mode,
                         pools=tuple(pools.values()), roles=tuple(placements))


def build_process_groups(plan: PlacementPlan, rank: int,
                         cache: GroupCache | None = None) -> dict[str, RoleGroups]:
    """Create every role's groups on every rank, roles in plan order, axes in AXES order."""
    cache = GroupCache() if cache is None else cache
    return {p.role: build_groups(p.role, p.dims, p.pool.ranks, rank, cache) for p in plan.roles}
