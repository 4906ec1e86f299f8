"""One RL iteration's predicted time under a mapping: the dataflow's stages on their device sets.

A mapping places every role (actor, ref, critic, reward, cost) on one of a few disjoint device sets
("colocated sets"), gives each set its number of devices, and each role its training layout
(pp, tp, dp) on its set (forward-only roles run forward passes in it) and, for the actor, the
generation layout (pg, tg). The dataflow of each algorithm is a list of stages in the order hfrl's
trainer issues them (hfrl.trainers):

    ppo        gen -> reward, old_log_prob, ref, values -> adv -> update_critic, update_actor
    remax      gen, gen_greedy -> reward (both batches), old_log_prob, ref -> adv -> update_actor
    safe_rlhf  ppo + cost, cost_values (before adv) and update_cost_critic (after update_critic)
    grpo       gen (n per prompt) -> reward, old_log_prob, ref -> adv -> update_actor

"adv" is the actor's compute_advantages call: elementwise work over the batch's tokens, which
costs a stage call and little else. Every stage pays the device's `call_overhead_s` once (rank 0
dispatching it and collecting its result).

Safe-RLHF's cost critic is not a placement role: hfrl runs it on the critic's pool with the critic's
layout (hfrl.trainers.safe_rlhf), so its two stages belong to role "critic" and run the model
"cost_critic" (by default the cost model's shape with a value head, as hfrl initialises it); the
critic's devices then hold both value models.

Schedule (`schedule`): stages are taken in dataflow order; each starts when its set's devices are
free and every stage it depends on has finished, and holds its set until it ends:

    start = max(free[set], finish[dep] for dep in deps);  finish = start + time;  free[set] = finish

so the stages of colocated roles run one after another (their times add) and sets that share no
role run side by side (the iteration takes the longer path). The actor's train -> generate weight
transition (3D-HybridEngine, `transition_time`) occupies the actor's set right before "gen";
switching back to training costs nothing (the generation buffer is dropped). The iteration's time
is the last stage's finish. This is hfrl's controller: calls on one pool run in issue order, calls
on different pools overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

from hfrl.mapping import cost_model
from hfrl.mapping.cost_model import GenerationCost, GenLayout, TrainLayout, forward_time, generation_cost, \
    inference_memory, train_memory, train_time, transition_time
from hfrl.mapping.models import ModelSpec

KINDS = ("generate", "forward", "train", "advantage")
ADVANTAGE_BYTES_PER_TOKEN = 64
"""Memory traffic of the advantage stage per token: a few fp32 columns read (rewards, values,
log-probs, masks) and written (advantages, returns), with temporaries."""
ROLE_ORDER = ("actor", "ref", "critic", "reward", "cost")
"""Canonical role order (placements, plans and descriptions list roles in it)."""


@dataclass(frozen=True)
class Stage:
    """One call of the dataflow: which role's devices run it, what kind of pass, after what."""

    name: str
    """verl-style stage name (metrics' timing_s/<name>)."""
    role: str
    """The placement role whose devices and layout run the stage."""
    kind: str
    """"generate", "forward", "train" or "advantage"."""
    deps: tuple[str, ...] = ()
    """Stages whose output this one reads."""
    model: str = ""
    """The network it runs when not the role's own (Safe-RLHF's cost critic on the critic's devices)."""
    batch: int = 1
    """Sequences processed, in units of num_prompts * n (ReMax's reward scores two batches)."""

    @property
    def model_name(self) -> str:
        return self.model or self.role


_PREP = ("reward", "old_log_prob", "ref")


def _adv(after) -> Stage:
    return Stage("adv", "actor", "advantage", tuple(after))


def _ppo(extra_prep: tuple[Stage, ...] = (), extra_updates: tuple[Stage, ...] = ()) -> list[Stage]:
    prep = [Stage("reward", "reward", "forward", ("gen",)), *extra_prep[:1],
            Stage("old_log_prob", "actor", "forward", ("gen",)), Stage("ref", "ref", "forward", ("gen",)),
            Stage("values", "critic", "forward", ("gen",)), *extra_prep[1:]]
    return [Stage("gen", "actor", "generate"), *prep, _adv(s.name for s in prep),
            Stage("update_critic", "critic", "train", ("adv",)),
            *(Stage(s.name, s.role, s.kind, ("adv",), s.model) for s in extra_updates),
            Stage("update_actor", "actor", "train", ("adv",))]


DATAFLOWS: dict[str, list[Stage]] = {
    "ppo": _ppo(),
    "safe_rlhf": _ppo(extra_prep=(Stage("cost", "cost", "forward", ("gen",)),
                                  Stage("cost_values", "critic", "forward", ("gen",), model="cost_critic")),
                      extra_updates=(Stage("update_cost_critic", "critic", "train", model="cost_critic"),)),
    "remax": [Stage("gen", "actor", "generate"), Stage("gen_greedy", "actor", "generate"),
              Stage("reward", "reward", "forward", ("gen", "gen_greedy"), batch=2),
              Stage("old_log_prob", "actor", "forward", ("gen",)), Stage("ref", "ref", "forward", ("gen",)),
              _adv(_PREP), Stage("update_actor", "actor", "train", ("adv",))],
    "grpo": [Stage("gen", "actor", "generate"), Stage("reward", "reward", "forward", ("gen",)),
             Stage("old_log_prob", "actor", "forward", ("gen",)), Stage("ref", "ref", "forward", ("gen",)),
             _adv(_PREP), Stage("update_actor", "actor", "train", ("adv",))],
}
"""Each algorithm's stages in the order hfrl's trainer issues them (see the module docstring)."""

VALUE_MODELS = ("critic", "reward", "cost", "cost_critic")


@dataclass(frozen=True)
class Workload:
    """What one iteration processes: the algorithm, each model's shape and the batch."""

    algorithm: str
    models: dict[str, ModelSpec] = field(hash=False)
    """Model of each role (and "cost_critic" for Safe-RLHF, defaulting to the cost model's shape);
    value roles (critic, reward, cost) should be value models (ModelSpec.as_value_model())."""
    prompt_len: int = 1024
    response_len: int = 1024
    num_prompts: int = 1024
    n: int = 1
    """Responses per prompt (GRPO's group size)."""
    mini_batch_size: int | None = None
    """Prompts per optimizer step (algorithm.mini_batch_size); None: the whole batch, one step."""
    ppo_epochs: int = 1
    """Passes over the batch per update (algorithm.ppo_epochs)."""
    micro_batches: int | None = None
    """Micro-batches per replica of each pass (engine.num_micro_batches; hfrl's default is 1);
    None: the cost model's pipeline default (min(4 pp, sequences per replica))."""

    def __post_init__(self):
        if self.algorithm not in DATAFLOWS:
            raise ValueError(f"algorithm={self.algorithm!r}: expected one of {sorted(DATAFLOWS)}")
        for name in ("prompt_len", "response_len", "num_prompts", "n", "ppo_epochs", "mini_batch_size",
                     "micro_batches"):
            value = getattr(self, name)
            if (value is not None or name not in ("mini_batch_size", "micro_batches")) and (
                    not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.mini_batch_size is not None and self.num_prompts % self.mini_batch_size:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} must divide num_prompts={self.num_prompts}")
        missing = [r for r in self.roles if r not in self.models]
        if missing:
            raise ValueError(f"{self.algorithm} needs a model for roles {missing}; got models for "
                             f"{sorted(self.models)}")

    @classmethod
    def paper(cls, algorithm: str, actor_size: str, critic_size: str | None = None, **kwargs) -> "Workload":
        """The HybridFlow paper's setup (§8.1): actor and reference of `actor_size`, critic, reward and
        cost models of `critic_size` (default: the same), prompt 1024 + response 1024, 1024 prompts."""
        actor = ModelSpec.from_name(actor_size)
        value = ModelSpec.from_name(critic_size or actor_size).as_value_model()
        roles = {s.model_name for s in DATAFLOWS.get(algorithm, [])} | {s.role for s in DATAFLOWS.get(algorithm, [])}
        models = {r: (actor if r in ("actor", "ref") else value) for r in roles}
        return cls(algorithm, models, **kwargs)

    @property
    def stages(self) -> list[Stage]:
        return DATAFLOWS[self.algorithm]

    @property
    def roles(self) -> tuple[str, ...]:
        """The placement roles, in canonical order."""
        used = {s.role for s in self.stages}
        return tuple(r for r in ROLE_ORDER if r in used) + tuple(sorted(used - set(ROLE_ORDER)))

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps of one update: epochs x mini-batches."""
        return self.ppo_epochs * (self.num_prompts // (self.mini_batch_size or self.num_prompts))

    def model(self, name: str) -> ModelSpec:
        """The spec of a role or stage model; the cost critic defaults to the cost model's shape."""
        if name == "cost_critic" and name not in self.models:
            return self.models["cost"].as_value_model()
        return self.models[name]

    def role_models(self, role: str) -> list[tuple[ModelSpec, bool]]:
        """The networks the role's devices hold, each with whether it is trained."""
        names = dict.fromkeys(s.model_name for s in self.stages if s.role == role)
        return [(self.model(m), any(s.kind == "train" and s.model_name == m for s in self.stages)) for m in names]


@dataclass(frozen=True)
class RolePlan:
    """One role's devices and layouts."""

    role: str
    num_devices: int
    train: TrainLayout
    """Training layout; forward-only roles run their forward passes in it."""
    gen: GenLayout | None = None
    """Generation layout (the actor only)."""

    def describe(self) -> str:
        text = f"{self.role} p{self.train.pp}t{self.train.tp}d{self.train.dp}"
        return text + (f" gen pg{self.gen.pg}tg{self.gen.tg}" if self.gen is not None else "")


@dataclass(frozen=True)
class Mapping:
    """Colocated sets (canonical order), devices per set, and each role's plan."""

    placement: tuple[tuple[str, ...], ...]
    allocation: tuple[int, ...]
    plans: tuple[RolePlan, ...]

    def __post_init__(self):
        if len(self.placement) != len(self.allocation):
            raise ValueError(f"placement {self.placement} has {len(self.placement)} sets but allocation "
                             f"{self.allocation} has {len(self.allocation)} device counts")
        placed = [r for members in self.placement for r in members]
        planned = [p.role for p in self.plans]
        if sorted(placed) != sorted(planned) or len(set(placed)) != len(placed):
            raise ValueError(f"placement {self.placement} must name every planned role {planned} exactly once")
        for p in self.plans:
            n = self.allocation[self.set_of(p.role)]
            if p.num_devices != n or p.train.num_devices != n:
                raise ValueError(f"role {p.role!r}: plan for {p.num_devices} devices with layout pp={p.train.pp} "
                                 f"tp={p.train.tp} dp={p.train.dp}, but its set has {n} devices")
            if p.gen is not None and (p.train.pp % p.gen.pg or p.train.tp % p.gen.tg):
                raise ValueError(f"role {p.role!r}: generation pg={p.gen.pg} tg={p.gen.tg} must divide "
                                 f"pp={p.train.pp} and tp={p.train.tp}")

    def set_of(self, role: str) -> int:
        for i, members in enumerate(self.placement):
            if role in members:
                return i
        raise KeyError(f"role {role!r} is not placed; placement {self.placement}")

    def plan(self, role: str) -> RolePlan:
        for p in self.plans:
            if p.role == role:
                return p
        raise KeyError(f"no plan for role {role!r}")

    def describe(self) -> str:
        """One line: "{actor,ref}x8 | {critic,reward}x8: actor p1t4d2 gen pg1tg2, ref p1t1d8, ..."."""
        sets = " | ".join("{" + ",".join(m) + f"}}x{n}" for m, n in zip(self.placement, self.allocation))
        return sets + ": " + ", ".join(p.describe() for p in self.plans)


@dataclass
class Estimate:
    """The predicted iteration: total, each stage's own time, the actor's transition, the mapping."""

    total_s: float
    stages: dict[str, float]
    transition_s: float
    mapping: Mapping


def role_layouts(workload: Workload, role: str, num_devices: int, device) -> list[TrainLayout]:
    """Algorithm 2's training layouts for the role on `num_devices` (cost_model.train_layouts: tp a
    power of two up to devices per node splitting the heads, pp <= layers dividing the rest,
    dp = n / (pp tp)), valid for every network the role's devices hold."""
    first, *rest = [spec for spec, _ in workload.role_models(role)]
    layouts = cost_model.train_layouts(first, num_devices, device)
    return [t for t in layouts if all(t in cost_model.train_layouts(s, num_devices, device) for s in rest)]


GEN_MAX_PG = 1
"""hfrl's rollout engine generates in one pipeline stage (hfrl.rollout.engine refuses gen_pp > 1),
so the plans `hfrl plan` writes keep pg = 1; the cost model itself prices any pg."""


def role_plans(workload: Workload, role: str, num_devices: int, device) -> Iterator[RolePlan]:
    """Every plan of the role on `num_devices`, fitting or not; a generating role gets every
    (pg, tg) inside each training layout that hfrl can run (tg | tp, pg = 1: cost_model.gen_layouts,
    GEN_MAX_PG)."""
    generates = any(s.kind == "generate" for s in workload.stages if s.role == role)
    for train in role_layouts(workload, role, num_devices, device):
        if generates:
            for gen in cost_model.gen_layouts(workload.model(role), train):
                if gen.pg <= GEN_MAX_PG:
                    yield RolePlan(role, num_devices, train, gen)
        else:
            yield RolePlan(role, num_devices, train)


def role_memory(workload: Workload, role: str, layout: TrainLayout) -> int:
    """Bytes per device the role keeps on its devices: every network it holds, trained ones with their
    training state at the iteration's sequence length (train_memory), the others for inference."""
    return sum(train_memory(spec, layout, seq_len=workload.seq_len) if trained else inference_memory(spec, layout)
               for spec, trained in workload.role_models(role))


def stage_time(stage: Stage, workload: Workload, plan: RolePlan, device, *, reserved_bytes: int = 0) -> float:
    """Seconds the stage takes on its role's devices in the plan's layouts (the cost model).

    `reserved_bytes`: per-device memory the colocated roles hold while the actor generates (their
    role_memory; the KV cache gets what is left). ValueError when a generation does not fit.
    Every stage adds the device's call_overhead_s."""
    call = device.call_overhead_s
    if stage.kind == "generate":
        return call + generation_stage_cost(stage, workload, plan, device, reserved_bytes=reserved_bytes).total_s
    spec = workload.model(stage.model_name)
    num_seqs = workload.num_prompts * workload.n * stage.batch
    steps = workload.optimizer_steps if stage.kind == "train" else 1
    per_replica = math.ceil(num_seqs / steps / plan.train.dp)
    micro = None if workload.micro_batches is None else min(workload.micro_batches, per_replica)
    if stage.kind == "advantage":
        tokens = num_seqs * workload.seq_len / plan.num_devices
        return call + tokens * ADVANTAGE_BYTES_PER_TOKEN / (device.mem_bandwidth * device.bandwidth_efficiency)
    if stage.kind == "forward":
        return call + forward_time(spec, plan.train, device, num_seqs=num_seqs, seq_len=workload.seq_len,
                                   num_micro_batches=micro)
    if stage.kind == "train":
        return call + train_time(spec, plan.train, device, num_seqs=num_seqs, seq_len=workload.seq_len,
                                 num_micro_batches=micro, optimizer_steps=steps)
    raise ValueError(f"stage {stage.name!r}: kind={stage.kind!r}, expected one of {KINDS}")


def generation_stage_cost(stage: Stage, workload: Workload, plan: RolePlan, device, *,
                          reserved_bytes: int = 0) -> GenerationCost:
    """The cost model's breakdown of a generation stage (stage_time's value is its total_s)."""
    if plan.gen is None:
        raise ValueError(f"stage {stage.name!r} generates but role {plan.role!r} has no generation layout")
    return generation_cost(workload.model(stage.model_name), plan.train, plan.gen, device,
                           num_seqs=workload.num_prompts * workload.n * stage.batch, prompt_len=workload.prompt_len,
                           response_len=workload.response_len, reserved_bytes=reserved_bytes)


def actor_transition(workload: Workload, plan: RolePlan, device) -> float:
    """The actor's train -> generate resharding before its first generation (0 without one)."""
    if plan.gen is None:
        return 0.0
    return transition_time(workload.model(plan.role), plan.train, plan.gen, device)


def intervals(stages: list[Stage], set_of: dict[str, int], times: dict[str, float],
              transition_s: float = 0.0) -> dict[str, tuple[float, float]]:
    """Each stage's (start, finish) under the module docstring's rule (pure: no cost model); "gen"
    starts after the transition, which holds the actor's set right before it."""
    free: dict[int, float] = {}
    spans: dict[str, tuple[float, float]] = {}
    for stage in stages:
        s = set_of[stage.role]
        start = max([free.get(s, 0.0)] + [spans[d][1] for d in stage.deps])
        if stage.name == "gen":
            start += transition_s
        spans[stage.name] = (start, start + times[stage.name])
        free[s] = spans[stage.name][1]
    return spans


def schedule(stages: list[Stage], set_of: dict[str, int], times: dict[str, float],
             transition_s: float = 0.0) -> float:
    """The iteration's finish time under the module docstring's rule (pure: no cost model)."""
    return max(end for _, end in intervals(stages, set_of, times, transition_s).values())


def time_shared(stages: list[Stage], set_of: dict[str, int], set_sizes: list[int], times: dict[str, float],
                cores: int, transition_s: float = 0.0, rounds: int = 4) -> dict[str, float]:
    """Stage times when the sets' ranks time-share `cores` cores (CPU ranks outnumbering cores).

    A stage's time grows by the mean, over its span, of max(1, busy ranks / cores), where busy ranks
    are those of every set running a stage at that moment (a waiting rank blocks and leaves its core
    to others). The spans depend on the times, so schedule and slowdowns are iterated `rounds` times
    from the unshared times. Without oversubscription (sum(set_sizes) <= cores) the times are
    returned as given."""
    if sum(set_sizes) <= cores:
        return dict(times)
    scaled = dict(times)
    for _ in range(rounds):
        spans = intervals(stages, set_of, scaled, transition_s)
        busy = sorted({t for span in spans.values() for t in span})
        new = {}
        for stage in stages:
            start, end = spans[stage.name]
            if end <= start:
                new[stage.name] = times[stage.name]
                continue
            weighted = 0.0
            cuts = [start] + [t for t in busy if start < t < end] + [end]
            for a, b in zip(cuts, cuts[1:]):
                mid = (a + b) / 2
                running = {set_of[o.role] for o in stages if spans[o.name][0] <= mid < spans[o.name][1]}
                weighted += (b - a) * max(1.0, sum(set_sizes[i] for i in running) / cores)
            new[stage.name] = times[stage.name] * weighted / (end - start)
        scaled = new
    return scaled


def simulate(workload: Workload, mapping: Mapping, device, *, cores: int | None = None) -> Estimate:
    """Predict one iteration of `workload` under `mapping` on `device` (see the module docstring).

    `cores`: the mapping's ranks run as processes time-sharing this many cores (CPU ranks, more of
    them than cores): stage times grow with the ranks busy beside them (`time_shared`). Raises
    ValueError when the mapping does not fit: a colocated set whose roles' memory (role_memory) adds
    up to more than a device holds, or an actor that cannot generate in what its set leaves free.
    """
    estimate = _simulate(workload, mapping, device, stage_time, role_memory, actor_transition)
    if cores is None:
        return estimate
    if not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores={cores!r} must be a positive integer")
    set_of = {role: mapping.set_of(role) for role in workload.roles}
    times = time_shared(workload.stages, set_of, list(mapping.allocation), estimate.stages, cores,
                        estimate.transition_s)
    total = schedule(workload.stages, set_of, times, estimate.transition_s)
    return Estimate(total, times, estimate.transition_s, mapping)


def _simulate(workload: Workload, mapping: Mapping, device, time_fn, memory_fn, transition_fn) -> Estimate:
    """`simulate` with the cost functions passed in (brute_force passes memoised ones)."""
    memory = {p.role: memory_fn(workload, p.role, p.train) for p in mapping.plans}
    used = [sum(memory[r] for r in members) for members in mapping.placement]
    for members, n, total in zip(mapping.placement, mapping.allocation, used):
        if total > device.memory_bytes:
            parts = ", ".join(f"{r} {memory[r] / 2**30:.1f}" for r in members)
            raise ValueError(f"set {{{','.join(members)}}} x{n} does not fit: {total / 2**30:.1f} GiB per device "
                             f"({parts}) > {device.memory_bytes / 2**30:.1f} GiB")
    times = {}
    for s in workload.stages:
        reserved = used[mapping.set_of(s.role)] - memory[s.role] if s.kind == "generate" else 0
        times[s.name] = time_fn(s, workload, mapping.plan(s.role), device, reserved_bytes=reserved)
    transition_s = transition_fn(workload, mapping.plan("actor"), device)
    set_of = {role: mapping.set_of(role) for role in workload.roles}
    return Estimate(schedule(workload.stages, set_of, times, transition_s), times, transition_s, mapping)
