"""Parallel layouts of one role and the process groups they need.

A role (actor, critic, ...) lives on a resource pool of `pp * tp * dp` ranks and trains with the
layout `(pp, tp, dp)`. The actor also generates, with the smaller model-parallel layout `(pg, tg)`
and `dg = pp*tp / (pg*tg)` generation replicas ("micro-DP groups") inside each training replica
(HybridFlow §5.3).

Ranks are numbered by their position `i` in the pool, Megatron order (tp fastest, then dp, pp):

    i = (pp_rank * dp + dp_rank) * tp + tp_rank

The generation layout splits each training axis into a generation axis and a micro factor,
`tp = tg * st` and `pp = pg * sp`. With the zero-redundancy ("hybridflow") grouping, generation TP
groups take ranks at stride `st` and micro-DP groups the consecutive ones:

    t = 4, tg = 2:  training TP [0 1 2 3]  ->  generation TP [0 2] [1 3],  micro-DP [0 1] [2 3]

so the generation shard of rank i (the weights of its micro-DP group) contains its own training
shard: switching layouts is one all-gather per micro-DP group, and no weight is stored twice.
The "vanilla" grouping (HybridFlow-V) swaps the two: generation TP [0 1] [2 3], micro-DP [0 2] [1 3].

Everything here up to `build_groups` is pure arithmetic, so a 1024-rank plan can be checked on a
laptop; `build_groups` is the only function that touches torch.distributed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

GROUPINGS = ("hybridflow", "vanilla")

# Every axis a role may need, in the fixed order its groups are created on every rank.
AXES = ("tp", "pp", "dp", "mp", "gen_tp", "gen_pp", "micro_dp", "gen_mp", "role")
AXIS_DOCS = {
    "tp": "training tensor parallel",
    "pp": "training pipeline parallel",
    "dp": "training data parallel (same model shard, different data)",
    "mp": "training model parallel: one training replica (pp x tp)",
    "gen_tp": "generation tensor parallel",
    "gen_pp": "generation pipeline parallel",
    "micro_dp": "micro-DP: ranks whose training shards form one generation shard (the all-gather)",
    "gen_mp": "generation model parallel: one generation replica (pg x tg)",
    "role": "every rank of the role (the DeepSpeed-Chat-style resharding gathers over it)",
}


@dataclass(frozen=True)
class Coord:
    """Coordinates of one pool position in the training and generation layouts."""

    pp: int
    dp: int
    tp: int
    gen_pp: int
    gen_tp: int
    micro: int
    """Index of the generation replica inside the training replica, in [0, dg)."""

    def gen_replica(self, dg: int) -> int:
        """Global generation replica index in [0, dp * dg)."""
        return self.dp * dg + self.micro


@dataclass(frozen=True)
class ParallelDims:
    """One role's training layout (pp, tp, dp) and generation layout (pg, tg).

    Build with `ParallelDims.create`, which infers `dp` from the pool size and validates. The
    constructor itself validates too, so an invalid object cannot exist.
    """

    pp: int = 1
    tp: int = 1
    dp: int = 1
    pg: int = 1
    tg: int = 1
    grouping: str = "hybridflow"

    def __post_init__(self) -> None:
        for name in ("pp", "tp", "dp", "pg", "tg"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"grouping={self.grouping!r}: expected one of {GROUPINGS}")
        if self.tp % self.tg or self.pp % self.pg:
            choices = ", ".join(f"(pg={pg}, tg={tg})" for pg in _divisors(self.pp) for tg in _divisors(self.tp))
            which = (f"generation tensor parallel tg={self.tg} must divide training tp={self.tp}"
                     if self.tp % self.tg else
                     f"generation pipeline parallel pg={self.pg} must divide training pp={self.pp}")
            raise ValueError(
                f"{which} (each generation shard is a union of training shards); pick tg in "
                f"{_divisors(self.tp)} and pg in {_divisors(self.pp)}: for training pp={self.pp}, "
                f"tp={self.tp} the valid generation layouts are {choices}")

    @classmethod
    def create(cls, num_ranks: int, *, pp: int = 1, tp: int = 1, dp: int = -1,
               pg: int | None = None, tg: int | None = None, grouping: str = "hybridflow",
               where: str = "") -> "ParallelDims":
        """Validate degrees against a pool of `num_ranks`; dp=-1 means "the rest of the pool".

        pg/tg default to pp/tp (generate in the training layout, no resharding).
        """
        prefix = f"{where}: " if where else ""
        try:
            for name, value in (("pp", pp), ("tp", tp)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name}={value!r} must be a positive integer")
            if dp == -1:
                if num_ranks % (pp * tp):
                    raise ValueError(
                        f"pp={pp} x tp={tp} = {pp * tp} does not divide the pool of {num_ranks} "
                        f"ranks, so dp cannot be inferred; make pp*tp a divisor of {num_ranks}")
                dp = num_ranks // (pp * tp)
            elif pp * tp * dp != num_ranks:
                raise ValueError(
                    f"pp={pp} x tp={tp} x dp={dp} = {pp * tp * dp} but the pool has {num_ranks} "
                    f"ranks; set dp=-1 to infer it or change the degrees to multiply to "
                    f"{num_ranks}")
            return cls(pp=pp, tp=tp, dp=dp, pg=pp if pg is None else pg,
                       tg=tp if tg is None else tg, grouping=grouping)
        except ValueError as err:
            raise ValueError(prefix + str(err)) from None

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def dg(self) -> int:
        """Generation replicas per training replica (size of a micro-DP group)."""
        return (self.pp * self.tp) // (self.pg * self.tg)

    @property
    def num_gen_replicas(self) -> int:
        return self.dp * self.dg

    def check_model(self, num_heads: int, num_kv_heads: int, where: str = "") -> None:
        """Once the model is known: every TP degree must split the attention heads evenly."""
        prefix = f"{where}: " if where else ""
        for name, degree in (("tp", self.tp), ("tg", self.tg)):
            if num_heads % degree:
                raise ValueError(f"{prefix}{name}={degree} does not divide the model's "
                                 f"{num_heads} attention heads; pick {name} in "
                                 f"{_divisors(num_heads)}")
            if num_kv_heads % degree and degree % num_kv_heads:
                raise ValueError(
                    f"{prefix}{name}={degree} and the model's {num_kv_heads} key/value heads: "
                    f"one must divide the other (kv heads are split, or replicated, over TP)")

    # ---- coordinates ---------------------------------------------------------------------
    def coord(self, index: int) -> Coord:
        """Coordinates of pool position `index`."""
        if not 0 <= index < self.world_size:
            raise IndexError(f"pool position {index} outside [0, {self.world_size})")
        tp_rank = index % self.tp
        dp_rank = (index // self.tp) % self.dp
        pp_rank = index // (self.tp * self.dp)
        st, sp = self.tp // self.tg, self.pp // self.pg
        if self.grouping == "hybridflow":
            gen_tp, micro_t = divmod(tp_rank, st)
            gen_pp, micro_p = divmod(pp_rank, sp)
        else:
            micro_t, gen_tp = divmod(tp_rank, self.tg)
            micro_p, gen_pp = divmod(pp_rank, self.pg)
        return Coord(pp=pp_rank, dp=dp_rank, tp=tp_rank, gen_pp=gen_pp, gen_tp=gen_tp,
                     micro=micro_p * st + micro_t)

    def groups(self, axis: str, ranks: tuple[int, ...] | None = None) -> list[list[int]]:
        """All groups of `axis` as lists of pool positions, ordered by their first member; with
        `ranks` (the pool's global ranks), as lists of global ranks.

        A group is the positions whose coordinates agree on every other axis: a tp group shares
        (pp, dp); pp (dp, tp); dp (pp, tp); mp (dp); gen_tp (dp, micro, gen_pp); gen_pp (dp,
        micro, gen_tp); micro_dp (dp, gen_pp, gen_tp); gen_mp (dp, micro); role: the whole pool. Members are in
        group-rank order (tp by tp, mp by (pp, tp), micro_dp by micro, gen_mp by (gen_pp, gen_tp),
        ...), which is also ascending position order. Arithmetic, linear in the pool size and
        cached per layout, so a 100k-rank plan takes a fraction of a second.
        """
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; expected one of {AXES}")
        if ranks is None:
            return [list(g) for g in _axis_groups(self, axis)]
        return [[ranks[i] for i in g] for g in _axis_groups(self, axis)]

    def group_of(self, axis: str, index: int) -> list[int]:
        """The pool positions of `axis`'s group holding position `index`, in group-rank order."""
        if not 0 <= index < self.world_size:
            raise ValueError(f"position {index} is outside the pool of {self.world_size}")
        factors = self._factors()
        base = index - sum((index // stride) % size * stride
                           for name, (size, stride) in factors.items()
                           if name in _AXIS_MEMBER_FACTORS[axis])
        return [base + o for o in _axis_offsets(self, axis)]

    def _factors(self) -> dict[str, tuple[int, int]]:
        """The pool index as a mixed-radix number: factor -> (size, stride).

        With tp = tg * st and pp = pg * sp, a position is
        hybridflow: i = (((gen_pp*sp + micro_p)*dp + dp_rank)*tg + gen_tp)*st + micro_t
        vanilla:    i = (((micro_p*pg + gen_pp)*dp + dp_rank)*st + micro_t)*tg + gen_tp
        (the same decomposition `coord` does with divmod).
        """
        st, sp = self.tp // self.tg, self.pp // self.pg
        if self.grouping == "hybridflow":
            order = (("micro_t", st), ("gen_tp", self.tg), ("dp", self.dp), ("micro_p", sp),
                     ("gen_pp", self.pg))
        else:
            order = (("gen_tp", self.tg), ("micro_t", st), ("dp", self.dp), ("gen_pp", self.pg),
                     ("micro_p", sp))
        factors, stride = {}, 1
        for name, size in order:
            factors[name] = (size, stride)
            stride *= size
        return factors

    def all_groups(self) -> dict[str, list[list[int]]]:
        return {axis: self.groups(axis) for axis in AXES}

    def to_dict(self) -> dict[str, Any]:
        return {"pp": self.pp, "tp": self.tp, "dp": self.dp, "pg": self.pg, "tg": self.tg,
                "dg": self.dg, "grouping": self.grouping}

    def describe(self) -> str:
        return (f"train pp={self.pp} tp={self.tp} dp={self.dp} | generate pg={self.pg} "
                f"tg={self.tg} dg={self.dg} ({self.grouping})")


# The factors (see ParallelDims._factors) that vary inside one group of each axis; the others
# are fixed by the group (the shared coordinates listed in ParallelDims.groups).
_AXIS_MEMBER_FACTORS = {
    "tp": ("gen_tp", "micro_t"),
    "pp": ("gen_pp", "micro_p"),
    "dp": ("dp",),
    "mp": ("gen_pp", "micro_p", "gen_tp", "micro_t"),
    "gen_tp": ("gen_tp",),
    "gen_pp": ("gen_pp",),
    "micro_dp": ("micro_p", "micro_t"),
    "gen_mp": ("gen_pp", "gen_tp"),
    "role": ("micro_t", "gen_tp", "dp", "micro_p", "gen_pp"),
}


def _offsets(factors: list[tuple[int, int]]) -> list[int]:
    """Every sum of value * stride over the factors, ascending."""
    sums = [0]
    for size, stride in factors:
        sums = [s + v * stride for v in range(size) for s in sums]
    return sorted(sums)


@functools.lru_cache(maxsize=64)
def _axis_offsets(dims: ParallelDims, axis: str) -> tuple[int, ...]:
    """Positions of one group of `axis` relative to its first member, in group-rank order."""
    factors = dims._factors()
    return tuple(_offsets([factors[f] for f in _AXIS_MEMBER_FACTORS[axis]]))


@functools.lru_cache(maxsize=64)
def _axis_groups(dims: ParallelDims, axis: str) -> tuple[tuple[int, ...], ...]:
    # A group is base + offsets: the offsets span the member factors, the bases the others. Every
    # factor's stride exceeds the largest value of the factors inside it, so ascending offsets are
    # the members' group-rank order and ascending bases order the groups by first member.
    factors = dims._factors()
    offsets = _axis_offsets(dims, axis)
    bases = _offsets([v for f, v in factors.items() if f not in _AXIS_MEMBER_FACTORS[axis]])
    if len(offsets) == 1:
        return tuple((b,) for b in bases)
    return tuple(tuple([b + o for o in offsets]) for b in bases)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class RoleGroups:
    """This rank's view of one role's layout: its coordinates and its process group per axis.

    `groups[axis]` is the torch.distributed group this rank belongs to (None if the rank is not in
    the role's pool); `ranks[axis]` the global ranks of that group in group-rank order.
    """

    role: str
    dims: ParallelDims
    pool_ranks: tuple[int, ...]
    coord: Coord | None
    groups: dict[str, Any]
    ranks: dict[str, tuple[int, ...]]

    @property
    def is_member(self) -> bool:
        return self.coord is not None


class GroupCache:
    """Creates each distinct rank set's process group once, in call order.

    torch.distributed.new_group is collective over the whole world: every rank must call it for
    every group, in the same order, whether or not it is a member. Pass the job's collective
    `timeout`: new_group does not inherit init_process_group's, it defaults to 30 minutes. Identical rank sets (for example
    the TP groups of colocated actor and reference) share one group.
    """

    def __init__(self, backend: str | None = None, timeout=None):
        self.backend = backend
        self.timeout = timeout
        self._groups: dict[tuple[int, ...], Any] = {}
        self._partitions: set[tuple] = set()

    def get(self, ranks: tuple[int, ...]):
        if ranks not in self._groups:
            import torch.distributed as dist

            kwargs = {"backend": self.backend} if self.backend else {}
            if self.timeout is not None:
                kwargs["timeout"] = self.timeout
            self._groups[ranks] = dist.new_group(ranks=list(ranks), **kwargs)
        return self._groups[ranks]

    def adopt(self, ranks: tuple[int, ...], group) -> None:
        """Use an existing process group for `ranks` instead of creating one (a Megatron job's
        groups, hfrl.integrations.megatron). Like `get`, every rank must adopt the same rank sets
        in the same order: members pass their group, the others `GroupMember.NON_GROUP_MEMBER`
        (what new_group returns them), so later every rank skips the same new_group calls."""
        ranks = tuple(ranks)
        if ranks in self._groups:
            raise ValueError(f"ranks {list(ranks)} already have a process group; adopt a group "
                             "before any group over the same ranks is created")
        self._groups[ranks] = group

    def create_partition(self, pool_ranks: tuple[int, ...],
                         groups: tuple[tuple[int, ...], ...]) -> None:
        """`get` every group of a partition of the pool (groups of pool positions), in order.

        A partition seen before is skipped whole, since all its groups exist: colocated roles
        with one layout, and axes of size 1, then cost one hash instead of a pass over the pool.
        """
        key = (pool_ranks, groups)
        if key in self._partitions:
            return
        self._partitions.add(key)
        for positions in groups:
            self.get(tuple([pool_ranks[p] for p in positions]))

    def __len__(self) -> int:
        return len(self._groups)


def build_groups(role: str, dims: ParallelDims, pool_ranks: tuple[int, ...], rank: int,
                 cache: GroupCache) -> RoleGroups:
    """Create every process group of one role (on every rank of the world, in AXES order)."""
    pool_ranks = tuple(pool_ranks)
    if len(pool_ranks) != dims.world_size:
        raise ValueError(f"{role}: layout {dims.describe()} needs {dims.world_size} ranks, "
                         f"the pool has {len(pool_ranks)}")
    position = pool_ranks.index(rank) if rank in pool_ranks else None
    groups, ranks = {}, {}
    for axis in AXES:
        cache.create_partition(pool_ranks, _axis_groups(dims, axis))
        if position is not None:
            members = tuple(pool_ranks[p] for p in dims.group_of(axis, position))
            groups[axis], ranks[axis] = cache.get(members), members
    coord = dims.coord(position) if position is not None else None
    return RoleGroups(role=role, dims=dims, pool_ranks=pool_ranks, coord=coord,
                      groups=groups, ranks=ranks)
