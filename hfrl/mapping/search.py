"""Auto-mapping: HybridFlow's Algorithm 1 (placements x device allocations) and Algorithm 2 (each
role's parallel strategy), searched exactly for the simulator's schedule (hfrl.mapping.simulator).

    for placement in set_partitions(roles):                     # which roles share devices
        minimums = [min_allocation(s) for s in placement]       # fewest devices each set fits on
        for allocation in allocations(N, minimums):             # every split of the N devices
            each set's strategies on its devices                 # memoised per (set, devices)
            simulate the combinations; keep the placement's best
    rank the placements' best mappings (`search` returns them, best first)

Algorithm 2 (`auto_parallel`) gives a role the strategy whose own stages are fastest: training
layout (p, t, d) with t a power of two up to devices per node, p <= layers and d = n / (p t), and
for the actor the generation layout (pg, tg) with pg | p and tg | t. Inside a mapping that is not
quite enough: colocated roles share memory (and the actor's KV cache gets what the others leave), and
a stage's weight depends on the schedule (the critic's forward may be on the critical path while its
update overlaps the actor's). So per (role, devices, free memory) the search keeps every strategy no
other one beats on every stage time and on memory (a Pareto front), combines the colocated roles'
fronts under the memory limit, and lets the simulator judge the combinations. The iteration time
never decreases when a stage gets slower, and a role that holds less memory leaves more to its
neighbours, so a dropped strategy is never in a strictly better mapping: `search` finds what
`brute_force` (every layout of every role, simulated) finds, as the tests check. Two reductions keep
the fronts small, both exact: stages of a set that always run back to back are compared by their
sum (`Planner.blocks`: all colocated, a set's front is its single fastest total), and a generation
is costed under a memory reserve only when a bound does not already rule it out (its time at a
smaller reserve: a reserve only shrinks the KV cache, adding waves).

Allocations are visited depth first, the actor's set first, and a branch is dropped when a lower
bound on every completion is no better than the placement's best so far: a set is busy at least the
sum of its roles' fastest times alone; a set whose stages wait for the generation ends no earlier
than the fastest transition + generation plus that; a set not yet sized gets at best its fastest
time on any device count still open to it. A complete allocation is bounded again by the schedule of
each stage's least time before its sets' fronts are built and their combinations simulated.

Memory rule: a colocated set fits when its roles' `role_memory` (each network's training or
inference memory at its layout, per device) adds up to at most a device's memory; the actor's
generation reserves the others' memory (its KV cache gets the rest).
"""
from __future__ import annotations

import bisect
import itertools
import math
import operator
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

from hfrl.mapping.cost_model import TrainLayout
from hfrl.mapping.simulator import Estimate, Mapping, RolePlan, Workload, _simulate, actor_transition, \
    generation_stage_cost, role_layouts, role_memory, role_plans, schedule, simulate, stage_time


def set_partitions(items: Sequence[str]) -> Iterator[tuple[tuple[str, ...], ...]]:
    """Every partition of `items` into non-empty sets, once each (Bell numbers: 1, 2, 5, 15, 52).

    Canonical order: each set lists its items in input order, sets are ordered by their first item.
    """
    items = list(items)

    def grow(i: int, blocks: list[list[str]]):
        if i == len(items):
            yield tuple(tuple(b) for b in blocks)
            return
        for block in blocks:
            block.append(items[i])
            yield from grow(i + 1, blocks)
            block.pop()
        blocks.append([items[i]])
        yield from grow(i + 1, blocks)
        blocks.pop()

    yield from grow(0, [])


def device_counts(limit: int, device) -> list[int]:
    """Valid device-set sizes up to `limit`: powers of two dividing a node below devices_per_node,
    whole nodes (multiples of devices_per_node) from there."""
    dpn = device.devices_per_node
    small = [2**k for k in range(dpn.bit_length()) if 2**k < dpn and dpn % 2**k == 0]
    return [n for n in small if n <= limit] + list(range(dpn, limit + 1, dpn))


def check_device_count(num_devices: int, device) -> None:
    """ValueError unless `num_devices` is a valid size (see `device_counts`)."""
    dpn = device.devices_per_node
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(f"num_devices={num_devices!r} must be a positive integer")
    if num_devices not in device_counts(num_devices, device):
        small = [n for n in device_counts(dpn, device) if n < dpn]
        raise ValueError(f"num_devices={num_devices} on {device.name} ({dpn} devices per node): expected a "
                         f"multiple of {dpn} ({dpn}, {2 * dpn}, {3 * dpn}, ...) or, within one node, one of {small}")


def allocations(num_devices: int, minimums: Sequence[int], device) -> Iterator[tuple[int, ...]]:
    """Every split of `num_devices` among the sets, each a valid size (device_counts) at least its
    minimum, summing exactly to `num_devices`."""
    sizes = device_counts(num_devices, device)

    def split(i: int, left: int):
        if i == len(minimums) - 1:
            if left >= minimums[i] and left in sizes:
                yield (left,)
            return
        rest = sum(minimums[i + 1:])
        for n in sizes:
            if n > left - rest:
                break
            if n >= minimums[i]:
                yield from ((n,) + tail for tail in split(i + 1, left - n))

    if minimums:
        yield from split(0, num_devices)


@dataclass
class _Option:
    """Strategies for some roles on some devices: their plans, stage times and memory."""

    plans: tuple[RolePlan, ...]
    times: dict[str, float]
    transition_s: float
    memory: int

    @property
    def busy(self) -> float:
        return sum(self.times.values()) + self.transition_s


def _dominates(a: tuple, b: tuple) -> bool:
    """a is at least as good as b on every entry."""
    return all(map(operator.le, a, b))


def _dominated(vec: tuple, front: list[tuple[tuple, "_Option"]]) -> bool:
    """Some front entry is at least as good as vec on every entry (the hottest loop of the search)."""
    first = vec[0]
    for v, _ in front:
        if v[0] <= first and all(map(operator.le, v, vec)):
            return True
    return False


def _pareto(options: list[_Option], key) -> list[_Option]:
    """Options that no other is at least as good as on every entry of key(option)."""
    front: list[tuple[tuple, _Option]] = []
    for o in sorted(options, key=lambda o: (sum(key(o)), key(o))):
        k = key(o)
        if not _dominated(k, front):
            front.append((k, o))
    return [o for _, o in front]


class Planner:
    """One search's memo: each role's and each set's strategy fronts per device count."""

    def __init__(self, workload: Workload, device):
        self.workload, self.device = workload, device
        self.capacity = device.memory_bytes
        self.stages = {r: [s for s in workload.stages if s.role == r] for r in workload.roles}
        self.generating = {r for r in workload.roles if any(s.kind == "generate" for s in self.stages[r])}
        assert len(self.generating) == 1 and "gen" in {s.name for s in workload.stages}, "one generating role"
        after = {"gen"}
        for stage in workload.stages:
            if after.intersection(stage.deps):
                after.add(stage.name)
        self.waiting = {r for r in workload.roles if all(s.name in after for s in self.stages[r])}
        """Roles whose every stage waits (directly or not) for the generation."""
        self._times: dict = {}
        self._steps: dict = {}
        self._memory: dict = {}
        self._transitions: dict = {}
        self._candidates: dict = {}
        self._roles: dict = {}
        self._sets: dict = {}
        self._blocks: dict = {}

    def memory(self, role: str, train: TrainLayout) -> int:
        key = (role, train)
        if key not in self._memory:
            self._memory[key] = role_memory(self.workload, role, train)
        return self._memory[key]

    def time(self, stage, plan: RolePlan, free: int) -> float | None:
        """stage_time, memoised; a generation has `free` bytes per device (the rest is reserved by its
        colocated roles) and is None when it does not fit in them."""
        if stage.kind == "generate":
            return self._generation_time(stage, plan, self.capacity - free)
        key = (stage.name, plan.train)
        if key not in self._times:
            self._times[key] = stage_time(stage, self.workload, plan, self.device)
        return self._times[key]

    def _generation_time(self, stage, plan: RolePlan, reserved: int, bound: bool = False) -> float | None:
        """A generation's time depends on the reserved bytes only through its number of waves (the KV
        cache's capacity sets it; generation_cost balances the waves), and the waves can only grow
        with the reserve. So between two reserves already costed with the same waves the time is
        known: each (stage, layouts) keeps its costed reserves sorted and asks the cost model only
        for a reserve between two that differ. With `bound`, nothing new is costed: the time at the
        largest costed reserve not above this one, a lower bound."""
        key = (stage.name, plan.train, plan.gen)
        if key not in self._steps:  # bracket every reserve that can occur: none, and all but the role's own
            self._steps[key] = ([], [])
            self._generation_time(stage, plan, 0)
            self._generation_time(stage, plan, max(self.capacity - self.memory(plan.role, plan.train), 0))
        reserves, results = self._steps[key]
        i = bisect.bisect_left(reserves, reserved)
        if i < len(reserves) and reserves[i] == reserved:
            return results[i][1]
        if i > 0 and results[i - 1][0] is None:  # no fit with less reserved
            return None
        if bound:
            return results[i - 1][1]
        if 0 < i < len(reserves) and results[i - 1][0] == results[i][0]:
            return results[i][1]
        try:
            cost = generation_stage_cost(stage, self.workload, plan, self.device, reserved_bytes=reserved)
            result = (cost.num_waves, cost.total_s)
        except ValueError:  # nothing fits beside the weights and the reserve
            result = (None, None)
        reserves.insert(i, reserved)
        results.insert(i, result)
        return result[1]

    def busy_lb(self, role: str, num_devices: int) -> float:
        """The role's least busy time on `num_devices` over its plans alone (inf when none fits)."""
        return min((o.busy for o in self.candidates(role, num_devices)), default=math.inf)

    def stage_lb(self, role: str, num_devices: int) -> dict[str, float]:
        """Each stage's least time over the role's plans alone on `num_devices` ("gen" with the
        transition): schedule() of these bounds every mapping's iteration time from below."""
        key = ("lb", role, num_devices)
        if key not in self._candidates:
            options = self.candidates(role, num_devices)
            self._candidates[key] = {s.name: min((o.times[s.name] + (o.transition_s if s.name == "gen" else 0.0)
                                                  for o in options), default=math.inf) for s in self.stages[role]}
        return self._candidates[key]

    def gen_lb(self, num_devices: int) -> float:
        """Fastest transition + generation of the generating role alone on `num_devices`."""
        (role,) = self.generating
        return min((o.times["gen"] + o.transition_s for o in self.candidates(role, num_devices)), default=math.inf)

    def transition(self, plan: RolePlan) -> float:
        key = (plan.train, plan.gen)
        if key not in self._transitions:
            self._transitions[key] = actor_transition(self.workload, plan, self.device)
        return self._transitions[key]

    def candidates(self, role: str, num_devices: int) -> list[_Option]:
        """Every plan of the role on `num_devices` that fits alone, with its memory and stage times; a
        generation's time is the one with nothing reserved beside it (a lower bound: memory reserved
        by colocated roles only shrinks the KV cache, so the generation takes as long or longer)."""
        key = (role, num_devices)
        if key not in self._candidates:
            out = []
            for plan in role_plans(self.workload, role, num_devices, self.device):
                memory = self.memory(role, plan.train)
                if memory > self.capacity:
                    continue
                times = {s.name: self.time(s, plan, self.capacity) for s in self.stages[role]}
                if None not in times.values():
                    transition = self.transition(plan) if role in self.generating else 0.0
                    out.append(_Option((plan,), times, transition, memory))
            self._candidates[key] = out
        return self._candidates[key]

    def blocks(self, members: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """The set's stages cut into blocks whose times only matter as sums (schedule-exact).

        A stage joins the block of the set's previous stage when it waits for nothing outside the
        set (so it starts the moment the previous one ends) and no stage outside the set waits for
        that previous one (only the last of the set's stages an outside stage waits for counts:
        the set finishes its stages in order). The iteration time is then a function of the block
        sums, so comparing strategies on block sums loses nothing. All colocated: one block."""
        if members not in self._blocks:
            inside = [s for s in self.workload.stages if s.role in members]
            order = {s.name: i for i, s in enumerate(inside)}
            exposed = set()
            for u in self.workload.stages:
                if u.role not in members:
                    waited = [d for d in u.deps if d in order]
                    if waited:
                        exposed.add(max(waited, key=order.get))
            blocks: list[list[str]] = []
            for s in inside:
                if blocks and all(d in order for d in s.deps) and blocks[-1][-1] not in exposed:
                    blocks[-1].append(s.name)
                else:
                    blocks.append([s.name])
            self._blocks[members] = tuple(tuple(b) for b in blocks)
        return self._blocks[members]

    def role_front(self, role: str, num_devices: int, free: int, blocks: tuple) -> list[_Option]:
        """The role's plans within `free` bytes per device that no other beats on every block sum of
        `blocks` (its stages, grouped) and on memory, the generation timed with the rest reserved.

        Lazily: plans in order of a bound (the generation at the largest reserve costed so far that is
        not above this one), a plan skipped when its bound is already beaten, and plans that share a
        training layout (they differ only in their generation) skipped together."""
        key = (role, num_devices, free, blocks)
        if key not in self._roles:
            reserved = self.capacity - free if role in self.generating else 0
            groups: dict = {}
            for o in self.candidates(role, num_devices):
                o = self._reserve(o, reserved, bound=True) if o.memory <= free else None
                if o is not None:
                    groups.setdefault(o.plans[0].train, []).append((_block_key(o, blocks) + (o.memory,), o))
            bounded = [(tuple(map(min, *(v for v, _ in g))) if len(g) > 1 else g[0][0], g) for g in groups.values()]
            front: list[tuple[tuple, _Option]] = []
            for bound, group in sorted(bounded, key=lambda b: sum(b[0])):
                if _dominated(bound, front):
                    continue
                for vec, o in sorted(group, key=lambda c: sum(c[0])):
                    if reserved and not _dominated(vec, front):
                        o = self._reserve(o, reserved)
                        vec = None if o is None else _block_key(o, blocks) + (o.memory,)
                    if vec is not None and not _dominated(vec, front):
                        front = [(v, f) for v, f in front if not _dominates(vec, v)] + [(vec, o)]
            self._roles[key] = [o for _, o in front]
        return self._roles[key]

    def _reserve(self, o: _Option, reserved: int, bound: bool = False) -> _Option | None:
        """The option with its generations timed beside `reserved` bytes (None: they do not fit)."""
        if not reserved:
            return o
        gens = {s.name: self._generation_time(s, o.plans[0], reserved, bound)
                for s in self.stages[o.plans[0].role] if s.kind == "generate"}
        return None if None in gens.values() else _Option(o.plans, {**o.times, **gens}, o.transition_s, o.memory)

    def set_front(self, members: tuple[str, ...], num_devices: int) -> list[_Option]:
        """The colocated set's fitting combinations that no other beats on every block sum.

        The roles that do not generate are combined first, keeping the combinations no other beats on
        their block sums and total memory (the generating role only sees that total); the generating
        role's front under each remaining total completes them."""
        key = (members, num_devices)
        if key not in self._sets:
            blocks = self.blocks(members)
            others = [r for r in members if r not in self.generating]
            gens = [r for r in members if r in self.generating]
            assert len(gens) <= 1, "one generating role per dataflow"
            parts, done = [_Option((), {}, 0.0, 0)], set()
            for r in others:
                done |= {s.name for s in self.stages[r]}
                merged = [_merge((p, o)) for p in parts
                          for o in self.role_front(r, num_devices, self.capacity, _restrict(blocks, self.stages[r]))]
                parts = _pareto([m for m in merged if m.memory <= self.capacity],
                                lambda o: _block_key(o, _restrict(blocks, done)) + (o.memory,))
            combos = parts
            if gens:
                mine = _restrict(blocks, self.stages[gens[0]])
                combos = [_merge((part, g)) for part in parts
                          for g in self.role_front(gens[0], num_devices, self.capacity - part.memory, mine)]
            self._sets[key] = _pareto(combos, lambda o: _block_key(o, blocks))
        return self._sets[key]

    def fits(self, members: Sequence[str], num_devices: int) -> bool:
        """Whether the set fits at all: cheap (memory minima, then one fitting generation)."""
        free = self.capacity
        for role in members:
            if role in self.generating:
                continue
            free -= min((self.memory(role, t) for t in role_layouts(self.workload, role, num_devices, self.device)),
                        default=math.inf)
        gens = [r for r in members if r in self.generating]
        if not gens:
            return free >= 0
        for plan in role_plans(self.workload, gens[0], num_devices, self.device):
            if self.memory(gens[0], plan.train) <= free and all(
                    self.time(s, plan, free) is not None for s in self.stages[gens[0]] if s.kind == "generate"):
                return True
        return False


def _block_key(o: _Option, blocks: tuple) -> tuple:
    """The option's time in each block (its stages there), the transition counted with "gen" (it
    always runs right before it, on the same devices)."""
    return tuple(sum(o.times[n] + (o.transition_s if n == "gen" else 0.0) for n in block if n in o.times)
                 for block in blocks)


def _restrict(blocks: tuple, stages) -> tuple:
    """The blocks that hold any of `stages` (stage objects or names)."""
    names = {getattr(s, "name", s) for s in stages}
    return tuple(b for b in blocks if names.intersection(b))


def _merge(parts: Sequence[_Option]) -> _Option:
    times = {k: v for o in parts for k, v in o.times.items()}
    return _Option(tuple(p for o in parts for p in o.plans), times, sum(o.transition_s for o in parts),
                   sum(o.memory for o in parts))


# ---- Algorithm 2 and 1 --------------------------------------------------------------------------
def min_allocation(roles: Sequence[str], workload: Workload, device, *, limit: int = 4096,
                   planner: Planner | None = None) -> int:
    """Fewest devices (a valid size, see `device_counts`) on which the colocated `roles` fit at once.

    Rule: the sum over the roles of their smallest per-device memory over the layouts on n devices
    (role_memory) is at most a device's memory, and the actor, if among them, has a training layout
    within what the others leave and a generation layout whose weights and at least one sequence's
    KV cache fit beside it. ValueError when nothing up to `limit` devices fits.
    """
    roles = tuple(roles)
    unknown = [r for r in roles if r not in workload.roles]
    if unknown or not roles:
        raise ValueError(f"min_allocation: roles {list(roles)} must be a non-empty subset of the {workload.algorithm} "
                         f"roles {list(workload.roles)}")
    planner = planner or Planner(workload, device)
    for n in device_counts(limit, device):
        if planner.fits(roles, n):
            return n
    raise ValueError(f"{{{','.join(roles)}}} fits on no set of up to {limit} {device.name} devices")


def auto_parallel(role: str, spec, num_devices: int, workload: Workload, device, *,
                  planner: Planner | None = None) -> tuple[RolePlan, float]:
    """Algorithm 2: the role's fastest strategy alone on `num_devices` (sum of its stage times, plus
    the transition for the actor) and that cost. Memoised per (role, num_devices) in `planner`.
    ValueError when no layout fits."""
    if spec is not None and workload.models.get(role) != spec:
        workload, planner = replace(workload, models={**workload.models, role: spec}), None
    planner = planner or Planner(workload, device)
    options = planner.role_front(role, num_devices, planner.capacity,
                                 (tuple(s.name for s in planner.stages[role]),))
    if not options:
        raise ValueError(f"role {role!r} ({workload.model(role).name}) fits in no layout on {num_devices} "
                         f"{device.name} devices")
    best = min(options, key=lambda o: o.busy)
    return best.plans[0], best.busy


def search(workload: Workload, num_devices: int, device, *, top_k: int = 10,
           planner: Planner | None = None, time_shared: bool = False) -> list[Estimate]:
    """Algorithm 1: the best mapping of each placement, ranked (best first, at most `top_k`).

    `planner` (optional) carries the memo from an earlier search of the same workload and device
    (it does not depend on num_devices). ValueError: num_devices not a valid size; a role that fits
    on no set of at most num_devices devices (named, with the devices it needs); no placement whose
    sets all fit.

    `time_shared`: the num_devices ranks are CPU processes on `device`'s devices_per_node cores (a
    calibrated CPU profile), more ranks than cores. Each placement's best mapping is searched on
    ``device.oversubscribed(num_devices)``, every rate shared all the time; the placements are then
    ranked, and reported, by ``simulate(..., device, cores=devices_per_node)``, where a rank waiting
    for another set leaves its core to the busy ones: a standalone or split placement gets the cores
    a colocated one must share.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be a positive integer")
    if time_shared and num_devices > device.devices_per_node:
        every_placement = 10 ** 6   # one mapping per placement: Bell(roles) of them, 52 for five roles
        found = search(workload, num_devices, device.oversubscribed(num_devices), top_k=every_placement,
                       planner=planner)
        cores = device.devices_per_node
        ranked = sorted((simulate(workload, e.mapping, device, cores=cores) for e in found), key=lambda e: e.total_s)
        return ranked[:top_k]
    check_device_count(num_devices, device)
    if planner is None or planner.workload != workload or planner.device != device:
        planner = Planner(workload, device)
    sizes = device_counts(num_devices, device)
    for role in workload.roles:
        if not any(planner.fits((role,), n) for n in sizes):
            try:
                need = f"needs {min_allocation((role,), workload, device, planner=planner)}"
            except ValueError:
                need = "needs more than 4096"
            gib = device.memory_bytes / 2**30
            raise ValueError(f"role {role!r} (model {workload.model(role).name}) fits on no set of at most "
                             f"{num_devices} {device.name} devices: it {need} ({gib:.0f} GiB each)")
    found = []
    for placement in set_partitions(workload.roles):
        best = _best_allocation(planner, placement, num_devices)
        if best is not None:
            found.append(best)
    if not found:
        alone = {r: min_allocation((r,), workload, device, planner=planner) for r in workload.roles}
        raise ValueError(f"no mapping of {list(workload.roles)} fits on {num_devices} {device.name} devices: alone "
                         f"the roles need {alone} devices, and no colocation of them fits either; use more devices")
    found.sort(key=lambda f: f[0])
    return [_estimate(workload, device, placement, alloc, option) for _, placement, alloc, option in found[:top_k]]


def _estimate(workload: Workload, device, placement, alloc, option: _Option) -> Estimate:
    """The Estimate of a searched combination, plans in canonical role order (simulate recomputes it)."""
    plans = {p.role: p for p in option.plans}
    return simulate(workload, Mapping(tuple(placement), tuple(alloc), tuple(plans[r] for r in workload.roles)),
                    device)


def _best_allocation(planner: Planner, placement, num_devices: int):
    """(total, placement, allocation, merged option) of the placement's best mapping, or None.

    Depth-first over the sets' sizes, the generating set first. Branches are ordered and pruned by
    the module docstring's bound taken from each role's fastest plan alone (`Planner.candidates`,
    cheap); a complete allocation is bounded again with the sets' exact fronts before its
    combinations are simulated. No bound exceeds the iteration time of any completion, so pruning
    on `bound >= best` never cuts the optimum.
    """
    w = planner.workload
    sets = sorted(placement, key=lambda m: not any(r in planner.generating for r in m))
    k = len(sets)
    sizes = device_counts(num_devices, planner.device)
    mins = []
    for members in sets:
        m = next((n for n in sizes if planner.fits(members, n)), None)
        if m is None:
            return None
        mins.append(m)
    if sum(mins) > num_devices:
        return None
    gen_first = any(r in planner.generating for r in sets[0])
    waits = [i > 0 and gen_first and all(r in planner.waiting for r in m) for i, m in enumerate(sets)]
    set_index = {r: i for i, m in enumerate(sets) for r in m}
    cheap, floors = {}, {}

    def busy_lb(i, n):  # the set's busy time, each role at its fastest plan alone; inf when it does not fit
        if (i, n) not in cheap:
            fits = planner.fits(sets[i], n)
            cheap[i, n] = sum(planner.busy_lb(r, n) for r in sets[i]) if fits else math.inf
        return cheap[i, n]

    def floor(j, cap):
        if (j, cap) not in floors:
            floors[j, cap] = min((busy_lb(j, n) for n in sizes if mins[j] <= n <= cap), default=math.inf)
        return floors[j, cap]

    best = [math.inf, None]

    def evaluate(alloc):
        # bound with each stage's least time alone; then with the exact fronts of the sets that do not
        # generate (cheap) before the generating set's (dear: its generation depends on the others' memory)
        least = {name: t for m, n in zip(sets, alloc) for r in m for name, t in planner.stage_lb(r, n).items()}
        if schedule(w.stages, set_index, least) >= best[0]:
            return
        fronts = [None] * k
        for i in sorted(range(k), key=lambda i: i == 0 and gen_first):
            fronts[i] = planner.set_front(sets[i], alloc[i])
            if not fronts[i]:
                return
            least.update({name: min(o.times[name] + (o.transition_s if name == "gen" else 0.0) for o in fronts[i])
                          for name in fronts[i][0].times})
            if schedule(w.stages, set_index, least) >= best[0]:
                return
        for combo in itertools.product(*fronts):
            option = _merge(combo)
            total = schedule(w.stages, set_index, option.times, option.transition_s)
            if total < best[0]:
                best[:] = [total, (alloc, option)]

    def visit(i, left, alloc, lb, g):
        if i == k - 1:
            candidates = [left] if left in sizes and left >= mins[i] else []
        else:
            candidates = [n for n in sizes if mins[i] <= n <= left - sum(mins[i + 1:])]
        scored = []
        for n in candidates:
            gi = planner.gen_lb(n) if i == 0 and gen_first else g
            bound = max(lb, busy_lb(i, n) + (gi if waits[i] else 0.0))
            for j in range(i + 1, k):  # the sets still to size get at most what the others leave
                cap = left - n - sum(mins[i + 1:]) + mins[j]
                bound = max(bound, floor(j, cap) + (gi if waits[j] else 0.0))
            if bound < math.inf:
                scored.append((bound, n, gi))
        for bound, n, gi in sorted(scored):
            if bound >= best[0]:
                break
            if i == k - 1:
                evaluate(alloc + (n,))
            else:
                visit(i + 1, left - n, alloc + (n,), bound, gi)

    visit(0, num_devices, (), 0.0, 0.0)
    if best[1] is None:
        return None
    alloc, option = best[1]
    by_set = dict(zip(sets, alloc))
    return best[0], placement, tuple(by_set[m] for m in placement), option


def brute_force(workload: Workload, num_devices: int, device, *, placements=None) -> Estimate:
    """The reference for tests (tiny cases only): every placement (or those given) x every allocation
    x every plan of every role, each simulated (`simulate`'s rules, its cost-model calls cached);
    no fronts, no bounds. A combination whose colocated memory exceeds a device is skipped before
    simulating, as simulate would refuse it."""
    check_device_count(num_devices, device)
    cache: dict = {}

    def cached(key, fn, *args, **kwargs):
        if key not in cache:
            try:
                cache[key] = fn(*args, **kwargs)
            except ValueError as err:
                cache[key] = err
        if isinstance(cache[key], ValueError):
            raise cache[key]
        return cache[key]

    def time_fn(stage, wl, plan, on, reserved_bytes=0):
        key = (stage.name, plan.train, plan.gen, reserved_bytes)
        return cached(key, stage_time, stage, wl, plan, on, reserved_bytes=reserved_bytes)

    def memory_fn(wl, role, train):
        return cached((role, train), role_memory, wl, role, train)

    def transition_fn(wl, plan, on):
        return cached((plan.train, plan.gen), actor_transition, wl, plan, on)

    best = None
    for placement in placements or set_partitions(workload.roles):
        for alloc in allocations(num_devices, [1] * len(placement), device):
            n_of = {r: n for m, n in zip(placement, alloc) for r in m}
            choices = [list(role_plans(workload, r, n_of[r], device)) for r in workload.roles]
            for plans in itertools.product(*choices):
                memory = {p.role: memory_fn(workload, p.role, p.train) for p in plans}
                if any(sum(memory[r] for r in m) > device.memory_bytes for m in placement):
                    continue
                try:
                    est = _simulate(workload, Mapping(placement, alloc, plans), device, time_fn, memory_fn,
                                    transition_fn)
                except ValueError:  # the actor cannot generate beside its colocated roles
                    continue
                if best is None or est.total_s < best.total_s:
                    best = est
    if best is None:
        raise ValueError(f"no mapping of {list(workload.roles)} fits on {num_devices} {device.name} devices")
    return best
